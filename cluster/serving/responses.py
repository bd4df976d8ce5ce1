"""OpenAI response bodies from a job's events: one JSON body (non-streamed) or SSE chunks (streamed), and the
request's metrics once it ends."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, AsyncIterator

from cluster.messages import Delta, Deltas, Failed, Job, Started, TokenLogprob, ToolCall
from cluster.protocol import APIError

if TYPE_CHECKING:
    from cluster.serving.backends import EventStream
    from cluster.serving.server import OpenAIServer

log = logging.getLogger(__name__)


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """-> OpenAI chat `logprobs` object."""
    if entries is None:
        return None
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8")),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                          for t, lp in e.top]} for e in entries]}


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict | None:
    """-> legacy completions `logprobs` object (text_offset counted from `offset`)."""
    if entries is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
        tokens.append(e.token)
        lps.append(e.logprob)
        tops.append({t: lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def tool_calls_json(calls: list[ToolCall], delta: bool = False) -> list[dict]:
    """-> OpenAI `tool_calls` (a streamed delta's entries carry their `index`)."""
    out = []
    for c in calls:
        entry = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": c.index, **entry} if delta else entry)
    return out


def chat_message(d: Delta) -> dict:
    """The assistant message of a finished chat choice: content (null beside tool calls with no text), reasoning
    (a thinking template's, as `reasoning_content`), tool calls."""
    msg: dict = {"role": "assistant", "content": d.text if d.text or not d.tool_calls else None}
    if d.reasoning:
        msg["reasoning_content"] = d.reasoning
    if d.tool_calls:
        msg["tool_calls"] = tool_calls_json(d.tool_calls)
    return msg


def chat_delta(d: Delta) -> dict:
    delta: dict = {}
    if d.reasoning:
        delta["reasoning_content"] = d.reasoning
    if d.text:
        delta["content"] = d.text
    if d.tool_calls:
        delta["tool_calls"] = tool_calls_json(d.tool_calls, delta=True)
    return delta


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def backend_error(e: BaseException) -> APIError:
    """What a client gets when reaching the engine replica failed (Serve's and Ray's exceptions, by name)."""
    name = type(e).__name__
    if name == "BackPressureError":
        return APIError(503, "engine replicas are overloaded (request queue full); retry later",
                        type="server_overloaded", code="overloaded", retry_after=2)
    if name in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
                "DeploymentUnavailableError", "RayServeException"):
        return APIError(503, f"engine replica unavailable ({name}); retry", type="server_error",
                        code="engine_unavailable", retry_after=5)
    log.error("backend error: %s", e, exc_info=e)
    return APIError(500, f"internal error ({name}); retry, and report it if it persists", type="server_error",
                    code="internal_error")


class ResponseBuilder:
    """One request's response: collects the job's events into a body, or formats them as chunks; records the
    request's metrics when it ends (`done`, once)."""

    def __init__(self, server: "OpenAIServer", req, job: Job, first: Started, endpoint: str, t0: float, chat: bool,
                 prompts: list):
        self.server, self.req, self.job, self.endpoint, self.t0, self.chat = server, req, job, endpoint, t0, chat
        self.model = req.model
        self.prompts = prompts
        self.prompt_tokens = first.prompt_tokens
        self.n = len(job.choices)
        self.outputs: dict[int, Delta] = {}  # each choice's output so far (its counts; its text when collecting)
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.created = int(time.time())
        self.status = "ok"
        self._done = False

    def usage(self) -> dict:
        """A prompt counts once however many choices it has (like OpenAI)."""
        per_prompt, cached = {}, {}
        for idx, n in self.prompt_tokens.items():
            per_prompt.setdefault(idx // self.req.n, n)
        for idx, d in self.outputs.items():
            cached.setdefault(idx // self.req.n, d.cached_token_len)
        completion = sum(d.generate_token_len for d in self.outputs.values())
        return usage_dict(sum(per_prompt.values()), completion, sum(cached.values()))

    def _see(self, deltas: Deltas) -> None:
        """Fold the event into each choice's output: the one merge (cluster.messages.Delta.merge)."""
        t = time.perf_counter()
        for idx, d in deltas.choices.items():
            if d.token_ids:
                if self.t_first is None:
                    self.t_first = t
                    self.server.metrics.ttft.labels(self.model).observe(t - self.t0)
                self.t_last = t
            acc = self.outputs.get(idx)
            self.outputs[idx] = d.copy() if acc is None else acc.merge(d)

    def _failed(self, ev: Failed) -> APIError:
        self.status = "error"
        self.server.stats_changed()
        return APIError.from_error(ev.error)

    def abandon(self, events: "EventStream") -> None:
        if not self._done:
            events.close()
            self.status = "cancelled"
            self.done()

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        m = self.server.metrics
        self.server.in_flight -= 1
        m.in_flight.dec()
        m.requests.labels(self.model, self.endpoint, self.status).inc()
        u = self.usage()
        m.prompt_tokens.labels(self.model).inc(u["prompt_tokens"])
        m.generation_tokens.labels(self.model).inc(u["completion_tokens"])
        m.e2e.labels(self.model).observe(time.perf_counter() - self.t0)
        per_choice = u["completion_tokens"] / max(1, self.n)
        if self.t_first is not None and self.t_last is not None and per_choice > 1:
            m.tpot.labels(self.model).observe((self.t_last - self.t_first) / (per_choice - 1))

    def _echo(self, index: int) -> str:
        """The prompt a completion choice echoes ("" unless echo; echo takes text prompts only)."""
        return self.prompts[index // self.req.n] if not self.chat and self.req.echo else ""

    # -- non-streamed ----------------------------------------------------------------------------------------------
    async def collect(self, events: "EventStream") -> dict:
        try:
            async for ev in events:
                if isinstance(ev, Failed):
                    raise self._failed(ev)
                self._see(ev)
        except (APIError, asyncio.CancelledError):
            self.status = "error" if self.status == "ok" else self.status
            raise
        except Exception as e:  # noqa: BLE001
            self.status = "error"
            raise backend_error(e) from None
        finally:
            events.close()
        choices = []
        for c in self.job.choices:
            out = self.outputs.get(c.index) or Delta()
            finish = out.finish_reason or "stop"
            if self.chat:
                choices.append({"index": c.index, "message": chat_message(out),
                                "logprobs": chat_logprobs(out.logprobs or []) if self.job.logprobs else None,
                                "finish_reason": finish})
            else:
                prefix = self._echo(c.index)
                choices.append({"index": c.index, "text": prefix + out.text,
                                "logprobs": completion_logprobs(out.logprobs or [], len(prefix))
                                if self.job.logprobs else None, "finish_reason": finish})
        return {"id": self.job.request_id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # -- streamed ------------------------------------------------------------------------------------------------
    def _chunk(self, choices: list, usage: dict | None = None, with_usage_key: bool = False) -> bytes:
        body = {"id": self.job.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or with_usage_key:
            body["usage"] = usage
        return sse(body)

    def _choice_chunk(self, index: int, d: Delta, offset: int) -> dict:
        lp = self.job.logprobs
        if self.chat:
            delta = chat_delta(d)
            if not delta and d.finish_reason is None:  # a step whose text is held back: progress, no text yet
                delta = {"content": ""}
            return {"index": index, "delta": delta,
                    "logprobs": chat_logprobs(d.logprobs or []) if lp else None, "finish_reason": d.finish_reason}
        return {"index": index, "text": d.text,
                "logprobs": completion_logprobs(d.logprobs or [], offset) if lp else None,
                "finish_reason": d.finish_reason}

    def _role_chunk(self, index: int, inc: bool) -> bytes:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], with_usage_key=inc)

    async def stream(self, events: "EventStream") -> AsyncIterator[bytes]:
        inc = self.req.include_usage
        offsets: dict[int, int] = defaultdict(int)  # text sent so far per completion choice (logprob offsets)
        finished: set[int] = set()
        # chat: each choice's role chunk goes out with its first token, not on arrival, so a client timing the
        # first chunk measures the time to the first token (prefill included), as with vLLM and OpenAI
        role_due = {c.index for c in self.job.choices} if self.chat else set()
        try:
            for c in self.job.choices:  # completions: the echoed prompt first
                if not self.chat and self._echo(c.index):
                    offsets[c.index] = len(self._echo(c.index))
                    yield self._chunk([{"index": c.index, "text": self._echo(c.index), "logprobs": None,
                                        "finish_reason": None}], with_usage_key=inc)
            async for ev in events:
                if isinstance(ev, Failed):
                    yield sse(self._failed(ev).body())
                    return
                self._see(ev)
                out = []
                for i, d in ev.choices.items():
                    if not (d.text or d.reasoning or d.tool_calls or d.logprobs or d.token_ids) \
                            and d.finish_reason is None:
                        continue
                    if i in role_due:
                        role_due.discard(i)
                        yield self._role_chunk(i, inc)
                    # a step whose text is held back (a partial character, a possible stop word or tool call)
                    # still gets its chunk, empty: the client sees progress
                    out.append(self._choice_chunk(i, d, offsets[i]))
                    offsets[i] += len(d.text)
                    if d.finish_reason is not None:
                        finished.add(i)
                if out:
                    last = len(finished) == self.n and not inc  # without include_usage: usage rides on the last
                    yield self._chunk(out, usage=self.usage() if last else None, with_usage_key=inc)
            for i in sorted(role_due):  # a choice that never produced a token still gets its role
                yield self._role_chunk(i, inc)
            if inc:
                yield self._chunk([], usage=self.usage())
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.status = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            self.status = "error"
            yield sse(backend_error(e).body())
        finally:
            events.close()
            self.done()
