"""The OpenAI HTTP protocol: request models (validated by pydantic), error bodies, and the mapping from an OpenAI
request to engine work (a cluster.messages.Job).

No torch, no Ray: the router process imports this and nothing heavier.
"""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cluster.messages import Choice, ErrorInfo, Job
from cluster.schemas import AssistantToolCall, Guided, ResponseFormat, Tools

MAX_N = 16  # choices per request (n x prompts); more is "n too large"
MAX_STOP = 16
MAX_STOP_LEN = 256  # characters of one stop sequence
# Strict, like OpenAI: an unknown field is a 400 (never silently ignored), and "10" is not an integer nor "yes" a
# boolean. Fields OpenAI documents that change nothing here are accepted and ignored (see _Sampling).
STRICT = ConfigDict(extra="forbid", strict=True)
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # the engine checks the model's own vocabulary size
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


# -- errors -----------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client gets as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    @classmethod
    def from_error(cls, err: ErrorInfo) -> "APIError":
        """An error as an engine replica reports it."""
        if err.kind == "prompt_too_long":
            p, m, n = err.prompt_tokens, err.max_tokens, err.session_len
            return cls(400, f"This model's maximum context length is {n} tokens. However, you requested {p + m} "
                            f"tokens ({p} in the prompt, {m} for the completion, max_tokens). Please reduce the "
                            "length of the prompt or max_tokens.", param=err.param or "messages",
                       code="context_length_exceeded")
        if err.kind == "bad_request":
            return cls(400, err.message, param=err.param)
        if err.kind == "overloaded":
            return cls(503, err.message, type="server_overloaded", code="overloaded", retry_after=err.retry_after or 1)
        if err.kind in ("engine_dead", "unavailable"):
            return cls(503, err.message, type="server_error", code="engine_unavailable",
                       retry_after=err.retry_after or 5)
        return cls(500, err.message, type="server_error", code="internal_error")


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
    if err.get("type") == "json_invalid":  # includes nesting too deep to parse
        return APIError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    if err.get("type") in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc or None,
                        code="unknown_parameter")
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {_short(value)})"
    return APIError(400, f"{loc}: {msg}{shown}" if loc else msg, param=loc or None, code="invalid_value")


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# -- requests ---------------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: Optional[bool] = Field(None, description="accepted, ignored")
    continuous_usage_stats: Optional[bool] = Field(None, description="accepted, ignored (vLLM's name)")


class _Sampling(Guided):
    """Sampling parameters shared by chat and completions (OpenAI names, plus vLLM's top_k/min_p/repetition_penalty
    and guided_*), and structured output (response_format, guided_*: cluster/schemas.py)."""

    model_config = STRICT

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate; default: the rest of the session")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0 disables")
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    seed: Optional[Int64] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[TokenId]] = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    best_of: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    _guided: dict = PrivateAttr(default_factory=dict)  # the constraint's GenerationConfig fields
    # documented by OpenAI, no effect here: accepted and ignored
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        words = [v] if isinstance(v, str) else v
        if len(words) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(words)}")
        if any(not w for w in words):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(w) > MAX_STOP_LEN for w in words):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LEN} characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (use n)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        try:
            self._guided = self.guided_gen(self.response_format)
        except ValueError as e:
            raise APIError(400, str(e), param="response_format") from None
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def gen_dict(self, default_max_tokens: int | None, top_logprobs: int | None, index: int = 0) -> dict:
        """GenerationConfig fields for one choice; the worker builds the GenerationConfig (and validates it)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        g: dict[str, Any] = {
            "max_new_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "min_new_tokens": self.min_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0 if self.top_k is None or self.top_k < 0 else self.top_k,
            "min_p": self.min_p or 0.0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "stop_words": stop,
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "logprobs": top_logprobs,
        }
        if self.seed is not None:
            g["seed"] = self.seed + index  # n choices with one seed: reproducible, yet different from each other
        g.update(self._guided)
        if isinstance(self, Tools):
            g.update(self.tools_gen())
        return g


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[AssistantToolCall]] = Field(None, max_length=128)
    tool_call_id: Optional[str] = Field(None, max_length=256)
    # what an SDK sends back when it replays an assistant message: accepted while empty
    refusal: Optional[str] = None
    function_call: Optional[dict] = None
    annotations: Optional[list] = None
    audio: Optional[dict] = None

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.function_call:
            raise ValueError("function_call (deprecated) is not supported: use tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages have a tool_call_id")
        return self

    def plain(self) -> dict:
        """Text parts joined into one string; with image_url parts the list stays, for a vision-language model's
        tokenizer to place the images (a text-only model refuses them with a 400)."""
        content = self.content
        role = "system" if self.role == "developer" else self.role
        if isinstance(content, list):
            kinds = {part.get("type") for part in content}
            if kinds - {"text", "image_url"}:
                bad = sorted(str(k) for k in kinds - {"text", "image_url"})
                raise ValueError(f"content parts of type {', '.join(map(repr, bad))} are not supported "
                                 "(text and image_url are)")
            if "image_url" in kinds:
                return {"role": role, "content": [dict(part) for part in content]}
            content = "".join(str(part.get("text", "")) for part in content)
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:  # the template renders them (cluster/engine/tokenizer.py)
            out["tool_calls"] = [c.template() for c in self.tool_calls]
        if self.role == "tool":
            out.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v})
        return out


class ChatCompletionRequest(_Sampling, Tools):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    functions: Optional[list] = None
    function_call: Optional[Union[str, dict]] = None
    modalities: Optional[list[str]] = None
    reasoning_effort: Optional[str] = Field(None, description="accepted, ignored")
    verbosity: Optional[str] = Field(None, description="accepted, ignored")

    @model_validator(mode="after")
    def _chat(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.functions or self.function_call not in (None, "none", "auto"):
            raise ValueError("functions and function_call (deprecated) are not supported: use tools and tool_choice")
        bad = self.tool_errors()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0])
        if self._guided and self.tools_gen() and self.tools_gen()["tool_choice"] != "auto":
            raise APIError(400, f"tool_choice {self.tool_choice!r} cannot be combined with "
                                f"{', '.join(self._guided)}", param="tool_choice")
        if self.modalities and set(self.modalities) != {"text"}:
            raise ValueError("only the text modality is supported")
        return self

    def plain_messages(self) -> list[dict]:
        try:
            return [m.plain() for m in self.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]] = Field(
        ..., description="a string, token ids, or a list of either")
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """One clear message for a wrong shape (a union's errors name every branch it tried)."""
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("prompt must be a string, a list of token ids, or a list of strings or of token-id lists")
        if not v:
            raise ValueError("prompt is empty")
        kinds = {type(x) for x in v}
        if kinds == {int}:
            bad = next((x for x in v if not 0 <= x < 2**31), None)
            if bad is not None:
                raise ValueError(f"token id {_short(bad)} is out of range")
            return v
        if kinds == {str}:
            return v
        if kinds == {list}:
            for p in v:
                if not p:
                    raise ValueError("prompt is empty")
                if any(type(x) is not int for x in p):
                    raise ValueError("a token-id prompt must hold integers only")
                bad = next((x for x in p if not 0 <= x < 2**31), None)
                if bad is not None:
                    raise ValueError(f"token id {_short(bad)} is out of range")
            return v
        raise ValueError("prompt must be a string, a list of token ids, or a list of strings or of token-id lists "
                         "(not a mix)")

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (the prompt's logprobs are not computed); "
                             "drop echo, or logprobs")
        if self.echo and not all(isinstance(p, str) for p in self.prompts()):
            raise ValueError("echo needs text prompts (token-id prompts are not echoed); send the prompt as text, "
                             "or drop echo")
        if len(self.prompts()) * self.n > MAX_N:
            raise ValueError(f"n x number of prompts must be at most {MAX_N}, got {len(self.prompts()) * self.n}")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def parse(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Body bytes -> validated request, or APIError 400 (never a 500 for the caller's mistake). Parsed by pydantic's
    own JSON reader: strict JSON types, and nesting too deep is a 400, not a RecursionError."""
    if not raw:
        raise APIError(400, "request body is empty: send a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, str(e) if isinstance(e, ValueError) else "request body is nested too deeply") from None


def prompt_chars(prompt: Any) -> int:
    """Characters of a prompt's text (token-id prompts: their length), for a cheap lower bound on its tokens."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        n = 0
        for m in prompt:
            c = m.get("content")
            if isinstance(c, str):
                n += len(c)
            elif isinstance(c, list):
                n += sum(len(p["text"]) for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        return n
    return len(prompt) if isinstance(prompt, list) else 0


# -- jobs ---------------------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _estimate_tokens(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if prompt and isinstance(prompt[0], dict):
        return sum(len(str(m.get("content", ""))) for m in prompt) // 4 + 8
    return len(prompt)


def make_job(request_id: str, prompts: list, req: _Sampling, default_max_tokens: int | None,
             top_logprobs: int | None, want_logprobs: bool, param: str) -> Job:
    """n choices per prompt, indexed prompt-major (OpenAI's order)."""
    choices = [Choice(pi * req.n + j, prompt, req.gen_dict(default_max_tokens, top_logprobs, j))
               for pi, prompt in enumerate(prompts) for j in range(req.n)]
    work = sum(_estimate_tokens(c.prompt) + (c.gen["max_new_tokens"] or 256) for c in choices)
    return Job(request_id, choices, want_logprobs, work, param)
