"""Replica choice for a model's engine deployment: a Serve RequestRouter that weighs pending work (built on demand,
so importing this module needs no Ray)."""
from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

from cluster.messages import Job


def make_request_router() -> type:
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class PendingWorkRouter(FIFOMixin, RequestRouter):
        """Power of two choices on pending work: two random replicas; prefer the one with fewer tokens still to do
        (prompt + max tokens of the requests this router sent it and that have not completed; or what the replica
        itself reports, if more: other routers send it work too). Serve falls back to the second when the first is
        at max_ongoing_requests. A request is charged to the replica it is about to go to as soon as it is chosen
        (then moved if Serve sends it elsewhere), so a burst of concurrent arrivals spreads evenly."""

        def initialize_state(self, **kwargs):
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

        @staticmethod
        def _job_work(pending_request) -> int:
            args = getattr(pending_request, "args", None) or []
            return args[0].work if args and isinstance(args[0], Job) else 0

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            self._state()
            if not candidate_replicas:
                return []
            pick = random.sample(list(candidate_replicas), min(2, len(candidate_replicas)))
            pick.sort(key=self._load)
            if pending_request is not None:
                now_ = time.monotonic()
                for rid in [r for r, c in self._charged.items() if now_ - c[2] > 600]:
                    self._uncharge(rid)  # never routed nor completed (cancelled while queued)
                self._charge(pending_request.metadata.internal_request_id, pick[0].replica_id,
                             self._job_work(pending_request))
            return [[r] for r in pick]

        def on_request_routed(self, pending_request, replica_id, result):
            self._state()
            self._charge(pending_request.metadata.internal_request_id, replica_id, self._job_work(pending_request))

        def on_request_completed(self, replica_id, internal_request_id):
            self._state()
            self._uncharge(internal_request_id)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self._state()
            for rid in [r for r, c in self._charged.items() if c[0] == replica_id]:
                self._uncharge(rid)

    return PendingWorkRouter


def __getattr__(name: str):
    if name == "PendingWorkRouter":  # built on demand: importing this module needs no Ray
        return _make_request_router()
    raise AttributeError(name)


def __getattr__(name: str):
    if name == "PendingWorkRouter":
        return make_request_router()
    raise AttributeError(name)
