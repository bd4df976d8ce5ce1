"""The worker actors of one model replica: one placement group (STRICT_PACK: all ranks on one node), one actor per
rank (one GPU each on GPUs, `cpus_per_worker` CPUs otherwise), and the torch.distributed rendezvous between them.

    group = await WorkerGroup.create(GroupSpec(model, engine_config, ...), WorkerNames(app, dep, replica, gen))
    group.rank0            # the actor that runs the engine's step loop; the deployment talks only to it
    await group.watch()    # returns (a reason) when a follower rank ends: the replica must be rebuilt
    group.kill()           # actors and placement group gone

Rendezvous: rank 0 picks `tcp://<its node IP>:<free port>` (MASTER_ADDR/MASTER_PORT); every rank gets it with its
RANK and WORLD_SIZE, and they join one process group: NCCL on GPUs, gloo on CPUs (cluster/executor/tp_groups.py). With
TP=1 there is one actor and no process group to join.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.deployments.naming import WorkerNames
from cluster.messages import ReplicaInfo
from cluster.workers.worker import RankWorker

log = logging.getLogger(__name__)


@dataclass
class GroupSpec:
    model: str | None
    engine_config: dict = field(default_factory=dict)
    use_gpu: bool | None = None  # True: GPU bundles, waited for; None: GPUs when the cluster has any (and device != cpu)
    cpus_per_worker: float = 1.0
    max_waiting: int = 4096
    placement_timeout_s: float = 600.0
    start_timeout_s: float = 1800.0

    @property
    def tp(self) -> int:
        return int(self.engine_config.get("tp", 1))

    def gpu(self) -> bool:
        """True/False as configured; None decides from the cluster as it is now, which on a cluster whose GPU nodes
        have not joined yet (KubeRay scaling up) means CPUs: deployments set use_gpu so that never happens."""
        if self.use_gpu is not None:
            return self.use_gpu
        if self.engine_config.get("device") == "cpu":
            return False
        if ray.cluster_resources().get("GPU", 0) > 0:
            return True
        log.info("no GPUs in the Ray cluster: the replica's %d worker(s) go on CPUs (use_gpu: true would wait for "
                 "GPU nodes instead)", self.tp)
        return False

    def bundles(self) -> list[dict]:
        one = {"GPU": 1.0, "CPU": self.cpus_per_worker} if self.gpu() else {"CPU": self.cpus_per_worker}
        return [dict(one) for _ in range(self.tp)]


class GroupStartError(RuntimeError):
    pass


class WorkerGroup:
    def __init__(self, spec: GroupSpec, pg, workers: list, follower_refs: list, info: ReplicaInfo):
        # follower_refs: asyncio futures of each rank>0's run_follower call
        self.spec, self.pg, self.workers, self.follower_refs, self.info = spec, pg, workers, follower_refs, info

    @property
    def rank0(self):
        return self.workers[0]

    @classmethod
    async def create(cls, spec: GroupSpec, names: WorkerNames | None = None) -> "WorkerGroup":
        """`names` names each rank's actor (cluster.deployments.naming), so other processes can find rank 0."""
        gpu = spec.gpu()
        bundles = spec.bundles()
        pg = placement_group(bundles, strategy="STRICT_PACK")
        workers: list = []
        try:
            await wait_placed(pg, spec, bundles)
            actor_cls = ray.remote(RankWorker)
            for r in range(spec.tp):
                opts = dict(num_cpus=spec.cpus_per_worker, num_gpus=1 if gpu else 0, max_restarts=0,
                            max_concurrency=1000,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                placement_group=pg, placement_group_bundle_index=r,
                                placement_group_capture_child_tasks=True))
                if names is not None:
                    opts["name"] = names.of_rank(r)
                threads = None if gpu else max(1, int(spec.cpus_per_worker))
                workers.append(actor_cls.options(**opts).remote(r, spec.tp, spec.model, spec.engine_config,
                                                                spec.max_waiting, threads))
            init_method = await workers[0].address.remote() if spec.tp > 1 else None
            followers = [asyncio.ensure_future(_await(w.run_follower.remote(init_method))) for w in workers[1:]]
            start = asyncio.ensure_future(_await(workers[0].start.remote(init_method)))
            done, _ = await asyncio.wait([start, *followers], timeout=spec.start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise GroupStartError(f"replica did not start within {spec.start_timeout_s:.0f}s")
            if start not in done:  # a follower ended before rank 0 was up
                fut = next(iter(done))
                rank = followers.index(fut) + 1
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001
                    raise GroupStartError(f"tensor-parallel rank {rank} failed during start-up: {e}") from e
                raise GroupStartError(f"tensor-parallel rank {rank} exited during start-up")
            info = start.result()
            return cls(spec, pg, workers, followers, info)
        except BaseException:
            _kill(workers, pg)
            raise

    async def watch(self) -> str:
        """Returns when any follower rank ends (it never should while the replica lives): the reason."""
        if not self.follower_refs:
            await asyncio.Event().wait()  # TP=1: nothing to watch; rank 0's failures surface in poll()
        futs = self.follower_refs
        done, _ = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
        fut = next(iter(done))
        rank = futs.index(fut) + 1
        try:
            fut.result()
            reason = f"tensor-parallel rank {rank} exited"
        except Exception as e:  # noqa: BLE001
            # the class only: the text may be a request's (a follower's step failed on its input); the log has it
            log.error("tensor-parallel rank %d failed: %s", rank, e)
            reason = f"tensor-parallel rank {rank} failed ({type(e).__name__})"
        try:
            self.rank0.abort_group.remote(reason)
        except Exception:  # noqa: BLE001
            pass
        return reason

    def kill(self) -> None:
        _kill(self.workers, self.pg)


async def wait_placed(pg, spec: GroupSpec, bundles: list[dict], first_log_s: float = 2.0,
                      log_every_s: float = 30.0) -> None:
    """Wait for the placement group, saying what it waits for (first after `first_log_s`, then every
    `log_every_s`): a pending group of GPU bundles is what makes the Ray (KubeRay) autoscaler add a GPU node,
    so the replica waits rather than falling back to CPUs. GroupStartError after `spec.placement_timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.placement_timeout_s
    ready = asyncio.ensure_future(_await(pg.ready()))
    wait_s = first_log_s
    try:
        while True:
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(asyncio.shield(ready), max(0.0, min(wait_s, left)))
                return
            except asyncio.TimeoutError:
                pass
            waited = spec.placement_timeout_s - (deadline - loop.time())
            what = f"{len(bundles)} bundle(s) of {bundles[0]} on one node (STRICT_PACK)"
            if loop.time() >= deadline:
                raise GroupStartError(f"could not place {what} within {spec.placement_timeout_s:.0f}s; "
                                      f"{_resources_line(bundles)}")
            log.warning("replica waiting %.0fs for %s: %s; a Ray autoscaler adds a node that fits, if one is "
                        "configured (gives up after %.0fs)", waited, what, _resources_line(bundles),
                        spec.placement_timeout_s)
            wait_s = log_every_s
    finally:
        ready.cancel()


def _resources_line(bundles: list[dict]) -> str:
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception:  # noqa: BLE001 - only for the message
        return "cluster resources unknown"
    return ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in bundles[0])


async def _await(ref):
    return await ref


def _kill(workers: list, pg) -> None:
    for w in workers:
        try:
            ray.kill(w, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001
        pass
