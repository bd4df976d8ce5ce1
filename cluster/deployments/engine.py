"""One Ray Serve deployment per model; each replica is one model replica (one worker group: TP ranks in one
placement group). `--replicas R` gives R replicas: data parallelism.

A replica owns the streams back to the router. Its traffic with rank 0 is batched both ways:

    adds     concurrent arrivals are coalesced into one `add_requests` call (while one call is in flight, the next
             ones queue up and go together)
    aborts   likewise, one `abort` call for many requests
    outputs  one long poll in flight at a time: each reply holds every new output of every request of the replica

`ReplicaCore` is that logic without Ray or Serve (tests run it in-process over a local engine); `EngineReplica` is
the Serve deployment class around it. When rank 0 (or any rank) dies, or rank 0 stops answering, every in-flight
request fails at once with an "engine unavailable" error (a generic one: the cause is logged, and kept in
`last_error` for operators), the group is torn down and built again, and the replica serves again; if it cannot be
rebuilt, `check_health` fails and Serve replaces the whole replica. No request waits on rank 0 without a bound.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.protocol import error_dict
from cluster.workers.worker import ENGINE_FAILED

log = logging.getLogger(__name__)

NO_ANSWER = "engine replica did not answer; retry shortly"

WORKER_PREFIX = "cluster-rank"  # named actors: cluster-rank{r}|{app}|{deployment}|{replica}|{generation}


# -- what one model's deployment is made of --------------------------------------------------------------------------
class ModelSpec(BaseModel):
    """One served model: the Serve config's `args.models[]` entry and `cluster serve`'s options."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="checkpoint dir / .gguf / converted dir; None: embedded SmolLM2")
    name: Optional[str] = Field(None, description="model id clients send; default: the engine's model name")
    replicas: int = Field(1, ge=1, description="model replicas (data parallelism)")
    engine: dict = Field(default_factory=dict, description="EngineConfig fields (tp, session_len, ...)")
    use_gpu: Optional[bool] = Field(None, description="None: GPUs when the cluster has any")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_waiting: int = Field(4096, ge=1, description="engine queue length beyond which requests get 503")
    max_ongoing_requests: int = Field(1024, ge=1, description="requests one replica takes at a time")
    max_queued_requests: int = Field(4096, ge=-1, description="requests waiting for a replica before 503; -1: no limit")
    health_check_period_s: float = Field(5.0, gt=0)
    recovery_timeout_s: float = Field(600.0, gt=0, description="a replica rebuilding longer than this is unhealthy")
    routing: str = Field("pending_work", pattern="^(pending_work|serve_default)$")

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict) -> dict:
        from cluster.config import EngineConfig

        return EngineConfig(**v).model_dump(exclude_defaults=True)

    @property
    def deployment_name(self) -> str:
        from pathlib import Path

        base = self.name or (Path(self.model).name if self.model else "default")
        return "engine-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-") or "model")

    def group_spec(self):
        from cluster.workers.group import GroupSpec

        return GroupSpec(self.model, self.engine, self.use_gpu, self.cpus_per_worker, self.max_waiting)


# -- the link to rank 0 -----------------------------------------------------------------------------------------------
@dataclass
class Connection:
    client: object  # async add_requests(items), abort(rids), poll(timeout), stats(), health()
    info: dict  # {"model_name", "session_len"}
    close: Callable[[], None]
    watch: Optional[Callable[[], Awaitable[str]]] = None  # returns a reason when the group broke


class RayWorkerClient:
    def __init__(self, actor):
        self.actor = actor

    async def add_requests(self, items):
        return await self.actor.add_requests.remote(items)

    async def abort(self, rids):
        return await self.actor.abort.remote(rids)

    async def poll(self, timeout):
        return await self.actor.poll.remote(timeout)

    async def stats(self):
        return await self.actor.stats.remote()

    async def health(self):
        return await self.actor.health.remote()


class LocalWorkerClient:
    """Rank 0 in this very process (tests; no Ray)."""

    def __init__(self, host):
        self.host = host

    async def add_requests(self, items):
        return await self.host.add_requests_async(items)

    async def abort(self, rids):
        self.host.abort(rids)

    async def poll(self, timeout):
        return await self.host.poll(timeout)

    async def stats(self):
        s = self.host.stats()
        s.update(self.host.health())
        return s

    async def health(self):
        return self.host.health()


class _Stream:
    __slots__ = ("q", "index")

    def __init__(self, q: asyncio.Queue, index: int):
        self.q, self.index = q, index


def _reason(e: BaseException) -> str:
    """One line for the log and `last_error` (operator-facing, never sent to clients)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _merge(acc: dict | None, out: dict) -> dict:
    if acc is None:
        return {"text": out["text"], "token_ids": list(out["token_ids"]), "logprobs": out.get("logprobs"),
                "finish_reason": out["finish_reason"], "completion_tokens": out["completion_tokens"],
                "prompt_tokens": out.get("prompt_tokens", 0), "cached_tokens": out.get("cached_tokens", 0)}
    acc["text"] += out["text"]
    acc["token_ids"] += out["token_ids"]
    if out.get("logprobs"):
        acc["logprobs"] = (acc["logprobs"] or []) + out["logprobs"]
    acc["finish_reason"] = out["finish_reason"]
    acc["completion_tokens"] = max(acc["completion_tokens"], out["completion_tokens"])
    acc["cached_tokens"] = out.get("cached_tokens", acc["cached_tokens"])
    return acc


class ReplicaCore:
    """Request fan-out (n choices), batched traffic with rank 0, per-request streams, failure and recovery.

    Every request ends, answered or with an error: a rank 0 that fails, or takes longer than `call_timeout_s` to
    answer a call (beyond a poll's own wait), fails the replica, and with it every request in flight."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], *, replica_id: str = "local",
                 restart: bool = True, max_restart_attempts: int = 5, poll_timeout: float = 1.0,
                 recovery_timeout_s: float = 600.0, call_timeout_s: float = 60.0):
        self.connect = connect
        self.replica_id = replica_id
        self.restart = restart
        self.max_restart_attempts = max_restart_attempts
        self.poll_timeout = poll_timeout
        self.recovery_timeout_s = recovery_timeout_s
        self.call_timeout_s = call_timeout_s
        self.state = "starting"  # starting | ready | recovering | dead | closed
        self.state_since = time.monotonic()
        self.conn: Connection | None = None
        self.info: dict = {}
        self.generation = 0
        self.last_error: str | None = None
        self.last_stats: dict = {}
        self.pending_work = 0
        self.restarts = 0
        self.streams: dict[str, _Stream] = {}
        self._adds: list[tuple[dict, asyncio.Future]] = []  # queued for the next add_requests call
        self._sending: list[tuple[dict, asyncio.Future]] = []  # in the add_requests call in flight
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
        self.conn, self.info = conn, dict(conn.info or {})
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
        self._end_requests(error_dict("engine_dead", message, retry_after=5))
        self._disconnect()
        if self.restart:
            self._tasks = [asyncio.create_task(self._recover())]

    def _end_requests(self, err: dict) -> None:
        """Every stream and every add not yet answered (queued or in flight) gets `err`: nothing waits on."""
        for s in list(self.streams.values()):
            s.q.put_nowait(("error", s.index, err))
        adds = self._adds + self._sending
        self._adds, self._sending, self._aborts = [], [], []
        for _, fut in adds:
            if not fut.done():
                fut.set_result({"ok": False, "error": err})

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
        self._end_requests(error_dict("unavailable", "engine replica is shutting down; retry", retry_after=5))
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
            res = await self._answer(conn.client.poll(self.poll_timeout), "a poll", self.poll_timeout)
            if gen != self.generation:
                return
            if res.get("stats"):
                self.last_stats = res["stats"]
            for rid, out in res.get("outputs", {}).items():
                s = self.streams.get(rid)
                if s is not None:
                    s.q.put_nowait(("out", s.index, out))
            for rid, err in res.get("errors", {}).items():
                s = self.streams.get(rid)
                if s is not None:
                    s.q.put_nowait(("error", s.index, err))
            if res.get("dead"):
                self._fail(gen, str(res["dead"]))
                return

    async def _send_loop(self, gen: int, conn: Connection) -> None:
        while gen == self.generation:
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
    def _add(self, item: dict) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._adds.append((item, fut))
        self._outbox.set()
        return fut

    def _abort(self, rids: list[str]) -> None:
        if rids and self.state == "ready":
            self._aborts.extend(rids)
            self._outbox.set()

    async def generate(self, job: dict) -> AsyncIterator[dict]:
        """Events for one API request (see cluster.protocol for `job`):
            {"type": "start", "prompt_tokens": {index: n}, "replica": id}     first, once every choice is queued
            {"type": "delta", "choices": [{"index", "text", "token_ids", "logprobs", "finish_reason",
                                           "completion_tokens", "cached_tokens"}]}
            {"type": "error", "error": {"kind", "message", ...}}             instead of start, or mid-stream
        Closing the iterator early (client gone) aborts every choice still running."""
        if self.state != "ready":  # last_error is the operator's (see EngineReplica.info), not the client's
            msg = f"engine replica is {self.state}; retry shortly"
            yield {"type": "error", "error": error_dict("unavailable", msg, retry_after=5)}
            return
        base = job["request_id"]
        q: asyncio.Queue = asyncio.Queue()
        rids: dict[int, str] = {}
        items = []
        for c in job["choices"]:
            rid = f"{base}-{c['index']}"
            rids[c["index"]] = rid
            self.streams[rid] = _Stream(q, c["index"])
            items.append({"rid": rid, "prompt": c["prompt"], "gen": c["gen"], "logprobs": job.get("logprobs", False),
                          "param": job.get("param")})
        running = set(rids)  # aborted on the way out, unless rank 0 says they never started
        work = int(job.get("work", 0))
        self.pending_work += work
        try:
            try:
                results = await asyncio.wait_for(asyncio.gather(*[self._add(it) for it in items]),
                                                 self.call_timeout_s)
            except asyncio.TimeoutError:
                log.error("engine replica %s: no answer to the add of %s within %.1f s", self.replica_id, base,
                          self.call_timeout_s)
                yield {"type": "error", "error": error_dict("unavailable", NO_ANSWER, retry_after=5)}
                return
            running = {idx for idx, r in zip(rids, results) if r.get("ok")}
            errors = [r["error"] for r in results if not r.get("ok")]
            if errors:
                yield {"type": "error", "error": errors[0]}
                return
            yield {"type": "start", "prompt_tokens": {idx: r["prompt_tokens"] for idx, r in zip(rids, results)},
                   "replica": self.replica_id}
            while running:
                events = [await q.get()]
                while not q.empty():
                    events.append(q.get_nowait())
                deltas: dict[int, dict] = {}
                for kind, idx, payload in events:
                    if kind == "error":
                        yield {"type": "error", "error": payload}
                        return
                    if idx not in running:
                        continue
                    deltas[idx] = _merge(deltas.get(idx), payload)
                    if payload["finish_reason"] is not None:
                        running.discard(idx)
                produced = sum(len(d["token_ids"]) for d in deltas.values())
                used = min(produced, work)
                work -= used
                self.pending_work -= used
                if deltas:
                    yield {"type": "delta", "choices": [{"index": i, **d} for i, d in deltas.items()]}
        finally:
            for rid in rids.values():
                self.streams.pop(rid, None)
            self._abort([rids[i] for i in running])
            self.pending_work -= work

    def routing_stats(self) -> dict:
        s = self.last_stats
        return {"pending_work": self.pending_work, "num_waiting": s.get("num_waiting", 0),
                "kv_usage": s.get("kv_usage", 0.0), "state": self.state}


# -- the Serve deployment ---------------------------------------------------------------------------------------------
class EngineReplica:
    """Serve deployment class; `build_app` (cluster.router) wraps it with serve.deployment(...) per model."""

    async def __init__(self, spec: dict):
        from ray import serve

        self.spec = ModelSpec.model_validate(spec)
        ctx = serve.get_replica_context()
        self.app, self.deployment = ctx.app_name, ctx.deployment
        self.replica = ctx.replica_id.unique_id
        self._gen = 0
        self.core = ReplicaCore(self._connect, replica_id=self.replica, recovery_timeout_s=self.spec.recovery_timeout_s)
        await self.core.start()

    async def _connect(self) -> Connection:
        from cluster.workers.group import WorkerGroup

        self._gen += 1
        name = f"{WORKER_PREFIX}{{rank}}|{self.app}|{self.deployment}|{self.replica}|{self._gen}"
        group = await WorkerGroup.create(self.spec.group_spec(), name=name)
        return Connection(RayWorkerClient(group.rank0), group.info, group.kill,
                          group.watch if len(group.workers) > 1 else None)

    async def generate(self, job: dict):
        async for ev in self.core.generate(job):
            yield ev

    async def info(self) -> dict:
        return {**self.core.info, "state": self.core.state, "replica": self.replica, "restarts": self.core.restarts,
                "last_error": self.core.last_error}

    def check_health(self) -> None:
        self.core.check_health()

    def record_routing_stats(self) -> dict:
        return self.core.routing_stats()

    async def __del__(self):
        await self.core.close()
