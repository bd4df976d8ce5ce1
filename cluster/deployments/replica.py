"""The logic of one model replica, without Ray or Serve (tests run it in-process over a local engine): request
fan-out (n choices), batched traffic with rank 0, per-request streams, failure and recovery. Its traffic with rank
0 is batched both ways:

    adds     concurrent arrivals are coalesced into one `add_requests` call (while one call is in flight, the next
             ones queue up and go together)
    aborts   likewise, one `abort` call for many requests
    outputs  one long poll in flight at a time: each reply holds every new output of every request of the replica

When rank 0 (or any rank) dies, or rank 0 stops answering, every in-flight request fails at once with an "engine
unavailable" error (a generic one: the cause is logged, and kept in `last_error` for operators), the group is torn
down and built again, and the replica serves again; if it cannot be rebuilt, `check_health` fails and Serve
replaces the whole replica. No request waits on rank 0 without a bound.

A request with no output for `keepalive_s` (waiting in rank 0's queue, or in a long prefill) gets an empty Deltas,
as long as rank 0 answered a poll within that time (plus a long poll's wait): the router's stall timeout (cluster.serving.failover) then
fires only when the replica, or its rank 0, stops answering.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Protocol

from cluster.messages import (Admitted, Delta, Deltas, EngineRequest, EngineStats, ErrorInfo, Event, Failed, Job,
                              PollReply, ReplicaInfo, Started)
from cluster.workers.client_errors import ENGINE_FAILED

log = logging.getLogger(__name__)

NO_ANSWER = "engine replica did not answer; retry shortly"
KEEPALIVE_S = 5.0  # a request with no output this long gets an empty Deltas, while rank 0 answers polls


class RankZeroClient(Protocol):
    """How a replica calls its rank 0 (a Ray actor, or a RankZeroHost in this process)."""

    async def add_requests(self, reqs: list[EngineRequest]) -> list[Admitted]: ...

    async def abort(self, rids: list[str]) -> None: ...

    async def poll(self, timeout: float) -> PollReply: ...

    async def stats(self) -> EngineStats: ...


@dataclass
class Connection:
    client: RankZeroClient
    info: ReplicaInfo
    close: Callable[[], None]
    watch: Optional[Callable[[], Awaitable[str]]] = None  # returns a reason when the group broke


class RayWorkerClient:
    def __init__(self, actor):
        self.actor = actor

    async def add_requests(self, reqs):
        return await self.actor.add_requests.remote(reqs)

    async def abort(self, rids):
        return await self.actor.abort.remote(rids)

    async def poll(self, timeout):
        return await self.actor.poll.remote(timeout)

    async def stats(self):
        return await self.actor.stats.remote()


class LocalWorkerClient:
    """Rank 0 in this very process (tests; no Ray)."""

    def __init__(self, host):
        self.host = host

    async def add_requests(self, reqs):
        return await self.host.add_requests_async(reqs)

    async def abort(self, rids):
        self.host.abort(rids)

    async def poll(self, timeout):
        return await self.host.poll(timeout)

    async def stats(self):
        return self.host.stats()


def _raise_if_cancelled() -> None:
    """A loop that runs until cancelled must not outlive a cancel that `asyncio.wait_for` swallowed (Python 3.11
    returns the inner result when the cancel lands as the inner call completes): the loop would poll forever."""
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)():
        raise asyncio.CancelledError


class _Stream:
    __slots__ = ("q", "index")

    def __init__(self, q: asyncio.Queue, index: int):
        self.q, self.index = q, index


def _reason(e: BaseException) -> str:
    """One line for the log and `last_error` (operator-facing, never sent to clients)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class ReplicaCore:
    """Request fan-out (n choices), batched traffic with rank 0, per-request streams, failure and recovery.

    Every request ends, answered or with an error: a rank 0 that fails, or takes longer than `call_timeout_s` to
    answer a call (beyond a poll's own wait), fails the replica, and with it every request in flight."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], *, replica_id: str = "local",
                 restart: bool = True, max_restart_attempts: int = 5, poll_timeout: float = 1.0,
                 recovery_timeout_s: float = 600.0, call_timeout_s: float = 60.0, keepalive_s: float = KEEPALIVE_S):
        self.connect = connect
        self.replica_id = replica_id
        self.restart = restart
        self.max_restart_attempts = max_restart_attempts
        self.poll_timeout = poll_timeout
        self.recovery_timeout_s = recovery_timeout_s
        self.call_timeout_s = call_timeout_s
        self.keepalive_s = keepalive_s
        self.last_answer = 0.0  # when rank 0 last answered a poll (time.monotonic)
        self.state = "starting"  # starting | ready | recovering | dead | closed
        self.state_since = time.monotonic()
        self.conn: Connection | None = None
        self.info = ReplicaInfo()
        self.generation = 0
        self.last_error: str | None = None
        self.last_stats = EngineStats()
        self.pending_work = 0
        self.restarts = 0
        self.streams: dict[str, _Stream] = {}
        self._adds: list[tuple[EngineRequest, asyncio.Future]] = []  # queued for the next add_requests call
        self._sending: list[tuple[EngineRequest, asyncio.Future]] = []  # in the add_requests call in flight
        self._aborts: list[str] = []
        self._outbox = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------------------------------------------
    def _set_state(self, s: str) -> None:
        self.state, self.state_since = s, time.monotonic()

    async def start(self) -> None:
        await self._connect_once()

    async def _connect_once(self) -> None:
        conn = await self.connect()
        self.conn, self.info = conn, conn.info
        self.generation += 1
        gen = self.generation
        self._outbox = asyncio.Event()
        loops = [self._poll_loop(gen, conn), self._send_loop(gen, conn)]
        if conn.watch is not None:
            loops.append(self._watch(gen, conn))
        self._tasks = [asyncio.create_task(self._guarded(gen, loop)) for loop in loops]
        self._set_state("ready")
        if self._adds or self._aborts:
            self._outbox.set()

    def _fail(self, gen: int, reason: str, public: bool = False) -> None:
        """Rank 0 (or the group) is gone: fail everything in flight now, then rebuild. Clients get a generic
        message, unless the reason is `public` (written by us: which rank was lost): other reasons may hold another
        request's text, and go to the log and `last_error` only."""
        if gen != self.generation or self.state != "ready":
            return
        log.error("engine replica %s failed: %s", self.replica_id, reason)
        self.last_error = reason
        self._set_state("recovering" if self.restart else "dead")
        message = f"{ENGINE_FAILED} ({reason})" if public else ENGINE_FAILED
        self._end_requests(ErrorInfo("engine_dead", message, retry_after=5))
        self._disconnect()
        if self.restart:
            self._tasks = [asyncio.create_task(self._recover())]

    def _end_requests(self, err: ErrorInfo) -> None:
        """Every stream and every add not yet answered (queued or in flight) gets `err`: nothing waits on."""
        for s in list(self.streams.values()):
            s.q.put_nowait((s.index, err))
        adds = self._adds + self._sending
        self._adds, self._sending, self._aborts = [], [], []
        for _, fut in adds:
            if not fut.done():
                fut.set_result(Admitted(error=err))

    def _disconnect(self) -> None:
        """Stop this generation's loops and close its group."""
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the worker group of engine replica %s", self.replica_id)

    async def _recover(self) -> None:
        for attempt in range(self.max_restart_attempts):
            try:
                await self._connect_once()
                self.restarts += 1
                log.warning("engine replica %s is back (restart %d)", self.replica_id, self.restarts)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.last_error = f"restart failed: {_reason(e)}"
                log.error("engine replica %s: %s", self.replica_id, self.last_error)
                await asyncio.sleep(min(30.0, 2.0 ** attempt))
        self._set_state("dead")

    def check_health(self) -> None:
        """For Serve's health check: raise when the replica cannot serve and will not by itself."""
        if self.state == "dead":
            raise RuntimeError(f"engine replica is dead: {self.last_error}")
        if self.state == "recovering" and time.monotonic() - self.state_since > self.recovery_timeout_s:
            raise RuntimeError(f"engine replica has been recovering for too long: {self.last_error}")

    async def close(self) -> None:
        if self.state == "closed":
            return
        self._set_state("closed")
        self._end_requests(ErrorInfo("unavailable", "engine replica is shutting down; retry", retry_after=5))
        self._disconnect()

    # -- background loops -----------------------------------------------------------------------------------------
    async def _guarded(self, gen: int, loop: Awaitable[None]) -> None:
        """Run one of a generation's loops; whatever breaks it (the actor died, a reply made no sense) fails the
        replica, so no stream is left waiting on a loop that is gone."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(gen, _reason(e))

    async def _answer(self, call: Awaitable, what: str, wait: float = 0.0):
        """Rank 0's answer to one call, or TimeoutError once it is `call_timeout_s` late (beyond its own `wait`)."""
        limit = wait + self.call_timeout_s
        try:
            return await asyncio.wait_for(call, limit)
        except asyncio.TimeoutError:
            raise TimeoutError(f"rank 0 did not answer {what} within {limit:.1f} s") from None

    async def _poll_loop(self, gen: int, conn: Connection) -> None:
        while gen == self.generation and self.state == "ready":
            _raise_if_cancelled()
            reply: PollReply = await self._answer(conn.client.poll(self.poll_timeout), "a poll", self.poll_timeout)
            if gen != self.generation:
                return
            self.last_answer = time.monotonic()
            if reply.stats is not None:
                self.last_stats = reply.stats
            for rid, out in reply.outputs.items():
                s = self.streams.get(rid)
                if s is not None:
                    s.q.put_nowait((s.index, out))
            for rid, err in reply.errors.items():
                s = self.streams.get(rid)
                if s is not None:
                    s.q.put_nowait((s.index, err))
            if reply.dead:
                self._fail(gen, str(reply.dead))
                return

    async def _send_loop(self, gen: int, conn: Connection) -> None:
        while gen == self.generation:
            _raise_if_cancelled()
            await self._outbox.wait()
            self._outbox.clear()
            aborts, self._aborts = self._aborts, []
            if self._adds:
                adds, self._adds = self._adds, []
                self._sending = adds  # where _fail finds them while the call is in flight
                results = await self._answer(conn.client.add_requests([item for item, _ in adds]), "add_requests")
                self._sending = []
                for (_, fut), r in zip(adds, results):
                    if not fut.done():
                        fut.set_result(r)
            if aborts:
                await self._answer(conn.client.abort(aborts), "abort")

    async def _watch(self, gen: int, conn: Connection) -> None:
        reason = await conn.watch()
        self._fail(gen, reason, public=True)  # WorkerGroup.watch says which rank ended, and how

    # -- requests ----------------------------------------------------------------------------------------------------
    def _add(self, item: EngineRequest) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._adds.append((item, fut))
        self._outbox.set()
        return fut

    def _abort(self, rids: list[str]) -> None:
        if rids and self.state == "ready":
            self._aborts.extend(rids)
            self._outbox.set()

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        """Started once every choice is queued (or Failed instead), then Deltas (each choice's output merged since
        the last event) until every choice finished; Failed mid-stream ends it. Closing the iterator early (client
        gone) aborts every choice still running."""
        if self.state != "ready":  # last_error is the operator's (see EngineReplica.info), not the client's
            yield Failed(ErrorInfo("unavailable", f"engine replica is {self.state}; retry shortly", retry_after=5))
            return
        q: asyncio.Queue = asyncio.Queue()
        rids: dict[int, str] = {}
        items = []
        for c in job.choices:
            rid = rids[c.index] = f"{job.request_id}-{c.index}"
            self.streams[rid] = _Stream(q, c.index)
            items.append(EngineRequest(rid, c.prompt, c.gen, job.logprobs, job.param, list(c.resume_ids)))
        running = set(rids)  # aborted on the way out, unless rank 0 says they never started
        work = job.work
        self.pending_work += work
        try:
            try:
                results: list[Admitted] = await asyncio.wait_for(
                    asyncio.gather(*[self._add(it) for it in items]), self.call_timeout_s)
            except asyncio.TimeoutError:
                log.error("engine replica %s: no answer to the add of %s within %.1f s", self.replica_id,
                          job.request_id, self.call_timeout_s)
                yield Failed(ErrorInfo("unavailable", NO_ANSWER, retry_after=5))
                return
            running = {idx for idx, r in zip(rids, results) if r.ok}
            errors = [r.error for r in results if not r.ok]
            if errors:
                yield Failed(errors[0])
                return
            yield Started({idx: r.prompt_tokens for idx, r in zip(rids, results)}, self.replica_id)
            while running:
                try:
                    events = [q.get_nowait() if not q.empty() else await asyncio.wait_for(q.get(), self.keepalive_s)]
                except asyncio.TimeoutError:
                    if time.monotonic() - self.last_answer < self.keepalive_s + self.poll_timeout:  # a long poll
                        yield Deltas({})  # a keep-alive: rank 0 answers, this request just has no output yet
                    continue
                while not q.empty():
                    events.append(q.get_nowait())
                deltas: dict[int, Delta] = {}
                for idx, payload in events:
                    if isinstance(payload, ErrorInfo):
                        yield Failed(payload)
                        return
                    if idx not in running:
                        continue
                    deltas[idx] = deltas[idx].merge(payload) if idx in deltas else payload
                    if payload.finish_reason is not None:
                        running.discard(idx)
                used = min(sum(len(d.token_ids) for d in deltas.values()), work)
                work -= used
                self.pending_work -= used
                if deltas:
                    yield Deltas(deltas)
        finally:
            for rid in rids.values():
                self.streams.pop(rid, None)
            self._abort([rids[i] for i in running])
            self.pending_work -= work

    def routing_stats(self) -> dict:
        """For Serve's request router (PendingWorkRouter reads pending_work)."""
        s = self.last_stats
        return {"pending_work": self.pending_work, "num_waiting": s.num_waiting or 0, "kv_usage": s.kv_usage or 0.0,
                "state": self.state}
