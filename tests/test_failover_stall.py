"""The router's stall timeout (issue 16 part 2: a replica that "stops answering"): a running request whose stream
yields nothing, not even a keep-alive, for stall_timeout_s moves to another replica as from a death, and the
client's stream goes on with the uninterrupted text. A replica whose rank 0 answers sends keep-alives, so a slow
prefill stays where it is. Fake engines, ReplicaCores in this process; no Ray."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from cluster.deployments.replica import ReplicaCore
from cluster.messages import Choice, Delta, Deltas, Job, ReplicaInfo, Started
from cluster.serving.backends import EventStream
from cluster.serving.failover import FailoverStream, ReplicaStalled, replica_failed
from cluster.serving.server import OpenAIServer
from test_failover import PositionalEngine, TwoReplicas, expected, sse_of, text_of
from test_replica_failures import PollsStopAnswering, core_over

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def core(engine, name: str, keepalive_s: float) -> ReplicaCore:
    return await core_over(engine, PollsStopAnswering, replica_id=name, keepalive_s=keepalive_s)


async def stream(server: OpenAIServer, max_tokens: int) -> list:
    _, gen = await server.completion(json.dumps(
        {"model": "fake", "prompt": "x y z", "max_tokens": max_tokens, "stream": True}).encode(), chat=False)
    return await sse_of(gen)


async def test_a_replica_whose_rank0_stops_answering_loses_its_request_after_the_stall_timeout():
    """Rank 0 of "a" stops answering polls mid-stream (the replica's own timeout is 60 s): after the router's
    stall timeout the request goes on on "b", with the text of an uninterrupted run and exact usage."""
    ea, eb = PositionalEngine(step_s=0.01), PositionalEngine(step_s=0.01)
    a, b = await core(ea, "a", 0.05), await core(eb, "b", 0.05)
    backend = TwoReplicas([a, b])
    server = OpenAIServer([backend], stall_timeout_s=0.3)
    task = asyncio.create_task(stream(server, 40))
    while not ea.reqs or next(iter(ea.reqs.values()))[3] < 5:
        await asyncio.sleep(0.01)
    a.conn.client.hang = True
    t0 = time.monotonic()
    chunks = await asyncio.wait_for(task, 10)
    assert 0.3 <= time.monotonic() - t0 < 3
    assert not any("error" in c for c in chunks)
    assert text_of(chunks, False) == {0: expected(3, 40)}
    assert [c["usage"] for c in chunks if c.get("usage")][-1]["completion_tokens"] == 40
    assert backend.sent_to == ["a", "b"] and a.state == "ready"  # it never noticed: the router did
    assert 'cluster_router_failovers_total{model="fake"} 1.0' in server.metrics.text()
    ea.shutdown(), eb.shutdown()


async def test_keepalives_keep_a_slow_prefill_on_its_replica():
    """Each token takes longer than the stall timeout (a long prefill): with keep-alives the request stays on
    "a"; without them (keep-alive slower than the stall timeout) it would have moved."""
    for keepalive_s in (0.03, 10.0):
        ea, eb = PositionalEngine(step_s=0.4), PositionalEngine(step_s=0.4)
        a, b = await core(ea, "a", keepalive_s), await core(eb, "b", keepalive_s)
        backend = TwoReplicas([a, b])
        server = OpenAIServer([backend], stall_timeout_s=0.25)
        chunks = await asyncio.wait_for(stream(server, 2), 10)
        if keepalive_s < 1:
            assert text_of(chunks, False) == {0: expected(3, 2)} and backend.sent_to == ["a"]
        else:  # it moved, maybe more than once (the other replica is as slow)
            assert backend.sent_to[:2] == ["a", "b"], backend.sent_to
        ea.shutdown(), eb.shutdown()


class Hangs:
    """A backend whose first replica streams two tokens and then hangs; the next one finishes the request."""

    name = "fake"

    def __init__(self):
        self.jobs: list[Job] = []
        self.closed: list[str] = []

    def generate(self, job: Job) -> EventStream:
        self.jobs.append(job)
        replica = "a" if not job.exclude_replicas else "b"

        async def events():
            yield Started({0: 3}, replica)
            if replica == "a":
                for t in (1, 2):
                    yield Deltas({0: Delta(f" {t}", [t], generate_token_len=t)})
                await asyncio.Event().wait()
            yield Deltas({0: Delta(" 3", [3], finish_reason="length", generate_token_len=1)})

        it = events()
        return EventStream(it, lambda: self.closed.append(replica))

    async def info(self):
        return ReplicaInfo("fake", 100, 8)


async def test_a_hanging_stream_is_closed_and_the_request_continues_elsewhere():
    backend = Hangs()
    job = Job("r", [Choice(0, "p", {"max_new_tokens": 3})])
    events = backend.generate(job)
    first = await events.__anext__()
    moves = []
    fs = FailoverStream(backend, job, events, first, lambda outcome, moved: moves.append(outcome),
                        stall_timeout_s=0.2)

    async def collect() -> list:
        return [ev async for ev in fs]

    got = await asyncio.wait_for(collect(), 5)
    assert [d.token_ids for ev in got for d in ev.choices.values()] == [[1], [2], [3]]
    assert got[-1].choices[0].generate_token_len == 3  # counted as the whole answer's
    cont = backend.jobs[1]
    assert cont.exclude_replicas == ["a"] and cont.choices[0].resume_ids == [1, 2]
    assert cont.choices[0].gen["max_new_tokens"] == 1
    assert backend.closed[0] == "a" and moves == ["moved"]
    assert replica_failed(ReplicaStalled("x"))
