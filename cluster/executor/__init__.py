"""Executors: what runs a replica's steps for the engine, on one rank or over a tensor-parallel group.

`create_executor` is the one place that picks one (vLLM's `Executor.get_class`). Every executor starts its ranks'
runners through the same public phases (vLLM's `EngineCore._initialize_kv_caches`): load the weights, `profile()`
how many KV blocks fit, agree on a count over the ranks, `init_cache(n)`, then `capture()` the CUDA graphs.

Importing this package imports no torch (the serving worker's module imports it, and is imported where torch is
not): each function imports what it builds."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from cluster.config import EngineConfig
    from cluster.engine.block_manager import BlockManager
    from cluster.engine.model_runner import ModelRunner, StepInput
    from cluster.engine.sequence import Sequence
    from cluster.models.config import ModelConfig


class Executor(Protocol):
    """What the engine (cluster.engine.engine, async_engine) uses of whatever runs its steps."""

    cfg: ModelConfig
    session_len: int
    device: torch.device  # where logits come back (rank 0's)
    dtype: torch.dtype  # of the model's activations (LLaVA's vision tower runs in it)
    num_blocks: int  # KV blocks of the cache, the same count on every rank
    block_size: int
    max_batch_size: int  # sequences a step may hold (EngineConfig.max_batch_size or its default)
    tp_size: int
    can_overlap: bool  # execute() takes input ids still on the device, so a step can be launched ahead

    def prepare(self, plan: list[tuple[Sequence, int]], bm: BlockManager) -> StepInput: ...

    def execute(self, step: StepInput, input_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


def session_len_for(cfg: ModelConfig, ec: EngineConfig) -> int:
    """The longest sequence (prompt and output) a request may reach: session_len, else the model's context."""
    if ec.session_len and ec.session_len > cfg.max_position_embeddings:
        raise ValueError(f"session_len {ec.session_len} exceeds the model's context {cfg.max_position_embeddings}")
    return ec.session_len or cfg.max_position_embeddings


def resolve_model(model: str | None, ec: EngineConfig, progress: bool = False) -> tuple[Path, ModelConfig, int]:
    """(model_dir, ModelConfig, session_len): the converted checkpoint for this tp, dtype and quantization, the
    same answer on every rank (conversion is file-locked, so concurrent ranks convert once)."""
    from cluster.convert.cache import ensure_converted, resolve_dtype
    from cluster.engine.model_runner import default_device
    from cluster.models.config import ModelConfig

    from cluster.convert.quant import effective_quant
    from cluster.quant.fp8 import check_device

    device = default_device(ec)
    dtype = resolve_dtype(model, ec.dtype, device.type)
    if (ec.quant or device.type == "cuda") and effective_quant(model, ec.quant) == "fp8":
        check_device(device)  # before converting: an FP8 model on an older GPU is a one-line error
    model_dir = ensure_converted(model, ec.tp, dtype, ec.cache_dir, progress=progress, quant=ec.quant)
    cfg = ModelConfig.load(model_dir / "config.json")
    return model_dir, cfg, session_len_for(cfg, ec)


def single_rank(cfg: ModelConfig, weights: dict[str, torch.Tensor], ec: EngineConfig, device: torch.device,
                session_len: int) -> ModelRunner:
    """A one-rank executor: the ModelRunner itself, its phases run in order (and timed: runner.phases)."""
    from cluster.engine.model_runner import ModelRunner

    runner = ModelRunner(cfg, weights, ec, device, session_len)
    run = runner.phases.run
    run("cache", runner.init_cache, run("profile", runner.profile))
    runner.capture()
    return runner


def create_executor(model_dir: Path, cfg: ModelConfig, ec: EngineConfig, session_len: int, *,
                    init_method: str | None = None) -> Executor:
    """The executor for `ec.tp` ranks. tp=1: a ModelRunner in this process. tp>1: rank 0 of a TPExecutor, whose
    followers are spawned here (init_method None) or run `run_follower` elsewhere on the same init_method (the Ray
    workers; see cluster/executor/tp.py)."""
    if ec.tp == 1:
        import time

        from cluster.engine.model_runner import default_device, load_shard
        from cluster.kernels import jit_cache

        device = default_device(ec)
        jit_cache.use_beside(model_dir, device)
        t = time.perf_counter()
        weights = load_shard(model_dir, 0, device)
        loaded = time.perf_counter() - t
        runner = single_rank(cfg, weights, ec, device, session_len)
        runner.phases.seconds = {"load": loaded, **runner.phases.seconds}
        return runner
    from cluster.executor.tp import TPExecutor

    if init_method is None:
        return TPExecutor(model_dir, cfg, ec, session_len)
    return TPExecutor.from_initialized(model_dir, cfg, ec, session_len, init_method=init_method)
