"""One Ray Serve deployment per model; each replica is one model replica (one worker group: TP ranks in one
placement group). `--replicas R` gives R replicas: data parallelism. `EngineReplica` is the Serve deployment class
around a ReplicaCore (cluster.deployments.replica), which owns the streams back to the router.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import AsyncIterator, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.deployments.naming import WorkerNames
from cluster.deployments.replica import Connection, RayWorkerClient, ReplicaCore
from cluster.messages import Event, Job, ReplicaInfo


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
        names = WorkerNames(self.app, self.deployment, self.replica, self._gen)
        group = await WorkerGroup.create(self.spec.group_spec(), names)
        return Connection(RayWorkerClient(group.rank0), group.info, group.kill,
                          group.watch if len(group.workers) > 1 else None)

    async def generate(self, job: Job) -> AsyncIterator[Event]:
        async for ev in self.core.generate(job):
            yield ev

    async def info(self) -> ReplicaInfo:
        return replace(self.core.info, state=self.core.state, replica=self.replica, restarts=self.core.restarts,
                       last_error=self.core.last_error)

    def check_health(self) -> None:
        self.core.check_health()

    def record_routing_stats(self) -> dict:
        return self.core.routing_stats()

    async def __del__(self):
        await self.core.close()
