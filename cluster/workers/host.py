"""Rank 0's request host: EngineRequests in, batched PollReplies out, around an AsyncEngine-like object. No Ray
here: the Ray actor (cluster.workers.worker.RankWorker) and the in-process (test, no-Ray) paths share it.

    add_requests([EngineRequest])  many requests in one call (the replica coalesces concurrent arrivals); prompts
                                   are prepared (tokenized, images decoded) and validated once, on a thread of their
                                   own, never on the actor's event loop
    abort([rid])                   many aborts in one call
    poll(timeout)                  every new output of every request since the last poll, one Delta each (merged),
                                   so a reply's size is bounded by the number of requests, not tokens; waits up to
                                   `timeout` when there is none yet (a long poll), so an idle replica costs ~nothing
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from cluster.messages import Admitted, Delta, EngineRequest, EngineStats, ErrorInfo, PollReply, ReplicaInfo, TokenLogprob
from cluster.workers.client_errors import error_for

# The shortest gap between two poll replies while outputs keep coming (see RankZeroHost.poll).
REPLY_INTERVAL_S = 0.02


def resumed(prompt, resume_ids: list[int]):
    """A prepared prompt with the tokens a failed replica already sent appended: the resumed request's prompt is
    exactly the tokens the uninterrupted one had at that point (no re-rendering of text or chat), so greedy and
    seeded continuations match. `resumed` counts them: the engine replays them through the request's detokenizer,
    parsers and grammar, and its penalties count them as output (LLMEngine.add_request)."""
    extra = [int(t) for t in resume_ids]
    if not hasattr(prompt, "token_ids"):  # an engine that prepares prompts as plain token lists
        return list(prompt) + extra
    return replace(prompt, token_ids=list(prompt.token_ids) + extra, resumed=prompt.resumed + len(extra))


class _Sink:
    """Where the engine thread puts one request's outputs: tagged with the request id into the host's inbox."""

    __slots__ = ("rid", "host")

    def __init__(self, rid: str, host: "RankZeroHost"):
        self.rid, self.host = rid, host

    def put(self, item) -> None:
        self.host._deliver(self.rid, item)


@dataclass
class _Ready:
    """A request prepared and validated, for engine.submit."""

    req: EngineRequest
    prompt: Any  # the engine's prepared prompt
    gen: Any  # GenerationConfig


class RankZeroHost:
    """Call it from one asyncio loop; the engine's thread only appends to the inbox."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop or asyncio.get_event_loop()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._signaled = False
        self._event = asyncio.Event()
        self._want_lp: set[str] = set()
        self._tok_cache: dict[int, str] = {}
        self._last_reply = 0.0
        self._urgent = False  # the inbox holds a finished request or an error: reply without holding
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-prompt")
        self._preparing: set[str] = set()  # request ids whose add is on the prepare thread
        self._aborted_early: set[str] = set()  # ... and that were aborted meanwhile

    # -- the engine thread side ----------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        urgent = isinstance(item, BaseException) or item.finish_reason is not None
        with self._lock:
            self._inbox.append((rid, item))
            if self._signaled and (self._urgent or not urgent):
                return
            self._signaled = True
            self._urgent = self._urgent or urgent
        self.loop.call_soon_threadsafe(self._event.set)

    # -- calls ---------------------------------------------------------------------------------------------------------
    def info(self) -> ReplicaInfo:
        tok = self.engine.tokenizer
        return ReplicaInfo(self.engine.model_name, self.engine.session_len, getattr(tok, "max_token_chars", None))

    def add_requests(self, reqs: list[EngineRequest]) -> list[Admitted]:
        """Prepares on the calling thread: the Ray actor uses add_requests_async."""
        return [self._submit(r) for r in self._prepare_all(reqs)]

    async def add_requests_async(self, reqs: list[EngineRequest]) -> list[Admitted]:
        """add_requests with the prompts prepared on the host's one prepare thread, so a big prompt never stalls
        this loop (the poll replies of every other stream); one thread, so adds reach the engine in order."""
        rids = [r.rid for r in reqs]
        self._preparing.update(rids)
        try:
            ready = await asyncio.get_running_loop().run_in_executor(self._prep, self._prepare_all, reqs)
        finally:
            self._preparing.difference_update(rids)
        results = [self._submit(r) for r in ready]
        self._aborted_early.difference_update(rids)
        return results

    def _prepare_all(self, reqs: list[EngineRequest]) -> list[_Ready | Admitted]:
        return [self._prepare(r) for r in reqs]

    def _prepare(self, req: EngineRequest) -> _Ready | Admitted:
        """One request made ready for the engine (tokens, images, GenerationConfig) and validated, once; or its
        refusal. Any thread: this is the part that can take long."""
        from cluster.config import GenerationConfig
        from cluster.engine.grammar import GrammarError
        from cluster.engine.multimodal import check_inline_images
        from cluster.engine.tokenizer import with_tools

        try:  # a remote caller's prompt: never one of this server's files
            check_inline_images(req.prompt)
        except ValueError as e:
            return Admitted(error=ErrorInfo("bad_request", str(e), param="messages"))
        try:
            gen = dict(req.gen)
            prompt = self.engine.prepare_prompt(with_tools(req.prompt, gen.get("tools"), gen.get("tool_choice")))
            if req.resume_ids:  # failover: the prompt's own tokens, then those already sent, token-exact
                prompt = resumed(prompt, req.resume_ids)
            if gen.get("max_new_tokens") is None:
                gen["max_new_tokens"] = max(1, self.engine.session_len - len(prompt))
            gen = GenerationConfig(**gen)
            self.engine.validate(prompt, gen)  # compiles its grammar, if any (structured output), here
            return _Ready(req, prompt, gen)
        except GrammarError as e:  # the message names the field and xgrammar's objection
            return Admitted(error=ErrorInfo("bad_request", str(e), param=e.param))
        except Exception as e:  # noqa: BLE001 - each request gets its own error
            return Admitted(error=error_for(e, req.rid, req.param, preparing=True))

    def _submit(self, r: _Ready | Admitted) -> Admitted:
        """On the host's loop: a prepared request into the engine, unless it was aborted while it was prepared."""
        if isinstance(r, Admitted):
            return r
        rid = r.req.rid
        if rid in self._aborted_early:
            return Admitted(error=ErrorInfo("aborted", "the request was aborted before it started"))
        try:
            if r.req.logprobs:
                self._want_lp.add(rid)
            self.engine.submit(r.prompt, r.gen, rid, None, _Sink(rid, self))
            return Admitted(prompt_tokens=len(r.prompt))
        except Exception as e:  # noqa: BLE001 - each request gets its own error
            self._want_lp.discard(rid)
            return Admitted(error=error_for(e, rid, r.req.param, preparing=True))

    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            self._want_lp.discard(rid)
            if rid in self._preparing:
                self._aborted_early.add(rid)  # not in the engine yet: _submit drops it
            else:
                self.engine.abort(rid)

    async def poll(self, timeout: float = 1.0) -> PollReply:
        if not self._inbox:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        # While tokens stream, replies go out at most every REPLY_INTERVAL_S, carrying every step since the last:
        # a reply per step costs the engine's thread the GIL once a step. The first output after a quiet spell,
        # a finished request and an error go out at once.
        while self._inbox and not self._urgent:
            hold = self._last_reply + REPLY_INTERVAL_S - time.monotonic()
            if hold <= 0:
                break
            self._event.clear()  # before yielding: a wake-up sent meanwhile runs after this, so none is lost
            try:
                await asyncio.wait_for(self._event.wait(), hold)
            except asyncio.TimeoutError:
                break
        with self._lock:
            items, self._inbox = self._inbox, []
            self._signaled = self._urgent = False
        if items:
            self._last_reply = time.monotonic()
        reply = PollReply()
        for rid, item in items:
            if isinstance(item, BaseException):
                reply.errors[rid] = error_for(item, rid)
                reply.outputs.pop(rid, None)
                self._want_lp.discard(rid)
                continue
            delta = self._delta(rid, item)
            acc = reply.outputs.get(rid)
            reply.outputs[rid] = delta if acc is None else acc.merge(delta)
            if item.finish_reason is not None:
                self._want_lp.discard(rid)
        reply.stats = self.stats()
        reply.dead = None if reply.stats.ok else reply.stats.error
        return reply

    def _delta(self, rid: str, out) -> Delta:
        """An engine output as it goes on the wire: logprobs (when asked for) as text."""
        lps = [self._logprob(e) for e in out.logprobs] if rid in self._want_lp and out.logprobs else None
        return Delta(out.text, list(out.token_ids), lps, out.finish_reason, out.input_token_len,
                     out.generate_token_len, getattr(out, "cached_token_len", 0), getattr(out, "reasoning", ""),
                     getattr(out, "tool_calls", None))

    def _token_text(self, tid: int) -> str:
        s = self._tok_cache.get(tid)
        if s is None:
            s = self._tok_cache[tid] = self.engine.tokenizer.decode([tid], skip_special_tokens=False)
        return s

    def _logprob(self, e: dict) -> TokenLogprob:
        top = sorted(e.get("top_logprobs", {}).items(), key=lambda kv: -kv[1])
        return TokenLogprob(self._token_text(e["token_id"]), e["token_id"], e["logprob"],
                            [(self._token_text(t), lp) for t, lp in top])

    def stats(self) -> EngineStats:
        """The engine's counters, and whether it can serve (`ok`; `error` says why not)."""
        try:
            s = EngineStats.of(self.engine.stats())
        except Exception as e:  # noqa: BLE001
            s = EngineStats(error=repr(e))
        try:
            self.engine.check_health()
            s.ok, s.state = True, "ready"
        except Exception as e:  # noqa: BLE001
            s.ok, s.state, s.error = False, "dead", str(e) or type(e).__name__
        return s

    def shutdown(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
