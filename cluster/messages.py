"""The typed messages of the serving path, one shape from the router to rank 0 and back (torch-free: the router
process imports this).

    router --Job--> engine replica --[EngineRequest]--> rank 0        (one EngineRequest per choice)
    router <--Started | Deltas | Failed-- replica <--PollReply-- rank 0   (Delta: a choice's new output)

A `Delta` is what one choice produced since its previous one; `Delta.merge` is the one place deltas are folded
together (rank 0 between two polls, the replica between two events, the router for a non-streamed answer, and the
offline pipeline, whose `Response` is a Delta too). Errors travel as `ErrorInfo`; the router turns one into an
OpenAI error body (cluster.protocol.APIError.from_error).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

Prompt = Union[str, list[int], list[dict]]  # text, token ids, or chat messages


@dataclass
class ErrorInfo:
    """Why a request failed. `kind`: bad_request | prompt_too_long | overloaded | engine_dead | unavailable |
    aborted | internal. The message is written for the client (never another request's text)."""

    kind: str
    message: str
    param: Optional[str] = None
    retry_after: Optional[int] = None
    prompt_tokens: Optional[int] = None  # prompt_too_long: the numbers of OpenAI's context-length message
    max_tokens: Optional[int] = None
    session_len: Optional[int] = None


@dataclass
class TokenLogprob:
    """One generated token's logprob and its top alternatives, as text (rank 0 decodes the ids)."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ToolCall:
    """One tool call in a choice's output. The parser (cluster.tool_parsers) emits each call whole, once it has
    parsed; a later entry with the same `index` would continue its arguments (OpenAI's streamed deltas)."""

    index: int
    name: str = ""
    arguments: str = ""  # JSON text
    id: str = ""


@dataclass
class Delta:
    """New output of one request (choice) since its previous Delta. Field names are LMDeploy's (the pipeline's
    `Response` is a Delta). `text` is the answer's content; with a thinking template `reasoning` holds what was
    between <think> and </think>, and with tools `tool_calls` the parsed calls (cluster.tool_parsers)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None  # TokenLogprob on the wire; the engine's own entries inside one process
    finish_reason: Optional[str] = None
    input_token_len: int = 0
    generate_token_len: int = 0
    cached_token_len: int = 0
    reasoning: str = ""
    tool_calls: Optional[list[ToolCall]] = None

    def merge(self, later: "Delta") -> "Delta":
        """Fold `later` (the same request's next output) into this one, in place; returns self. Its lists are
        this Delta's own from then on (copied from `later` on the first merge), so `later` is never changed."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        self.finish_reason = later.finish_reason
        self.input_token_len = later.input_token_len or self.input_token_len
        self.generate_token_len = max(self.generate_token_len, later.generate_token_len)
        self.cached_token_len = later.cached_token_len
        self.reasoning += later.reasoning
        for call in later.tool_calls or ():
            self._merge_call(call)
        return self

    def _merge_call(self, call: ToolCall) -> None:
        if self.tool_calls is None:
            self.tool_calls = []
        for own in self.tool_calls:
            if own.index == call.index:  # a fragment of a call already here: its arguments go on
                own.name, own.id = own.name or call.name, own.id or call.id
                own.arguments += call.arguments
                return
        self.tool_calls.append(ToolCall(call.index, call.name, call.arguments, call.id))

    def copy(self) -> "Delta":
        return Delta().merge(self)


# -- router -> engine replica ---------------------------------------------------------------------------------------
@dataclass
class Choice:
    """One choice of a request: n choices per prompt. `gen` holds GenerationConfig fields; its max_new_tokens may
    be None, for what the session has left after the prompt (rank 0 knows the prompt's length)."""

    index: int
    prompt: Any  # Prompt
    gen: dict
    resume_ids: list[int] = field(default_factory=list)  # failover: tokens already sent, appended to the prompt's ids


@dataclass
class Job:
    """One API request as the router sends it to an engine replica."""

    request_id: str
    choices: list[Choice]
    logprobs: bool = False  # return per-token logprobs (as TokenLogprob)
    work: int = 0  # estimated tokens to process, for replica choice
    param: Optional[str] = None  # the request field that holds the prompt ("messages" or "prompt"), for errors
    exclude_replicas: list[str] = field(default_factory=list)  # failover: replicas that failed this request


# -- engine replica <-> rank 0 ----------------------------------------------------------------------------------------
@dataclass
class EngineRequest:
    """One choice, as rank 0 takes it (add_requests)."""

    rid: str
    prompt: Any  # Prompt
    gen: dict
    logprobs: bool = False
    param: Optional[str] = None
    resume_ids: list[int] = field(default_factory=list)  # appended to the prompt's token ids (a resumed request)


@dataclass
class Admitted:
    """Rank 0's answer to one EngineRequest: queued (with its prompt's length), or refused."""

    prompt_tokens: int = 0
    error: Optional[ErrorInfo] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EngineStats:
    """What rank 0 reports of its engine (/metrics, /health, replica choice). None: not known."""

    ok: bool = True
    error: Optional[str] = None
    state: Optional[str] = None
    replica: Optional[str] = None  # set by whoever asked (the router's backends)
    num_running: Optional[int] = None
    num_waiting: Optional[int] = None
    kv_blocks_total: Optional[int] = None
    kv_tokens_total: Optional[int] = None  # blocks x block_size: what a quantized cache multiplies
    kv_blocks_free: Optional[int] = None
    kv_usage: Optional[float] = None
    num_preemptions: Optional[int] = None
    prefix_cache_hit_rate: Optional[float] = None
    prefix_cache_hit_tokens: Optional[int] = None
    tokens_in: Optional[int] = None
    tokens_out: Optional[int] = None
    steps: Optional[int] = None
    steps_ahead: Optional[int] = None
    vision_seconds: Optional[float] = None  # a vision-language model's image encoder (None for a text model)
    images_encoded: Optional[int] = None

    @classmethod
    def of(cls, d: dict) -> "EngineStats":
        """From the engine's stats dict (keys this type does not know are dropped)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class PollReply:
    """Every new output of every request of a replica since the last poll (one Delta per request)."""

    outputs: dict[str, Delta] = field(default_factory=dict)
    errors: dict[str, ErrorInfo] = field(default_factory=dict)
    stats: Optional[EngineStats] = None
    dead: Optional[str] = None  # why the engine cannot serve any more


@dataclass
class ReplicaInfo:
    """The facts of a model replica's engine the router needs (from rank 0's `info`)."""

    model_name: Optional[str] = None
    session_len: Optional[int] = None
    max_token_chars: Optional[int] = None  # the longest token's text: a prompt's characters bound its tokens
    # the replica's state, for operators (EngineReplica.info)
    state: Optional[str] = None
    replica: Optional[str] = None
    restarts: int = 0
    last_error: Optional[str] = None


# -- engine replica -> router -----------------------------------------------------------------------------------------
@dataclass
class Started:
    """First event of a job: every choice is queued; prompt_tokens per choice index."""

    prompt_tokens: dict[int, int]
    replica: str = ""


@dataclass
class Deltas:
    """New output of some of a job's choices, by choice index; none: a keep-alive (the replica is answering,
    the router's stall timeout starts again)."""

    choices: dict[int, Delta]


@dataclass
class Failed:
    """The job failed (instead of Started, or mid-stream); nothing follows."""

    error: ErrorInfo


Event = Union[Started, Deltas, Failed]
