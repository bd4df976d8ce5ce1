"""Prometheus metrics of the router: its own request metrics, and the engines' stats as a collector (read from
the replicas at scrape time, through the server's short cache), and what this process's request routers chose."""
from __future__ import annotations

import threading
from collections import Counter as Tally
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.messages import EngineStats

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

ENGINE_METRICS = [  # (metric, EngineStats field, help, counter?)
    ("cluster_engine_healthy", "ok", "1 when the engine replica can serve", False),
    ("cluster_kv_cache_usage_ratio", "kv_usage", "share of KV cache blocks in use", False),
    ("cluster_kv_cache_free_blocks", "kv_blocks_free", "free KV cache blocks", False),
    ("cluster_kv_cache_capacity_blocks", "kv_blocks_total", "KV cache blocks", False),
    ("cluster_kv_cache_capacity_tokens", "kv_tokens_total", "tokens the KV cache holds", False),
    ("cluster_requests_running", "num_running", "requests in the running batch", False),
    ("cluster_requests_waiting", "num_waiting", "requests queued in the engine", False),
    ("cluster_preemptions_total", "num_preemptions", "requests preempted for KV space", True),
    ("cluster_prefix_cache_hit_ratio", "prefix_cache_hit_rate", "prefix cache hits / queries", False),
    ("cluster_prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "prompt tokens found in the prefix cache",
     True),
    ("cluster_engine_prompt_tokens_total", "tokens_in", "prompt tokens the engine took in", True),
    ("cluster_engine_generation_tokens_total", "tokens_out", "tokens the engine generated", True),
    ("cluster_vision_encoder_seconds_total", "vision_seconds", "seconds in the image encoder (vision models)", True),
    ("cluster_vision_images_total", "images_encoded", "images the image encoder encoded (vision models)", True),
]


class EngineCollector:
    """The engine replicas' stats as of the last `update` (per model: each replica's EngineStats)."""

    def __init__(self):
        self.per_model: dict[str, list[EngineStats]] = {}

    def update(self, per_model: dict[str, list[EngineStats]]) -> None:
        self.per_model = per_model

    def collect(self) -> Iterable[Metric]:
        for metric, key, help_, counter in ENGINE_METRICS:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(metric, help_, labels=["model", "replica"])
            for model, replicas in self.per_model.items():
                for r in replicas:
                    v = getattr(r, key)
                    if v is not None:
                        family.add_metric([model, str(r.replica or "")], float(v))
            yield family


class RoutingCounts:
    """What the request routers of this process chose, per (deployment, replica). Serve runs a handle's router in
    the ingress's process (on a loop of its own thread), not in the server's code: it counts here, and /metrics
    reads these (RoutingCollector). Each router replica counts what it routed itself."""

    def __init__(self):
        self._lock = threading.Lock()
        self.routed: Tally = Tally()  # (deployment, replica) -> requests
        self.affinity: Tally = Tally()  # (deployment, replica) -> of which sent there for a cached prefix
        self.by_load: Tally = Tally()  # (deployment, reason) -> requests routed by load: no_prefix | overloaded | full

    def routed_to(self, deployment: str, replica: str, reason: str | None = None) -> None:
        """One request went to `replica`; `reason` (cache-aware routing): affinity, or why load decided."""
        with self._lock:
            self.routed[(deployment, replica)] += 1
            if reason == "affinity":
                self.affinity[(deployment, replica)] += 1
            elif reason is not None:
                self.by_load[(deployment, reason)] += 1

    def snapshot(self) -> tuple[dict, dict, dict]:
        with self._lock:
            return dict(self.routed), dict(self.affinity), dict(self.by_load)


ROUTING = RoutingCounts()


class RoutingCollector:
    """ROUTING as Prometheus counters, labelled by the served model name (`models`: deployment -> model)."""

    def __init__(self, counts: RoutingCounts = ROUTING):
        self.counts = counts
        self.models: dict[str, str] = {}

    def collect(self) -> Iterable[Metric]:
        routed, affinity, by_load = self.counts.snapshot()
        name = self.models.get
        for metric, help_, tally, label in (
                ("cluster_router_routed_requests", "requests this router sent to each engine replica", routed,
                 "replica"),
                ("cluster_router_prefix_affinity_hits", "requests sent to a replica because it held their prompt's "
                 "prefix", affinity, "replica"),
                ("cluster_router_load_choices", "cache-aware routing's requests routed by pending work: no_prefix (no "
                 "replica held a prefix worth it), overloaded (the one that did was past the margin), full (it was at "
                 "max_ongoing_requests)", by_load, "reason")):
            family = CounterMetricFamily(metric, help_, labels=["model", label])
            for (dep, what), v in sorted(tally.items()):
                family.add_metric([name(dep, dep), what], float(v))
            yield family


class RouterMetrics:
    def __init__(self):
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cluster_requests", "HTTP API requests by outcome", ["model", "endpoint", "status"],
                                registry=r)
        self.in_flight = Gauge("cluster_requests_in_flight", "requests being served", registry=r)
        self.ttft = Histogram("cluster_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("cluster_time_per_output_token_seconds", "time per output token after the first",
                              ["model"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("cluster_e2e_request_latency_seconds", "request latency", ["model"],
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cluster_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("cluster_generation_tokens", "tokens generated", ["model"], registry=r)
        self.failovers = Counter("cluster_router_failovers", "times a request went on on another engine replica "
                                 "after its replica failed mid-stream", ["model"], registry=r)
        self.moved_requests = Counter("cluster_router_moved_requests", "requests moved to another engine replica at "
                                      "least once (failover)", ["model"], registry=r)
        self.failover_exhausted = Counter("cluster_router_failover_exhausted", "requests that failed because no "
                                          "engine replica could continue them", ["model"], registry=r)
        self.engines = EngineCollector()
        r.register(self.engines)
        self.routing = RoutingCollector()
        r.register(self.routing)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
