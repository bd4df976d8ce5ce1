"""Replica choice for a model's engine deployment: Serve RequestRouters (built on demand, so importing this module
needs no Ray).

- PendingWorkRouter: least pending work of two random replicas.
- CacheAwareRouter: the replica holding the longest prefix of the prompt (cluster.serving.prefix_keys, .prefix_table)
  unless it is overloaded by the stated margin (cluster.serving.affinity); otherwise PendingWorkRouter's choice.

Each router replica (ingress) has its own routers, each with its own table of what it routed. That view is a hint:
a miss (another router sent the earlier turn, the engine evicted the blocks) costs one prefill, and the answer is
the same on any replica, so nothing needs the routers to agree.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

from cluster.messages import Job
from cluster.serving.affinity import AffinityPolicy, Preference, prefer
from cluster.serving.prefix_keys import prefix_keys
from cluster.serving.prefix_table import DEFAULT_MAX_ENTRIES, PrefixTable

STALE_S = 600.0  # a request neither routed nor completed this long ago was cancelled while queued: forget it


def _job(pending_request) -> Job | None:
    args = getattr(pending_request, "args", None) or []
    return args[0] if args and isinstance(args[0], Job) else None


def _rid(pending_request) -> str:
    return pending_request.metadata.internal_request_id


def _unique_id(replica) -> str:
    rid = replica.replica_id
    return getattr(rid, "unique_id", str(rid))


def ready(replica) -> bool:
    """False while the replica reports (record_routing_stats, every 2 s) that it cannot serve: a replica rebuilding
    its workers answers every request at once with a 503, and least pending work would draw requests to it."""
    return (getattr(replica, "routing_stats", None) or {}).get("state", "ready") == "ready"


def excluding(candidates: list, job: Job | None) -> list:
    """The candidates that report themselves ready, less those that failed this job (failover:
    cluster.serving.failover); each rule only while it leaves one: else all of them, as one may have recovered."""
    pool = [r for r in candidates if ready(r)] or list(candidates)
    if job is None or not job.exclude_replicas:
        return pool
    left = [r for r in pool if _unique_id(r) not in job.exclude_replicas]
    return left or pool


def _count(deployment: str, replica_id, reason: str | None) -> None:
    """Into this process's ROUTING, imported where this runs: Serve pickles this module by value (RequestRouterConfig
    registers it so), and a global named here would travel as a copy (ROUTING, with its lock, cannot). The
    replica's label is its unique id, as the engine series' `replica` label."""
    from cluster.serving.metrics import ROUTING

    ROUTING.routed_to(deployment, getattr(replica_id, "unique_id", str(replica_id)), reason)


def make_request_routers() -> dict[str, type]:
    """{'pending_work': PendingWorkRouter, 'cache_aware': CacheAwareRouter}, as Serve request router classes."""
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class PendingWork(RequestRouter):
        """Pending work per replica: prompt + max tokens of the requests this router sent it that have not completed,
        or what the replica itself reports, if more (other routers send it work too). A request is charged to the
        replica it is about to go to as soon as it is chosen (then moved if Serve sends it elsewhere), so a burst of
        concurrent arrivals spreads evenly."""

        def initialize_state(self, deployment: str = "", **kwargs):
            self._deployment = deployment or getattr(getattr(self, "_deployment_id", None), "name", "")
            self._work: dict[Any, int] = defaultdict(int)  # replica id -> pending work
            self._charged: dict[str, tuple[Any, int, float]] = {}  # request id -> (replica id, work, when)

        def _state(self):
            if not hasattr(self, "_work"):
                self.initialize_state()

        def _load(self, replica) -> float:
            reported = (replica.routing_stats or {}).get("pending_work", 0) or 0
            return max(self._work.get(replica.replica_id, 0), reported)

        def _charge(self, rid: str, replica_id, work: int) -> None:
            self._uncharge(rid)
            if work:
                self._charged[rid] = (replica_id, work, time.monotonic())
                self._work[replica_id] += work

        def _uncharge(self, rid: str) -> None:
            old = self._charged.pop(rid, None)
            if old is not None:
                self._work[old[0]] -= old[1]
                if self._work[old[0]] <= 0:
                    self._work.pop(old[0], None)

        def _sweep(self) -> None:
            now_ = time.monotonic()
            for rid in [r for r, c in self._charged.items() if now_ - c[2] > STALE_S]:
                self._uncharge(rid)

        def _by_load(self, candidates) -> list:
            """Power of two choices: two random candidates, less pending work first."""
            pick = random.sample(list(candidates), min(2, len(candidates)))
            pick.sort(key=self._load)
            return pick

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            self._state()
            if not candidate_replicas:
                return []
            if pending_request is not None:
                candidate_replicas = excluding(candidate_replicas, _job(pending_request))
            pick = self._by_load(candidate_replicas)
            if pending_request is not None:
                self._sweep()
                job = _job(pending_request)
                self._charge(_rid(pending_request), pick[0].replica_id, job.work if job else 0)
            return [[r] for r in pick]

        def on_request_routed(self, pending_request, replica_id, result):
            self._state()
            job = _job(pending_request)
            self._charge(_rid(pending_request), replica_id, job.work if job else 0)
            _count(self._deployment, replica_id, self._reason(_rid(pending_request), replica_id))

        def _reason(self, rid: str, replica_id) -> str | None:
            return None

        def on_request_completed(self, replica_id, internal_request_id):
            self._state()
            self._uncharge(internal_request_id)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self._state()
            for rid in [r for r, c in self._charged.items() if c[0] == replica_id]:
                self._uncharge(rid)

    class PendingWorkRouter(FIFOMixin, PendingWork):
        """Serve falls back to the second of the two when the first is at max_ongoing_requests. FIFO: a replica
        found free goes to the oldest request waiting, whichever request's routing found it."""

    class CacheAwareRouter(PendingWork):
        """Longest cached prefix wins, unless overloaded; then least pending work. Not FIFOMixin: with it, a
        replica chosen for one request's prefix may be handed to another request that waited longer, and the
        prefix would go where it is not cached (Serve's default matches a replica to the request it was chosen
        for). Prefixes are recorded for the replica the request is about to go to, and for the one it went to if
        Serve sent it elsewhere (its first choice was full)."""

        def initialize_state(self, deployment: str = "", margin_tokens: int | None = None,
                             max_entries: int = DEFAULT_MAX_ENTRIES, **kwargs):
            super().initialize_state(deployment, **kwargs)
            self._policy = AffinityPolicy() if margin_tokens is None else AffinityPolicy(margin_tokens=margin_tokens)
            self._table = PrefixTable(max_entries)
            self._decided: dict[str, tuple[list, Preference, float]] = {}  # request id -> (keys, preference, when)

        def _state(self):
            if not hasattr(self, "_table"):
                self.initialize_state()

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            self._state()
            if not candidate_replicas:
                return []
            job = _job(pending_request) if pending_request is not None else None
            if job is None or not job.choices:
                return await super().choose_replicas(candidate_replicas, pending_request)
            candidate_replicas = excluding(candidate_replicas, job)
            rid = _rid(pending_request)
            keys = self._decided[rid][0] if rid in self._decided else prefix_keys(job.choices[0].prompt)
            by_id = {r.replica_id: r for r in candidate_replicas}
            loads = {i: self._load(r) for i, r in by_id.items()}
            pref = prefer(loads, self._table.matched(keys, by_id), keys[-1][1] if keys else 0, self._policy)
            if pref.replica is None:
                ranked = self._by_load(candidate_replicas)
            else:  # the rest by load, in case Serve finds the preferred one full
                ranked = [by_id[pref.replica]] + sorted((r for i, r in by_id.items() if i != pref.replica),
                                                        key=self._load)
            self._sweep()
            self._decided[rid] = (keys, pref, time.monotonic())
            self._charge(rid, ranked[0].replica_id, job.work)
            self._table.record(keys, ranked[0].replica_id)
            return [[r] for r in ranked]

        def _sweep(self) -> None:
            super()._sweep()
            now_ = time.monotonic()
            for rid in [r for r, d in self._decided.items() if now_ - d[2] > STALE_S]:
                del self._decided[rid]

        def _reason(self, rid: str, replica_id) -> str | None:
            """Why the request went where Serve sent it (called once, when it is routed)."""
            decided = self._decided.pop(rid, None)
            if decided is None:
                return None
            keys, pref, _ = decided
            if pref.replica is not None and pref.replica == replica_id:
                return "affinity"
            self._table.record(keys, replica_id)  # it holds them now
            return "full" if pref.replica is not None else pref.reason

        def on_request_completed(self, replica_id, internal_request_id):
            super().on_request_completed(replica_id, internal_request_id)
            self._decided.pop(internal_request_id, None)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self._state()
            self._table.forget(replica_id)

        def update_replicas(self, replicas):
            super().update_replicas(replicas)
            self._state()
            live = {r.replica_id for r in replicas}
            for gone in [r for r in self._table.replicas() if r not in live]:
                self._table.forget(gone)  # scaled down or replaced: its entries would never match again

    return {"pending_work": PendingWorkRouter, "cache_aware": CacheAwareRouter}


def __getattr__(name: str):
    if name in ("PendingWorkRouter", "CacheAwareRouter"):  # built on demand: importing this module needs no Ray
        return make_request_routers()["pending_work" if name == "PendingWorkRouter" else "cache_aware"]
    raise AttributeError(name)
