"""User-facing settings, validated by pydantic so a bad value fails at construction with a clear message."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EngineConfig(BaseModel):
    """How the engine is built: memory, parallelism and batching (LMDeploy's knob names where they exist)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weight and activation type; auto: float32 on the CPU, the checkpoint's half type on a GPU")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size: GPUs (or CPU processes) per model replica")
    session_len: int | None = Field(None, ge=16, description="max tokens of prompt + output; default: the model's context")
    max_batch_size: int = Field(128, ge=1, le=4096, description="max concurrent sequences in a step")
    max_prefill_token_num: int = Field(4096, ge=16, description="token budget of one step (prefill chunks + decodes)")
    cache_max_entry_count: float = Field(0.8, gt=0.0, le=1.0, description="share of free memory given to the KV cache")
    num_blocks: int | None = Field(None, ge=1, description="fix the KV cache size in blocks (overrides cache_max_entry_count)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block (a power of two)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of a prompt prefix seen before")
    quant_policy: Literal[0, 4, 8] = Field(0, description="KV cache: 0 as the model's dtype, 8 int8, 4 4-bit")
    device: str | None = Field(None, description="'cuda' or 'cpu'; default: cuda when available")
    cuda_graph: bool = Field(True, description="capture decode steps as CUDA graphs (GPU only)")
    overlap_steps: bool | None = Field(None, description="launch the next decode step before reading this one's "
                                       "tokens, so host work hides behind the GPU; default: on for one GPU")
    seed: int = Field(0, description="reserved, unused so far: sampling is seeded per request (GenerationConfig.seed)")
    cache_dir: str | None = Field(None, description="where converted weights go; default ~/.cache/cluster")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of two, got {v}")
        return v


class GenerationConfig(BaseModel):
    """Per-request sampling settings; temperature 0 (or top_k 1) means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(512, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop_words: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="return the top-N logprobs of each generated token")
    do_sample: bool | None = Field(None, description="False forces greedy; None decides from temperature/top_k")

    @model_validator(mode="after")
    def _check(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if any(not s for s in self.stop_words):
            raise ValueError("stop_words must be non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0.0 or self.top_k == 1
