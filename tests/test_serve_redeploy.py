"""Safe redeploys (issue 16, part 4) on the real thing: `cluster serve` with two engine replicas of the embedded
SmolLM2 on the CPU, then a declarative redeploy (what `serve deploy` sends: the controller's apply_config) of a
changed config (an engine-side setting, max_waiting) while 50 greedy streams run. A changed `args` is a new code
version to Serve, so every replica, the router's and the engines', is replaced, one engine replica at a time:
the old router streams on (router_drain_timeout_s); an old engine replica takes no new request and finishes those
in flight up to its drain bound (`--drain-timeout`, short here, so that some are cut off and moved to another
replica by failover). Every stream ends 200 with a whole SSE stream ([DONE], a finish reason, usage) and the text
of the same request in a run without the redeploy; the old replicas' workers are gone afterwards."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from test_serve_cluster import KEY, SESSION_LEN, _ray, launch
from test_serve_failover import _rank0_pids, _requests, _stream

N_STREAMS = 50
DISTINCT = 10  # prompts; each sent N_STREAMS / DISTINCT times, so the reference run stays short
MAX_TOKENS = 40  # long enough that some streams outlive the old replica's drain (the CPU kernels made 24 too short)
DRAIN_S = 4.0  # the old engine replica's drain bound: streams it still holds then are moved


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from launch(tmp_path_factory.mktemp("redeploy") / "serve.log",
                      ["--num-cpus", "4", "--replicas", "2", "--cpus-per-worker", "1",
                       "--drain-timeout", str(DRAIN_S)])


def _redeploy(server, max_waiting: int) -> None:
    """Apply a changed config as `serve deploy` does (a declarative config to the Serve controller)."""
    from cluster.router import ServeArgs

    args = ServeArgs(models=[{"replicas": 2, "engine": {"session_len": SESSION_LEN}, "cpus_per_worker": 1.0,
                              "drain_timeout_s": DRAIN_S, "max_waiting": max_waiting}], api_key=KEY)
    port = int(server.url.rsplit(":", 1)[1])
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "cluster", "route_prefix": "/", "import_path": "cluster.router:build_app",
                             "args": args.model_dump(exclude_defaults=True)}]}
    _ray(server, "from ray.serve.context import _get_global_client\n"
         "from ray.serve.schema import ServeDeploySchema\n"
         f"_get_global_client().deploy_apps(ServeDeploySchema(**json.loads({json.dumps(cfg)!r})))\n"
         "print(json.dumps('ok'))")


def test_redeploy_during_50_streams_loses_none(server):
    distinct = _requests(server.model, DISTINCT, MAX_TOKENS)
    reqs = [distinct[i % DISTINCT] for i in range(N_STREAMS)]
    old = set(_rank0_pids(server))
    assert len(old) == 2, old
    t_start = time.time()
    applied: list[float] = []

    async def run(redeploy: bool, items: list[tuple[str, dict]]) -> list[dict]:
        async with httpx.AsyncClient(timeout=240, limits=httpx.Limits(max_connections=N_STREAMS + 8)) as c:
            progress = [[] for _ in items]
            tasks = [asyncio.create_task(_stream(c, server.url, p, b, progress[i])) for i, (p, b) in enumerate(items)]
            if redeploy:
                deadline = time.time() + 120
                while sum(len(p) > 0 for p in progress) < N_STREAMS // 2:  # under way, on both old replicas
                    assert time.time() < deadline and not any(t.done() for t in tasks), [len(p) for p in progress]
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(_redeploy, server, 2048)
                applied.append(time.time())
            return await asyncio.wait_for(asyncio.gather(*tasks), 240)

    reference = {json.dumps(b, sort_keys=True): r for (_, b), r in zip(distinct, asyncio.run(run(False, distinct)))}
    t_ref = time.time() - t_start
    t1 = time.time()
    got = asyncio.run(run(True, reqs))
    t_run = time.time() - t1
    for (_, body), r in zip(reqs, got):
        ref = reference[json.dumps(body, sort_keys=True)]
        assert r["status"] == 200 and not r["errors"] and r["done"], r
        assert r["finish"] == ["length"] and r["usage"]["completion_tokens"] == MAX_TOKENS, r
        assert r["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"], (r["usage"], ref["usage"])
        assert r["text"] == ref["text"], (r["replica"], r["text"], ref["text"])

    # the redeploy ran during the streams: Serve stops the first old engine replica (and the router) about 1-2 s
    # after the config is applied, so streams that end past its drain bound outlived that replica's drain
    late = [r for r in got if r["t1"] > applied[0] + DRAIN_S + 2]
    assert late, [round(r["t1"] - applied[0], 1) for r in got]

    deadline = time.time() + 90  # the old replicas' workers went with them; two new replicas serve
    while True:
        now = set(_rank0_pids(server))
        if len(now) == 2 and not now & old and httpx.get(server.url + "/health", timeout=30).status_code == 200:
            break
        assert time.time() < deadline, (old, now, server.tail())
        time.sleep(1)
    print(f"redeploy: {len(late)} of {N_STREAMS} streams ended more than {DRAIN_S + 2:.0f}s after the new config "
          f"was applied, all exact; reference {t_ref:.1f}s, redeploy run {t_run:.1f}s, rollout done after "
          f"{time.time() - applied[0]:.1f}s")
