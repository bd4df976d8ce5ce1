"""The Serve application: an HTTP ingress (the OpenAI API of cluster.serving) in front of one engine deployment
per model (cluster.deployments.engine).

`build_app(args)` is the Serve application builder (`import_path: cluster.router:build_app` in a Serve config, or
`cluster serve`). Requests are validated by the router, sent as a Job (cluster.messages) to the model's engine
deployment through a Serve handle, and answered from its events. Replica choice (cluster.serving.replica_choice)
is `CacheAwareRouter` by default: the replica holding the longest prefix of the prompt, unless it is overloaded,
else `PendingWorkRouter`'s (two random replicas, the one with less pending work). This module imports no torch:
the router process holds no model.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from cluster.admission import MAX_REQUEST_BYTES
from cluster.serving.failover import STALL_TIMEOUT_S
from cluster.serving.replica_choice import make_request_routers
from cluster.serving.server import OpenAIServer

ROUTER_DRAIN_TIMEOUT_S = 300.0  # an old router replica streams on this long after a redeploy (Serve's default: 20)
FAILOVER_MARGIN_S = 30.0  # a router outlives its engines' drain by this: time to move a request cut off there


# -- the Serve application ------------------------------------------------------------------------------------------
class ServeArgs(BaseModel):
    """Arguments of `build_app`: the `args:` of a Serve config application, or `cluster serve`'s options."""

    model_config = ConfigDict(extra="forbid")

    models: list[Any] = Field(default_factory=lambda: [{}], description="ModelSpec entries (cluster.deployments.engine)")
    api_key: Optional[str] = Field(None, description="require 'Authorization: Bearer <key>'; default: $CLUSTER_API_KEY")
    max_request_bytes: int = Field(MAX_REQUEST_BYTES, ge=1024, description="larger request bodies get 413")
    image_dir: Optional[str] = Field(None, description="image_url may name files under this directory (relative "
                                     "to it); otherwise only inline data: URLs are accepted over HTTP")
    router_replicas: int = Field(1, ge=1)
    stall_timeout_s: float = Field(STALL_TIMEOUT_S, gt=0, description="a running request whose engine replica sends "
                                   "nothing, not even its 5 s keep-alive, this long moves to another replica")
    router_max_ongoing_requests: int = Field(10000, ge=1)
    router_drain_timeout_s: float = Field(
        ROUTER_DRAIN_TIMEOUT_S, gt=0, description="a router replica Serve replaces (redeploy) or removes keeps "
        "streaming the responses it has in flight this long; at least every model's drain_timeout_s plus "
        f"{FAILOVER_MARGIN_S:.0f} s, so a stream cut off on an engine replica is moved before its router stops")

    def specs(self):
        from cluster.deployments.engine import ModelSpec

        specs = [ModelSpec.model_validate(m) for m in self.models]
        if not specs:
            raise ValueError("at least one model is needed")
        names = [s.deployment_name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a deployment name ({names}); give each a distinct 'name'")
        longest = max(s.drain_timeout_s for s in specs)
        if self.router_drain_timeout_s < longest + FAILOVER_MARGIN_S:
            raise ValueError(f"router_drain_timeout_s {self.router_drain_timeout_s:g} must be at least the longest "
                             f"drain_timeout_s ({longest:g}) + {FAILOVER_MARGIN_S:g}: raise router_drain_timeout_s "
                             "or lower drain_timeout_s")
        return specs


class RouterIngress:
    """The ingress deployment class (wrapped by serve.ingress in build_app)."""

    async def __init__(self, args: dict, *engines):
        from ray import serve

        a = ServeArgs.model_validate(args)
        ctx = serve.get_replica_context()
        from cluster.serving.backends import ServeBackend

        backends = [ServeBackend(h, spec.name, ctx.app_name, spec.deployment_name)
                    for h, spec in zip(engines, a.specs())]
        self.server = OpenAIServer(backends, api_key=a.api_key or os.environ.get("CLUSTER_API_KEY"),
                                   max_request_bytes=a.max_request_bytes, image_dir=a.image_dir,
                                   stall_timeout_s=a.stall_timeout_s)

    def __serve_build_asgi_app__(self):
        from cluster.serving.app import create_app

        return create_app(self.server)

    async def drain(self) -> int:
        """Refuse new requests from now on (503); returns how many are still in flight."""
        self.server.draining = True
        return self.server.in_flight

    async def num_in_flight(self) -> int:
        return self.server.in_flight


def build_app(args: dict | ServeArgs | None = None):
    """Serve application builder: `import_path: cluster.router:build_app` with `args:` as ServeArgs."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from cluster.deployments.engine import EngineReplica

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args or {}))
    engines = []
    for spec in a.specs():
        opts: dict[str, Any] = dict(
            name=spec.deployment_name, **spec.serve_options(), max_ongoing_requests=spec.max_ongoing_requests,
            max_queued_requests=spec.max_queued_requests, ray_actor_options={"num_cpus": 0},
            health_check_period_s=spec.health_check_period_s, health_check_timeout_s=60,
            graceful_shutdown_timeout_s=spec.drain_timeout_s, graceful_shutdown_wait_loop_s=1)
        if spec.routing != "serve_default":
            kwargs: dict[str, Any] = {"deployment": spec.deployment_name}
            if spec.routing == "cache_aware":
                kwargs["margin_tokens"] = spec.affinity_margin_tokens
            opts["request_router_config"] = RequestRouterConfig(
                request_router_class=make_request_routers()[spec.routing], request_router_kwargs=kwargs,
                request_routing_stats_period_s=2.0)
        engines.append(serve.deployment(EngineReplica).options(**opts).bind(spec.model_dump()))
    ingress = serve.deployment(serve.ingress()(RouterIngress)).options(
        name="router", num_replicas=a.router_replicas, max_ongoing_requests=a.router_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=a.router_drain_timeout_s,
        graceful_shutdown_wait_loop_s=1)
    return ingress.bind(a.model_dump(), *engines)
