"""Autoscaling under load on the real thing (issue 16, part 3): `cluster serve --min-replicas 1 --max-replicas 2`
with a target of 2 requests in flight per replica and short autoscaling windows. Six closed-loop greedy
streams exceed one replica: Serve adds a second, which takes traffic (its id in X-Cluster-Replica). Then one
sequential client is left: Serve goes back to one replica, and the one it removes drains (its requests finish,
or move by failover) before its workers go. No request fails at any point."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from test_serve_cluster import launch
from test_serve_failover import _rank0_pids, _requests, _stream

MAX_TOKENS = 16
HEAVY_CLIENTS = 6  # 3x the target per replica: Serve wants max_replicas
AUTOSCALING = {"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 3, "metrics_interval_s": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = [x for k, v in AUTOSCALING.items() for x in ("--autoscaling", f"{k}={v}")]
    yield from launch(tmp_path_factory.mktemp("autoscale") / "serve.log",
                      ["--num-cpus", "4", "--cpus-per-worker", "1", "--min-replicas", "1", "--max-replicas", "2",
                       "--target-ongoing-requests", "2", "--drain-timeout", "10", *flags])


def _engines(server) -> int:
    """Engine replicas the router sees now (one cluster_engine_healthy series each)."""
    return len(server.metrics().get("cluster_engine_healthy", []))


def test_load_scales_to_two_and_back_to_one(server):
    reqs = _requests(server.model, 8, MAX_TOKENS)
    first = set(_rank0_pids(server))
    assert len(first) == 1, first
    results: list[dict] = []

    async def clients(n: int, stop: asyncio.Event, phase: str) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(k: int) -> None:
                i = k
                while not stop.is_set():
                    path, body = reqs[i % len(reqs)]
                    results.append({**await _stream(c, server.url, path, body), "phase": phase})
                    i += n
            await asyncio.gather(*[one(k) for k in range(n)])

    async def scenario() -> tuple[float, float]:
        t0 = time.time()
        heavy_stop, light_stop = asyncio.Event(), asyncio.Event()
        heavy = asyncio.create_task(clients(HEAVY_CLIENTS, heavy_stop, "heavy"))
        while len({r["replica"] for r in results}) < 2:  # a second replica was added and answered
            assert time.time() - t0 < 120 and not heavy.done(), server.tail()
            await asyncio.sleep(0.5)
        t_up = time.time() - t0
        heavy_stop.set()
        light = asyncio.create_task(clients(1, light_stop, "light"))  # below the target: one replica is enough
        await heavy
        while await asyncio.to_thread(_engines, server) > 1:
            assert time.time() - t0 < 180 and not light.done(), server.tail()
            await asyncio.sleep(1)
        t_down = time.time() - t0
        light_stop.set()
        await light
        return t_up, t_down

    t_up, t_down = asyncio.run(scenario())
    for r in results:
        assert r["status"] == 200 and not r["errors"] and r["done"] and r["finish"] == ["length"], r
        assert r["usage"]["completion_tokens"] == MAX_TOKENS, r
    replicas = {r["replica"] for r in results}
    assert len(replicas) == 2 and first < replicas, (first, replicas)
    left = set(_rank0_pids(server))
    assert len(left) == 1 and left < replicas, (left, replicas)  # the removed replica's workers went with it
    light = [r for r in results if r["phase"] == "light"]
    print(f"autoscaling: 2 replicas after {t_up:.1f}s of load, back to 1 {t_down - t_up:.1f}s after it eased; "
          f"{len(results)} requests, all complete ({len(light)} during the scale-down, "
          f"{sum(r['replica'] not in left for r in light)} of them on the removed replica)")
