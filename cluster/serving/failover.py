"""Mid-stream failover (issue 16, part 2): when the engine replica serving a request dies or stops answering, the
request goes on on another replica, in the same response. The client sees no error, no repeated and no missing
text, and `usage` counts the whole answer.

How: the router knows every token id it has passed on (each Delta carries them). It sends a continuation Job:
each unfinished choice with its original prompt and those ids as `resume_ids` (rank 0 appends them to the prompt's
own token ids, so the resumed prompt is token-exact, chat templates included, and the new detokenizer decodes with
the sent tokens as context), max_tokens (and min_tokens) less what was sent, and the dead replica in
`exclude_replicas` (the request routers skip it while another is left). Greedy requests then give the tokens an
uninterrupted run gives; seeded ones too, as each token's noise comes from (seed, position)
(cluster.engine.sampler.position_seed). The continuation's counts are shifted back: prompt tokens are the original
prompt's, completion tokens all the answer's. Moves are bounded (MAX_MOVES); with no replica left the stream ends
with a clear 503 error.

A replica that stops answering counts as failed too: when a running request's stream yields no event for
`stall_timeout_s`, its stream is closed (the replica aborts it, if it still can) and the request moves as from a
death. A replica sends a keep-alive (an empty Deltas) every few seconds while its rank 0 answers polls
(ReplicaCore.KEEPALIVE_S), so a request waiting in a queue or in a long prefill does not look stalled.

The tokens sent are the whole story: the new replica replays them through the request's detokenizer, parsers and
grammar (cluster.engine.resume), so text held back at the move, a tool call begun before it, and penalties over the
output come out as in an uninterrupted run.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Callable, Optional

from cluster.messages import Choice, Delta, Deltas, ErrorInfo, Event, Failed, Job, Started
from cluster.serving.backends import Backend, EventStream

log = logging.getLogger(__name__)

MAX_MOVES = 3  # continuations one request may need before it fails
STALL_TIMEOUT_S = 30.0  # no event (keep-alives included) this long: the replica is treated as failed
RETRY_DELAY_S = 0.5  # between attempts whose replica refused at once (still recovering): doubled each time
DEATH_KINDS = frozenset({"engine_dead", "unavailable"})  # Failed kinds that mean the replica, not the request
DEATH_EXCEPTIONS = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
                              "DeploymentUnavailableError"})  # a Serve handle's errors when the replica is gone
NO_REPLICA_LEFT = "no engine replica could continue this request after its replica failed; retry shortly"


class ReplicaStalled(Exception):
    """The replica sent nothing (not even a keep-alive) for the stall timeout: treated as a death."""


def no_replica_left(cause: Event | BaseException) -> str:
    """The error that ends a request no replica could take over, with what failed first (say a tensor-parallel
    rank's death): the client learns both why it stopped and that retrying may work."""
    what = cause.error.message if isinstance(cause, Failed) else str(cause) or type(cause).__name__
    return f"{what}; {NO_REPLICA_LEFT}" if what else NO_REPLICA_LEFT


def replica_failed(what: Event | BaseException) -> bool:
    """True when `what` (an event or a handle's exception) says the replica is gone or not answering, so another
    replica may continue the request; a request's own errors (bad prompt, aborted) are not retried."""
    if isinstance(what, Failed):
        return what.error.kind in DEATH_KINDS
    return isinstance(what, ReplicaStalled) or (
        isinstance(what, BaseException) and type(what).__name__ in DEATH_EXCEPTIONS)


def continuation(job: Job, sent: dict[int, list[int]], finished: set[int], exclude: list[str],
                 attempt: int) -> Optional[Job]:
    """The Job that continues `job`'s unfinished choices from the tokens already `sent` (per choice index), or
    None when every choice has finished. Its request id is new, so no replica confuses it with the original."""
    choices = []
    for c in job.choices:
        if c.index in finished:
            continue
        ids = sent.get(c.index, [])
        gen = dict(c.gen)
        if gen.get("max_new_tokens") is not None:
            gen["max_new_tokens"] = max(1, gen["max_new_tokens"] - len(ids))
        if gen.get("min_new_tokens"):
            gen["min_new_tokens"] = max(0, gen["min_new_tokens"] - len(ids))
        choices.append(Choice(c.index, c.prompt, gen, list(c.resume_ids) + list(ids)))
    if not choices:
        return None
    return replace(job, request_id=f"{job.request_id}-f{attempt}", choices=choices, exclude_replicas=list(exclude))


def shifted(d: Delta, generated_before: int, prompt_tokens: int, cached_tokens: int) -> Delta:
    """A continuation's Delta as the original request's: its completion count goes on from what was sent, its
    prompt and cache counts are the original prompt's (the resumed prompt also holds the sent tokens)."""
    out = d.copy()
    out.generate_token_len = d.generate_token_len + generated_before if d.generate_token_len else 0
    out.input_token_len = prompt_tokens
    out.cached_token_len = cached_tokens
    return out


class FailoverStream(EventStream):
    """A job's events that survive replica failures: wraps the first replica's stream (past its Started) and, when
    that replica fails, goes on with a continuation on another one. The caller (ResponseBuilder) sees one stream of
    Deltas, then its end or a Failed that is the request's own, or that no replica was left."""

    def __init__(self, backend: Backend, job: Job, events: EventStream, first: Started,
                 on_move: Callable[[str, int], None] = lambda outcome, moved: None, max_moves: int = MAX_MOVES,
                 stall_timeout_s: float = STALL_TIMEOUT_S):
        super().__init__(self._run(), self._close_current)
        self.backend, self.job, self.first, self.on_move, self.max_moves = backend, job, first, on_move, max_moves
        self.stall_timeout_s = stall_timeout_s
        self.current = events
        self.replica = first.replica
        self.exclude: list[str] = []
        self.moves = 0  # continuations tried
        self.moved = 0  # ... of which a replica took over
        self.sent: dict[int, list[int]] = {c.index: [] for c in job.choices}  # token ids the client has
        self.finished: set[int] = set()
        self.cached: dict[int, int] = {}  # the first replica's prefix-cache hit per choice
        self.offset: dict[int, int] = {}  # tokens sent before the current replica took over, per choice
        self.closed = False

    def _close_current(self) -> None:
        self.closed = True
        if self.current is not None:
            self.current.close()

    def _see(self, ev: Deltas) -> Deltas:
        """Record what passes to the client; a continuation's counts shifted to the original request's."""
        out = {}
        for i, d in ev.choices.items():
            if i in self.offset:
                d = shifted(d, self.offset[i], self.first.prompt_tokens.get(i, 0), self.cached.get(i, 0))
            else:
                self.cached[i] = d.cached_token_len
            self.sent.setdefault(i, []).extend(d.token_ids)
            if d.finish_reason is not None:
                self.finished.add(i)
            out[i] = d
        return Deltas(out)

    async def _next(self, events: EventStream) -> Event:
        """The stream's next event, or ReplicaStalled when none comes within the stall timeout."""
        try:
            return await asyncio.wait_for(events.__anext__(), self.stall_timeout_s)
        except asyncio.TimeoutError:
            raise ReplicaStalled(f"engine replica {self.replica or '?'} sent nothing for "
                                 f"{self.stall_timeout_s:g} s") from None

    async def _run(self):
        while True:
            failure: Event | BaseException | None = None
            try:
                while True:
                    try:
                        ev = await self._next(self.current)
                    except StopAsyncIteration:
                        break
                    if isinstance(ev, Failed):
                        failure = ev
                        break
                    if isinstance(ev, Deltas) and ev.choices:  # an empty one is a keep-alive
                        yield self._see(ev)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:  # noqa: BLE001 - the handle's own errors: a dead replica is retried below
                failure = e
            if failure is None:
                return
            if self.closed or not replica_failed(failure):
                if isinstance(failure, BaseException):
                    raise failure
                yield failure
                return
            ended = await self._move(failure)
            if ended is not None:
                yield ended
                return
            if self.current is None:  # every choice had finished
                return

    async def _move(self, why: Event | BaseException) -> Optional[Failed]:
        """Continue on another replica; None when one took over (self.current is its stream, or None when nothing
        was left to continue), else the Failed that ends the request."""
        self.current.close()
        if self.replica and self.replica not in self.exclude:
            self.exclude.append(self.replica)
        log.warning("request %s: engine replica %s failed (%s); continuing elsewhere", self.job.request_id,
                    self.replica or "?", why.error.kind if isinstance(why, Failed) else type(why).__name__)
        delay = RETRY_DELAY_S
        while self.moves < self.max_moves and not self.closed:
            self.moves += 1
            job = continuation(self.job, self.sent, self.finished, self.exclude, self.moves)
            if job is None:
                self.current = None
                return None
            events = self.backend.generate(job)
            try:
                first = await self._next(events)
            except (asyncio.CancelledError, GeneratorExit):
                events.close()
                raise
            except Exception as e:  # noqa: BLE001
                events.close()
                if not replica_failed(e):
                    raise
                first = None
            if isinstance(first, Started):
                self.current, self.replica = events, first.replica
                self.offset = {c.index: len(self.sent.get(c.index, [])) for c in job.choices}
                self.moved += 1
                self.on_move("moved", self.moved)
                log.warning("request %s continues on engine replica %s (move %d)", self.job.request_id,
                            first.replica, self.moves)
                return None
            if isinstance(first, Failed):
                events.close()
                if not replica_failed(first):
                    return first
            await asyncio.sleep(delay)  # that replica refused at once (recovering): give the others a moment
            delay *= 2
        self.on_move("exhausted", self.moved)
        return Failed(ErrorInfo("unavailable", no_replica_left(why), retry_after=5))
