"""One rank of a model replica, as a Ray actor (`RankWorker`); rank 0's requests go to its RankZeroHost.

Rank 0 runs the engine's step loop on a thread of its own process (cluster.engine.async_engine.AsyncEngine); ranks
1..N-1 run the tensor-parallel follower loop and get each step's plan from rank 0 over torch.distributed, never
through Ray. Ray carries only requests in and tokens out, batched, as the typed messages of cluster.messages.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback

from cluster.engine.build import build_engine
from cluster.executor import resolve_model
from cluster.messages import Admitted, EngineRequest, EngineStats, ErrorInfo, PollReply, ReplicaInfo
from cluster.workers.host import RankZeroHost

log = logging.getLogger(__name__)


class RankWorker:
    """The Ray actor of one rank (created by cluster.workers.group with `ray.remote(RankWorker)`; async methods,
    so poll's long wait never blocks add/abort/health)."""

    def __init__(self, rank: int, world_size: int, model: str | None, engine_config: dict,
                 max_waiting: int = 4096, num_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.model, self.engine_config, self.max_waiting = model, engine_config, max_waiting
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.host: RankZeroHost | None = None
        self.state = "created"
        self.error: str | None = None
        self.started = time.time()

    def address(self) -> str:
        """init_method for the group's rendezvous: this node's IP and a port free on it (rank 0 hosts the store)."""
        import ray

        from cluster.executor.tp_groups import free_port

        ip = ray.util.get_node_ip_address()
        port = free_port()
        os.environ.update(MASTER_ADDR=ip, MASTER_PORT=str(port))
        return f"tcp://{ip}:{port}"

    def _dist_env(self, init_method: str | None) -> None:
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if init_method:
            host, _, port = init_method[len("tcp://"):].rpartition(":")
            os.environ.update(MASTER_ADDR=host, MASTER_PORT=port)

    async def start(self, init_method: str | None = None) -> ReplicaInfo:
        """Rank 0: build the engine (weights, KV cache, step loop); returns its facts."""
        assert self.rank == 0, "start() is rank 0's; other ranks call run_follower()"
        self._dist_env(init_method)
        self.state = "loading"
        try:
            engine = await asyncio.to_thread(build_engine, self.model, self.engine_config, init_method,
                                             self.max_waiting)
        except BaseException as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("rank 0 failed to start: %s", traceback.format_exc())
            raise
        self.host = RankZeroHost(engine, asyncio.get_running_loop())
        self.state = "ready"
        return self.host.info()

    async def run_follower(self, init_method: str) -> int:
        """Ranks > 0: join rank 0's group and run its steps until it closes (returns) or the group breaks (raises).
        The caller keeps this call's ObjectRef: its completion means this rank is gone."""
        from cluster.config import EngineConfig
        from cluster.executor.tp import run_follower

        self._dist_env(init_method)
        ec = EngineConfig(**self.engine_config)
        self.state = "loading"
        model_dir, _, session_len = await asyncio.to_thread(resolve_model, self.model, ec)
        self.state = "ready"
        try:
            return await asyncio.to_thread(run_follower, model_dir, ec, session_len, self.rank, self.world_size,
                                           init_method)
        except BaseException as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            raise

    def abort_group(self, reason: str) -> None:
        """Rank 0: a follower is gone; fail every step from now on (and break a collective that waits on it)."""
        if self.host is not None:
            runner = getattr(self.host.engine.engine, "runner", None)
            if hasattr(runner, "abort"):
                runner.abort(reason)

    # -- rank 0's request interface (batched; see cluster.workers.host) --------------------------------------------
    async def add_requests(self, reqs: list[EngineRequest]) -> list[Admitted]:
        if self.host is None:
            return [Admitted(error=ErrorInfo("unavailable", f"engine is {self.state}"))] * len(reqs)
        return await self.host.add_requests_async(reqs)

    def abort(self, rids: list[str]) -> None:
        if self.host is not None:
            self.host.abort(rids)

    async def poll(self, timeout: float = 1.0) -> PollReply:
        if self.host is None:
            await asyncio.sleep(timeout)
            return PollReply()
        return await self.host.poll(timeout)

    def stats(self) -> EngineStats:
        if self.host is None:
            return EngineStats(ok=False, state=self.state, error=self.error or f"engine is {self.state}")
        return self.host.stats()

    def info(self) -> ReplicaInfo:
        return self.host.info() if self.host is not None else ReplicaInfo()

    def shutdown(self) -> None:
        if self.host is not None:
            self.host.shutdown()
