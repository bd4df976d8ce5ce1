"""Prometheus metrics of the router: its own request metrics, and the engines' stats as a collector (read from
the replicas at scrape time, through the server's short cache)."""
from __future__ import annotations

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
    ("cluster_engine_prompt_tokens_total", "tokens_in", "prompt tokens the engine took in", True),
    ("cluster_engine_generation_tokens_total", "tokens_out", "tokens the engine generated", True),
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
        self.engines = EngineCollector()
        r.register(self.engines)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
