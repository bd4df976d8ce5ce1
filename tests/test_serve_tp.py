"""A tensor-parallel replica on Ray: three CPU worker actors (gloo) in one placement group, rank 0 running the step
loop and broadcasting each step's plan to the others. Losing a follower rank fails the requests in flight at once,
and the replica rebuilds its group. (SmolLM2-135M has 3 KV heads: TP 3 is the size that divides it.)"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from test_serve_cluster import KEY, _ray, launch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from launch(tmp_path_factory.mktemp("serve_tp") / "serve.log",
                      ["--tp", "3", "--num-cpus", "4", "--cpus-per-worker", "1"])


def test_tp3_serves_and_survives_losing_a_follower(server):
    async def go():
        sdk = server.sdk()
        r = await sdk.chat.completions.create(model=server.model, messages=[
            {"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0)
        assert "Paris" in r.choices[0].message.content

        started = asyncio.Event()

        async def long():
            try:
                stream = await sdk.completions.create(model=server.model, prompt="Once upon a time", max_tokens=400,
                                                      stream=True, extra_body={"ignore_eos": True})
                async for _ in stream:
                    started.set()
                return "ok", time.time()
            except openai.APIError as e:
                return str(e), time.time()

        task = asyncio.create_task(long())
        await asyncio.wait_for(started.wait(), 60)
        ranks = await asyncio.to_thread(_ray, server, "print(json.dumps([a for a in ray.util.list_named_actors("
                                        "all_namespaces=True) if a['name'].startswith('cluster-rank2|')]))")
        assert len(ranks) == 1, ranks
        killed = await asyncio.to_thread(_ray, server, (
            f"a = ray.get_actor({ranks[0]['name']!r}, namespace={ranks[0]['namespace']!r})\n"
            "import time; t = time.time(); ray.kill(a, no_restart=True); print(json.dumps({'t': t}))"))
        result, t_end = await asyncio.wait_for(task, 60)
        return killed["t"], result, t_end

    t_kill, result, t_end = asyncio.run(go())
    assert "tensor-parallel rank 2" in result, result
    assert t_end - t_kill < 10
    print(f"in-flight request failed {t_end - t_kill:.2f}s after rank 2 was killed")
    t0 = time.time()
    while httpx.get(server.url + "/health", timeout=30).status_code != 200:
        assert time.time() - t0 < 120
        time.sleep(0.5)
    print(f"replica healthy again {time.time() - t_kill:.1f}s after the kill")
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": server.model, "prompt": "The capital of France is", "max_tokens": 4,
                         "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
