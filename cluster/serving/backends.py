"""How the router reaches one model's engine replicas: a Serve handle (ServeBackend), or a ReplicaCore in this
process (LocalBackend: tests, and serving without Ray). Both answer the same four calls."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator, Protocol

from cluster.messages import EngineStats, Event, Job, ReplicaInfo


class EventStream:
    """Events of one job (see ReplicaCore.generate); `close()` is synchronous (it runs in cancelled code)."""

    def __init__(self, it: AsyncIterator[Event], close=None):
        self._it, self._close = it, close

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        return await self._it.__anext__()

    def close(self) -> None:
        if self._close is not None:
            try:
                self._close()
            except Exception:  # noqa: BLE001
                pass


class Backend(Protocol):
    name: str | None  # the model id clients send; None: the engine's model name

    async def info(self) -> ReplicaInfo: ...

    def generate(self, job: Job) -> EventStream: ...

    async def replicas(self) -> list[EngineStats]: ...

    async def deployment_ok(self) -> tuple[bool, str]: ...


class LocalBackend:
    """A ReplicaCore in this process."""

    def __init__(self, core, name: str | None = None):
        self.core, self.name = core, name

    async def info(self) -> ReplicaInfo:
        return self.core.info

    def generate(self, job: Job) -> EventStream:
        agen = self.core.generate(job)

        def close():  # its `finally` aborts the request
            asyncio.get_running_loop().create_task(agen.aclose())

        return EventStream(agen, close)

    async def replicas(self) -> list[EngineStats]:
        core = self.core
        if core.conn is None:
            return [EngineStats(ok=False, state=core.state, error=core.last_error, replica=core.replica_id)]
        try:
            s = await asyncio.wait_for(core.conn.client.stats(), 5)
        except Exception as e:  # noqa: BLE001
            s = EngineStats(ok=False, error=repr(e))
        s = replace(s, replica=core.replica_id)
        if core.state != "ready":
            s = replace(s, ok=False, state=core.state)
        return [s]

    async def deployment_ok(self) -> tuple[bool, str]:
        return self.core.state == "ready", self.core.state


class ServeBackend:
    """One model's engine deployment, through a Serve handle; rank-0 workers found by name for /metrics, /health."""

    def __init__(self, handle, name: str | None, app: str, deployment: str):
        self.handle, self.name, self.app, self.deployment = handle, name, app, deployment
        self._stream_handle = handle.options(stream=True)

    async def info(self) -> ReplicaInfo:
        return await self.handle.info.remote()

    def generate(self, job: Job) -> EventStream:
        gen = self._stream_handle.generate.remote(job)
        return EventStream(gen.__aiter__(), gen.cancel)

    def _rank0_actors(self) -> list[tuple[str, str | None, str]]:
        """(actor name, namespace, replica id) of this deployment's rank-0 workers."""
        import ray

        from cluster.deployments.naming import WorkerNames

        out = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            name, ns = (a["name"], a["namespace"]) if isinstance(a, dict) else (a, None)
            parsed = WorkerNames.parse(name)
            if parsed and parsed[0] == 0 and (parsed[1].app, parsed[1].deployment) == (self.app, self.deployment):
                out.append((name, ns, parsed[1].replica))
        return out

    async def replicas(self) -> list[EngineStats]:
        import ray

        async def one(name: str, ns: str | None, replica: str) -> EngineStats:
            try:
                s = await asyncio.wait_for(ray.get_actor(name, namespace=ns).stats.remote(), 5)
            except Exception as e:  # noqa: BLE001 - dead or gone: that is what /health reports
                s = EngineStats(ok=False, error=f"{type(e).__name__}: {e}")
            return replace(s, replica=replica)

        actors = await asyncio.to_thread(self._rank0_actors)
        return list(await asyncio.gather(*[one(*a) for a in actors]))

    async def deployment_ok(self) -> tuple[bool, str]:
        from ray import serve

        try:
            st = await asyncio.to_thread(serve.status)
            dep = st.applications[self.app].deployments[self.deployment]
            status = str(getattr(dep.status, "value", dep.status))
            return status == "HEALTHY", status
        except Exception as e:  # noqa: BLE001
            return False, f"unknown ({e})"
