"""Engine architecture name -> model class."""
from __future__ import annotations

from torch import nn

from cluster.models.config import ModelConfig
from cluster.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM}


def build_model(cfg: ModelConfig, tp: int = 1) -> nn.Module:
    if cfg.architecture not in MODELS:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; supported: {sorted(MODELS)}")
    return MODELS[cfg.architecture](cfg, tp)
