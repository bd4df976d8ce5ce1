"""User-facing settings, validated by pydantic so a bad value fails at construction with a clear message."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GUIDED = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class EngineConfig(BaseModel):
    """How the engine is built: memory, parallelism and batching (LMDeploy's knob names where they exist)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weight and activation type; auto: float32 on the CPU, the checkpoint's half type on a GPU")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size: GPUs (or CPU processes) per model replica")
    session_len: int | None = Field(None, ge=16, description="max tokens of prompt + output; default: the model's context")
    max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="max concurrent sequences in a step; default: what the KV cache holds at "
        "256 tokens a sequence, from 128 up to 512 on a GPU (every decode batch up to it replays a CUDA graph); 128 on "
        "the CPU")
    max_prefill_token_num: int = Field(4096, ge=16, description="token budget of one step (prefill chunks + decodes)")
    cache_max_entry_count: float = Field(0.8, gt=0.0, le=1.0, description="share of free memory given to the KV cache")
    num_blocks: int | None = Field(None, ge=1, description="fix the KV cache size in blocks (overrides cache_max_entry_count)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block (a power of two)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of a prompt prefix seen before")
    quant: Literal["awq", "fp8"] | None = Field(
        None, description="weights: 'awq' 4-bit (W4A16), 'fp8' e4m3 W8A8 (compute capability >= 8.9); applied at "
        "conversion to a full-precision checkpoint; default: as the checkpoint is")
    quant_policy: Literal[0, 4, 8, "fp8"] = Field(
        0, description="KV cache: 0 as the model's dtype, 8 int8, 4 4-bit, 'fp8' e4m3 (compute capability >= 8.9)")
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
    # structured output, one at most (cluster/engine/grammar.py compiles it, once per schema)
    response_format: dict | None = Field(None, description="OpenAI's: {'type': 'json_object'}, or {'type': "
                                         "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
    guided_json: Any = Field(
        None, description="a JSON Schema (dict or JSON text, or a pydantic model class) the output follows (vLLM's name)")
    guided_regex: str | None = Field(None, description="a regular expression the output matches")
    guided_choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    guided_grammar: str | None = Field(None, description="an EBNF grammar (xgrammar's, GBNF-like; rule 'root')")
    # tool calling: the chat template renders the tools; the output's calls come back parsed (Delta.tool_calls)
    tools: list[dict] | None = Field(None, description="OpenAI's function tools: [{'type': 'function', 'function': "
                                     "{'name', 'description', 'parameters'}}]")
    tool_choice: Union[str, dict, None] = Field(None, description="'auto' (default with tools), 'none', 'required' "
                                                "or {'type': 'function', 'function': {'name': ...}}")
    parallel_tool_calls: bool = True

    @field_validator("guided_json", mode="before")
    @classmethod
    def _model_schema(cls, v: Any) -> Any:
        """A pydantic model class stands for its JSON Schema (the pipeline's convenience)."""
        if isinstance(v, type) and issubclass(v, BaseModel):
            return v.model_json_schema()
        if v is not None and not isinstance(v, (dict, str, bool)):
            raise ValueError("guided_json must be a JSON Schema: a dict, JSON text, or a pydantic model class")
        return v

    @model_validator(mode="after")
    def _check(self) -> "GenerationConfig":
        given = [k for k in GUIDED if getattr(self, k) is not None and not (
            k == "response_format" and self.response_format.get("type", "text") == "text")]
        if len(given) > 1:
            raise ValueError(f"at most one structured-output constraint per request, got {', '.join(given)}")
        if self.tool_choice not in (None, "auto", "none", "required") and not isinstance(self.tool_choice, dict):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                             f"got {self.tool_choice!r}")
        if self.forces_tools and given:
            raise ValueError(f"tool_choice {self.tool_choice!r} cannot be combined with {given[0]}")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if any(not s for s in self.stop_words):
            raise ValueError("stop_words must be non-empty strings")
        return self

    @property
    def forces_tools(self) -> bool:
        """tool_choice 'required' or a named function: the grammar makes the output a call."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0.0 or self.top_k == 1
