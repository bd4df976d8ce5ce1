"""Which vision-language converter (cluster/convert/llava.py, cluster/convert/llava_next.py,
cluster/convert/qwen2_vl.py) reads a checkpoint:
each has accepts(hf), text_config, vision_fields, text_reader and save_vision."""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

Getter = Callable[[str], "torch.Tensor"]


def vlm_for(hf: dict) -> ModuleType | None:
    from cluster.convert import deepseek_vl, internvl, llava, llava_next, qwen2_vl

    return next((m for m in (llava, llava_next, qwen2_vl, deepseek_vl, internvl) if m.accepts(hf)), None)


def text_model_type(hf: dict) -> str:
    """The model type whose family converts the checkpoint's language model."""
    m = vlm_for(hf)
    return m.text_config(hf).get("model_type", "llama") if m else hf.get("model_type", "")


def renamed_reader(get: Getter, candidates: Callable[[str], tuple[str, ...]], model: str) -> Getter:
    """A reader of the engine's language-model names (model.layers.*, lm_head.weight) from a checkpoint that keeps
    them elsewhere: the first of candidates(name) the checkpoint holds."""
    names = getattr(get, "names", set())

    def text_get(name: str) -> torch.Tensor:
        for cand in candidates(name):
            if cand in names:
                return get(cand)
        raise KeyError(f"{model} checkpoint has no language-model tensor {name!r}")

    text_get.names = names  # type: ignore[attr-defined]
    return text_get
