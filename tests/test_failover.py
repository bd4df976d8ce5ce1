"""Mid-stream failover (issue 16, part 2), fast: the router's OpenAIServer over two ReplicaCores in this process,
each over a fake engine whose token is a function of its position (so a continuation that resumes from the wrong
place shows). One replica's engine dies while streams run on it: every stream completes on the other, with the
text of an uninterrupted run and exact usage; with no replica left the stream ends in a clear error. No Ray."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from cluster.deployments.replica import Connection, LocalWorkerClient, ReplicaCore
from cluster.messages import Choice, Delta, ErrorInfo, Failed, Job, ReplicaInfo
from cluster.serving.backends import EventStream
from cluster.serving.failover import NO_REPLICA_LEFT, continuation, replica_failed, shifted
from cluster.serving.replica_choice import excluding
from cluster.serving.server import OpenAIServer
from cluster.workers.host import RankZeroHost, resumed
from test_replica_failures import FakeEngine
from test_router_protocol import Out

pytestmark = pytest.mark.anyio
BASE = 1000  # token at position p is BASE + p; its text " t<token>"


@pytest.fixture
def anyio_backend():
    return "asyncio"


class PositionalEngine(FakeEngine):
    """FakeEngine whose k-th output token is BASE + (prompt length + k - 1): the same answer wherever it runs,
    provided the resumed prompt holds exactly the tokens sent."""

    def _loop(self):
        while not self.stop:
            time.sleep(self.step_s)
            with self.lock:
                reqs = list(self.reqs.items())
                if self.death:
                    self.reqs = {}
            for rid, r in reqs:
                if self.death:
                    from cluster.engine.errors import EngineDeadError
                    r[2].put(EngineDeadError(f"engine failed: {self.death}"))
                    continue
                r[3] += 1
                tok = BASE + len(r[0]) + r[3] - 1
                done = r[3] >= r[1].max_new_tokens
                if done:
                    with self.lock:
                        self.reqs.pop(rid, None)
                r[2].put(Out(rid, f" t{tok}", [tok], None, "length" if done else None, len(r[0]), r[3]))


class TwoReplicas:
    """A Backend over two ReplicaCores ("a" first), skipping a job's excluded and not-ready replicas as the
    request routers do (cluster.serving.replica_choice.excluding)."""

    name = "fake"

    def __init__(self, cores: list[ReplicaCore]):
        self.cores = cores
        self.sent_to: list[str] = []

    async def info(self):
        return ReplicaInfo("fake-model", 100_000, 8)

    def generate(self, job: Job) -> EventStream:
        ready = [c for c in self.cores if c.state == "ready" and c.replica_id not in job.exclude_replicas]
        core = (ready or self.cores)[0]
        self.sent_to.append(core.replica_id)
        agen = core.generate(job)
        return EventStream(agen, lambda: asyncio.get_running_loop().create_task(agen.aclose()))

    async def replicas(self):
        return []

    async def deployment_ok(self):
        return True, "HEALTHY"


async def core(engine: FakeEngine, name: str) -> ReplicaCore:
    host = RankZeroHost(engine, asyncio.get_running_loop())

    async def connect():
        return Connection(LocalWorkerClient(host), host.info(), lambda: None)

    c = ReplicaCore(connect, replica_id=name, restart=False, poll_timeout=0.1)
    await c.start()
    return c


async def sse_of(gen) -> list:
    out = []
    async for chunk in gen:
        for line in chunk.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def text_of(chunks: list, chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.get("choices", []):
            piece = (ch["delta"].get("content") or "") if chat else ch["text"]
            texts[ch["index"]] = texts.get(ch["index"], "") + piece
    return texts


def expected(prompt_len: int, n_tokens: int) -> str:
    return "".join(f" t{BASE + prompt_len + k}" for k in range(n_tokens))


async def test_streams_move_to_the_other_replica_when_one_dies():
    ea, eb = PositionalEngine(step_s=0.01), PositionalEngine(step_s=0.01)
    a, b = await core(ea, "a"), await core(eb, "b")
    backend = TwoReplicas([a, b])
    server = OpenAIServer([backend])
    MAX = 60
    bodies = [({"model": "fake", "prompt": "w " * (3 + i), "max_tokens": MAX, "stream": True}, False, 3 + i)
              for i in range(5)]
    bodies.append(({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX,
                    "stream": True, "n": 2, "stream_options": {"include_usage": True}}, True, 3))

    async def one(body, chat):
        _, gen = await server.completion(json.dumps(body).encode(), chat=chat)
        return await sse_of(gen)

    tasks = [asyncio.create_task(one(b_, chat)) for b_, chat, _ in bodies]
    while len(ea.reqs) < 7:  # 5 + 2 choices running on "a"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)  # some tokens streamed
    ea.death = "killed"
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for (body, chat, plen), chunks in zip(bodies, results):
        assert not any("error" in c for c in chunks), chunks[-3:]
        texts = text_of(chunks, chat)
        n = body.get("n", 1)
        assert texts == {i: expected(plen, MAX) for i in range(n)}, texts
        usage = [c["usage"] for c in chunks if c.get("usage")][-1]
        assert usage["prompt_tokens"] == plen and usage["completion_tokens"] == n * MAX, usage
        finishes = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch["finish_reason"]]
        assert finishes == ["length"] * n
    assert a.state == "dead" and backend.sent_to.count("b") == 6
    m = server.metrics.text()
    assert 'cluster_router_failovers_total{model="fake"} 6.0' in m
    assert 'cluster_router_moved_requests_total{model="fake"} 6.0' in m
    ea.shutdown(), eb.shutdown()


async def test_non_streamed_request_moves_too():
    ea, eb = PositionalEngine(step_s=0.01), PositionalEngine(step_s=0.01)
    a, b = await core(ea, "a"), await core(eb, "b")
    server = OpenAIServer([TwoReplicas([a, b])])
    task = asyncio.create_task(server.completion(json.dumps(
        {"model": "fake", "prompt": "x y z", "max_tokens": 40}).encode(), chat=False))
    while not ea.reqs or next(iter(ea.reqs.values()))[3] < 5:
        await asyncio.sleep(0.01)
    ea.death = "killed"
    body, _ = await asyncio.wait_for(task, 10)
    assert body["choices"][0]["text"] == expected(3, 40)
    assert body["usage"]["completion_tokens"] == 40 and body["usage"]["prompt_tokens"] == 3
    ea.shutdown(), eb.shutdown()


async def test_no_replica_left_ends_with_a_clear_error_in_bounded_time():
    ea, eb = PositionalEngine(step_s=0.01), PositionalEngine(step_s=0.01)
    a, b = await core(ea, "a"), await core(eb, "b")
    server = OpenAIServer([TwoReplicas([a, b])])
    _, gen = await server.completion(json.dumps(
        {"model": "fake", "prompt": "x y z", "max_tokens": 500, "stream": True}).encode(), chat=False)
    collect = asyncio.create_task(sse_of(gen))
    while not ea.reqs:
        await asyncio.sleep(0.01)
    eb.death = "gone too"
    await asyncio.sleep(0.1)
    ea.death = "killed"
    t0 = time.monotonic()
    chunks = await asyncio.wait_for(collect, 10)
    assert time.monotonic() - t0 < 6
    message = chunks[-1]["error"]["message"]
    assert message.startswith("engine replica failed") and message.endswith("; " + NO_REPLICA_LEFT), message
    assert 'cluster_router_failover_exhausted_total{model="fake"} 1.0' in server.metrics.text()
    ea.shutdown(), eb.shutdown()


def test_continuation_resumes_each_unfinished_choice_from_what_was_sent():
    job = Job("r", [Choice(0, "p", {"max_new_tokens": 10, "min_new_tokens": 4}),
                    Choice(1, "p", {"max_new_tokens": 10}), Choice(2, [{"role": "user", "content": "x"}],
                                                                   {"max_new_tokens": None})])
    cont = continuation(job, {0: [5, 6, 7], 1: [1] * 10, 2: [9]}, {1}, ["dead"], 1)
    assert [c.index for c in cont.choices] == [0, 2] and cont.exclude_replicas == ["dead"]
    assert cont.request_id != job.request_id
    c0, c2 = cont.choices
    assert c0.resume_ids == [5, 6, 7] and c0.gen == {"max_new_tokens": 7, "min_new_tokens": 1}
    assert c2.prompt == job.choices[2].prompt and c2.resume_ids == [9] and c2.gen["max_new_tokens"] is None
    assert job.choices[0].gen["max_new_tokens"] == 10  # the original is untouched
    assert continuation(job, {}, {0, 1, 2}, [], 1) is None


def test_what_is_retried():
    assert replica_failed(Failed(ErrorInfo("engine_dead", "x")))
    assert replica_failed(Failed(ErrorInfo("unavailable", "x")))
    assert not replica_failed(Failed(ErrorInfo("bad_request", "x")))
    assert not replica_failed(Failed(ErrorInfo("prompt_too_long", "x")))
    ActorDiedError = type("ActorDiedError", (Exception,), {})
    assert replica_failed(ActorDiedError()) and not replica_failed(ValueError())


def test_shifted_counts_and_excluding():
    d = shifted(Delta(" x", [4], generate_token_len=2, input_token_len=13, cached_token_len=12), 10, 3, 1)
    assert (d.generate_token_len, d.input_token_len, d.cached_token_len) == (12, 3, 1)

    class R:
        def __init__(self, uid):
            self.replica_id = type("Id", (), {"unique_id": uid})()

    rs = [R("a"), R("b")]
    assert [r.replica_id.unique_id for r in excluding(rs, Job("j", [], exclude_replicas=["a"]))] == ["b"]
    assert len(excluding(rs, Job("j", [], exclude_replicas=["a", "b"]))) == 2  # none left: all, one may be back
    assert len(excluding(rs, None)) == 2


def test_resumed_prompt_is_the_prompt_tokens_then_the_sent_ones():
    from cluster.engine.tokenizer import PreparedPrompt

    p = resumed(PreparedPrompt([1, 2, 3], None, chat=True), [7, 8])
    assert p.token_ids == [1, 2, 3, 7, 8] and p.chat and p.resumed == 2 and p.own_ids == [1, 2, 3]
    assert resumed(p, [9]).resumed == 3  # a second move: the first's tokens are output too
    assert resumed([1, 2], [3]) == [1, 2, 3]
