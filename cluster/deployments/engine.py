"""One Ray Serve deployment per model; each replica is one model replica (one worker group: TP ranks in one
placement group). `--replicas R` gives R replicas: data parallelism. `EngineReplica` is the Serve deployment class
around a ReplicaCore (cluster.deployments.replica), which owns the streams back to the router.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import AsyncIterator, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.deployments.naming import WorkerNames
from cluster.deployments.replica import Connection, RayWorkerClient, ReplicaCore
from cluster.messages import Event, Job, ReplicaInfo


# -- what one model's deployment is made of --------------------------------------------------------------------------
class Autoscaling(BaseModel):
    """Serve replica autoscaling of one model (a subset of Serve's AutoscalingConfig, typo-proof). A replica Serve
    adds asks for a placement group of GPU bundles; on KubeRay that pending demand is what makes the Ray autoscaler
    add a GPU worker pod, and an idle pod is removed after the autoscaler's idle timeout. A replica Serve removes
    drains first (ModelSpec.drain_timeout_s)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="0 lets the model scale to zero (the next request waits for a "
                              "node and a model load: minutes on GPUs)")
    max_replicas: int = Field(1, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing_requests: float = Field(64.0, gt=0, description="requests in flight per replica Serve aims at; "
                                           "keep it below max_batch_size so a replica is added before a queue builds")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s {self.look_back_period_s:g} must exceed metrics_interval_s "
                             f"{self.metrics_interval_s:g} (Serve averages the samples of that window): raise "
                             "look_back_period_s or lower metrics_interval_s")
        return self


class ModelSpec(BaseModel):
    """One served model: the Serve config's `args.models[]` entry and `cluster serve`'s options."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, description="checkpoint dir / .gguf / converted dir; None: embedded SmolLM2")
    name: Optional[str] = Field(None, description="model id clients send; default: the engine's model name")
    replicas: int = Field(1, ge=1, description="model replicas (data parallelism); with autoscaling_config, "
                          "leave it at 1 and set autoscaling_config.initial_replicas")
    autoscaling_config: Optional[Autoscaling] = Field(None, description="Serve replica autoscaling; None: fixed replicas")
    engine: dict = Field(default_factory=dict, description="EngineConfig fields (tp, session_len, ...)")
    use_gpu: Optional[bool] = Field(None, description="true: one GPU per TP rank, and a replica waits (its placement "
                                    "group pending, logged) until GPU nodes join, never falling back to CPUs; false: "
                                    "CPUs only; None: GPUs when the cluster has any at placement time (local use)")
    cpus_per_worker: float = Field(1.0, gt=0)
    max_waiting: int = Field(4096, ge=1, description="engine queue length beyond which requests get 503")
    max_ongoing_requests: int = Field(1024, ge=1, description="requests one replica takes at a time")
    max_queued_requests: int = Field(4096, ge=-1, description="requests waiting for a replica before 503; -1: no limit")
    health_check_period_s: float = Field(5.0, gt=0)
    drain_timeout_s: float = Field(60.0, gt=0, description="a replica Serve stops (redeploy, scale-down) takes no "
                                   "new requests and lets those in flight finish this long before its workers "
                                   "are killed; the router moves any still running to another replica")
    recovery_timeout_s: float = Field(600.0, gt=0, description="a replica rebuilding longer than this is unhealthy")
    routing: str = Field("cache_aware", pattern="^(cache_aware|pending_work|serve_default)$",
                         description="replica choice: cache_aware (the replica holding the longest prefix of the "
                         "prompt, unless overloaded; cluster.serving.affinity), pending_work (least pending work "
                         "of two), serve_default (Serve's own)")
    affinity_margin_tokens: int = Field(2048, ge=0, description="cache_aware: the extra pending work (tokens) a "
                                        "replica holding the prefix may have over the least-loaded one and still "
                                        "get the request (or half the least-loaded one's, if more)")

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict) -> dict:
        from cluster.config import EngineConfig

        return EngineConfig(**v).model_dump(exclude_defaults=True)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.autoscaling_config is not None and self.replicas != 1:
            raise ValueError("replicas and autoscaling_config are both set: give autoscaling_config.initial_replicas "
                             "(or min_replicas) instead of replicas")
        if self.use_gpu and self.engine.get("device") == "cpu":
            raise ValueError("use_gpu is true but engine.device is 'cpu': drop one of them")
        return self

    def serve_options(self) -> dict:
        """The replica count part of serve.deployment options: fixed, or Serve's autoscaling."""
        if self.autoscaling_config is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": self.autoscaling_config.model_dump(exclude_none=True)}

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
