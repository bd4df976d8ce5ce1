"""The OpenAI protocol of the router, fast: a fake engine in this process (no Ray, no model) behind the real worker
host, replica core and FastAPI app. Error bodies, status codes, auth, streaming format, n, usage, logprobs."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from cluster.deployments.replica import Connection, LocalWorkerClient, ReplicaCore
from cluster.engine.errors import EngineDeadError, EngineOverloadedError, PromptTooLongError
from cluster.messages import Choice, Deltas, EngineRequest, Job, Started
from cluster.serving.app import create_app
from cluster.serving.backends import LocalBackend
from cluster.serving.server import OpenAIServer
from cluster.workers.host import RankZeroHost

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@dataclass
class Out:
    request_id: str
    text: str
    token_ids: list
    logprobs: list | None
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_token_len: int = 0


class FakeTokenizer:
    def prompt_ids(self, prompt):
        if isinstance(prompt, str):
            ids = [len(w) for w in prompt.split()]
        elif prompt and isinstance(prompt[0], dict):
            ids = [len(w) for m in prompt for w in (m["role"] + " " + m["content"]).split()]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" t{i}" for i in ids)


class FakeEngine:
    """Emits token k (text ' tk') per step for each request; 'stop' when the text would be a stop word."""

    model_name = "fake-model"
    session_len = 64

    def __init__(self, step_s: float = 0.002):
        self.tokenizer = FakeTokenizer()
        self.reqs: dict = {}
        self.lock = threading.Lock()
        self.dead = False
        self.max_waiting = 1000
        self.aborted: list = []
        self.step_s = step_s
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def prepare_prompt(self, prompt):
        return self.tokenizer.prompt_ids(prompt)

    def validate(self, ids, gen):
        if len(ids) + gen.max_new_tokens > self.session_len:
            raise PromptTooLongError(len(ids), gen.max_new_tokens, self.session_len)

    def submit(self, ids, gen, rid, loop, sink):
        if self.dead:
            raise EngineDeadError("engine step loop died: boom")
        if len(self.reqs) >= self.max_waiting:
            raise EngineOverloadedError(len(self.reqs), self.max_waiting)
        with self.lock:
            self.reqs[rid] = [ids, gen, sink, 0]
        return rid, sink

    def abort(self, rid):
        with self.lock:
            r = self.reqs.pop(rid, None)
        if r is not None:
            self.aborted.append(rid)
            r[2].put(Out(rid, "", [], None, "abort", len(r[0]), r[3]))

    def loop(self):
        while not self.stop:
            time.sleep(self.step_s)
            if self.dead:
                with self.lock:
                    reqs, self.reqs = self.reqs, {}
                for rid, r in reqs.items():
                    r[2].put(EngineDeadError("engine failed: boom"))
                continue
            with self.lock:
                items = list(self.reqs.items())
            for rid, r in items:
                ids, gen, sink, n = r
                tok = n + 1
                text = f" t{tok}"
                reason = None
                if text.strip() in gen.stop_words:
                    reason, text = "stop", ""
                elif tok >= gen.max_new_tokens:
                    reason = "length"
                r[3] = tok
                lp = None
                if gen.logprobs is not None:
                    lp = [{"token_id": tok, "logprob": -0.5,
                           "top_logprobs": {tok + k: -0.5 - k for k in range(gen.logprobs)}}]
                if reason:
                    with self.lock:
                        self.reqs.pop(rid, None)
                sink.put(Out(rid, text, [tok], lp, reason, len(ids), tok))

    def stats(self):
        return {"num_running": len(self.reqs), "num_waiting": 0, "kv_blocks_total": 100,
                "kv_blocks_free": 100 - len(self.reqs), "kv_usage": len(self.reqs) / 100, "num_preemptions": 0,
                "prefix_cache_hit_rate": 0.0, "tokens_in": 0, "tokens_out": 0}

    def check_health(self):
        if self.dead:
            raise EngineDeadError("engine step loop died: boom")

    def shutdown(self):
        self.stop = True


async def make_app(engine=None, api_key=None):
    """The real router app over the real replica core and worker host, with a fake engine; in this loop."""
    engine = engine or FakeEngine()
    host = RankZeroHost(engine, asyncio.get_running_loop())

    async def connect():
        return Connection(LocalWorkerClient(host), host.info(), lambda: None)

    core = ReplicaCore(connect, restart=False, poll_timeout=0.2)
    await core.start()
    server = OpenAIServer([LocalBackend(core)], api_key=api_key)
    return create_app(server), engine, core, server


async def make_client(engine=None, api_key=None):
    app, engine, core, server = await make_app(engine, api_key)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    client.engine, client.core, client.server = engine, core, server
    return client


def chat_body(**kw):
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **kw}


def assert_error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if contains:
        for c in ([contains] if isinstance(contains, str) else contains):
            assert c in err["message"], err["message"]
    return err


async def test_models_and_chat():
    c = await make_client()
    r = await c.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["fake-model"]
    r = await c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-")
    assert j["choices"][0]["message"] == {"role": "assistant", "content": " t1 t2 t3 t4"}
    assert j["choices"][0]["finish_reason"] == "length"
    assert j["usage"]["prompt_tokens"] == 3 and j["usage"]["completion_tokens"] == 4
    assert j["usage"]["total_tokens"] == 7
    c.engine.shutdown()


async def test_completions_stream_stop_and_usage():
    c = await make_client()
    body = {"model": "fake-model", "prompt": "a b", "max_tokens": 10, "stop": ["t3"], "stream": True,
            "stream_options": {"include_usage": True}}
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert text == " t1 t2"
    finals = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens"] == 2
    # without include_usage the usage comes with the last choice chunk
    body.pop("stream_options")
    r = await c.post("/v1/completions", json=body)
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert [ch.get("usage") for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 3
    c.engine.shutdown()


async def test_chat_stream_n_and_logprobs():
    c = await make_client()
    r = await c.post("/v1/chat/completions", json=chat_body(n=3, stream=True, logprobs=True, top_logprobs=2,
                                                            stream_options={"include_usage": True}))
    assert r.status_code == 200
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    texts = {0: "", 1: "", 2: ""}
    ntok = {0: 0, 1: 0, 2: 0}
    for ch in chunks:
        for choice in ch["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["logprobs"]:
                ntok[choice["index"]] += len(choice["logprobs"]["content"])
                assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert all(t == " t1 t2 t3 t4" for t in texts.values())
    assert ntok == {0: 4, 1: 4, 2: 4}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["usage"]["prompt_tokens"] == 3
    c.engine.shutdown()


async def test_completion_logprobs_and_batch_prompts():
    c = await make_client()
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": ["a", "b c"], "max_tokens": 2,
                                              "logprobs": 1, "n": 2})
    j = r.json()
    assert [ch["index"] for ch in j["choices"]] == [0, 1, 2, 3]
    lp = j["choices"][0]["logprobs"]
    assert lp["tokens"] == [" t1", " t2"] and lp["text_offset"] == [0, 3] and len(lp["top_logprobs"][0]) == 1
    assert j["usage"]["prompt_tokens"] == 1 + 2  # each prompt once, not once per choice
    assert j["usage"]["completion_tokens"] == 8
    c.engine.shutdown()


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 1000}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
    ({"stop": [""]}, "stop"),
    ({"max_tokens": "many"}, "max_tokens"),
])
async def test_bad_parameters_are_400(patch, param):
    c = await make_client()
    r = await c.post("/v1/chat/completions", json=chat_body(**patch))
    err = assert_error(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err
    assert err["type"] == "invalid_request_error"
    c.engine.shutdown()


async def test_malformed_json_unknown_model_and_routes():
    c = await make_client()
    r = await c.post("/v1/chat/completions", content=b'{"model": "fake-model", "messages": [', headers={
        "content-type": "application/json"})
    assert_error(r, 400, contains="JSON")
    r = await c.post("/v1/chat/completions", content=b"[1, 2]")
    assert_error(r, 400)
    r = await c.post("/v1/chat/completions", json=chat_body(model="gpt-17"))
    assert_error(r, 404, param="model", contains="gpt-17")
    r = await c.get("/v1/nothing")
    assert_error(r, 404)
    r = await c.get("/v1/chat/completions")
    assert_error(r, 405)
    c.engine.shutdown()


async def test_prompt_too_long_names_both_numbers():
    c = await make_client()
    r = await c.post("/v1/chat/completions", json=chat_body(max_tokens=62))
    err = assert_error(r, 400, param="messages", contains=["(3 in the prompt, 62 for the completion", "64"])
    assert err["code"] == "context_length_exceeded"
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x " * 70, "max_tokens": 1})
    assert_error(r, 400, param="prompt", contains=["70", "64"])
    # no max_tokens on chat: the rest of the session
    r = await c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.json()["usage"]["completion_tokens"] == 64 - 2
    c.engine.shutdown()


async def test_api_key():
    c = await make_client(api_key="sekrit")
    assert_error(await c.post("/v1/chat/completions", json=chat_body()), 401)
    assert_error(await c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}), 401)
    assert_error(await c.get("/v1/models"), 401)
    r = await c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 200
    assert (await c.get("/health")).status_code == 200  # probes need no key
    c.engine.shutdown()


async def test_overloaded_is_503_with_retry_after():
    eng = FakeEngine()
    eng.max_waiting = 0
    c = await make_client(eng)
    r = await c.post("/v1/chat/completions", json=chat_body())
    assert_error(r, 503)
    assert int(r.headers["retry-after"]) >= 1
    eng.shutdown()


async def test_draining_refuses_new_requests():
    c = await make_client()
    c.server.draining = True
    r = await c.post("/v1/chat/completions", json=chat_body())
    assert_error(r, 503, contains="shutting down")
    assert "retry-after" in r.headers
    assert (await c.get("/health")).status_code == 503
    c.engine.shutdown()


async def test_dead_engine_fails_health_and_requests():
    eng = FakeEngine(step_s=0.02)
    c = await make_client(eng)
    assert (await c.get("/health")).status_code == 200
    task = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body(max_tokens=50)))
    await asyncio.sleep(0.1)
    eng.dead = True
    r = await asyncio.wait_for(task, 5)
    assert_error(r, 503)
    h = await c.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"
    r = await c.post("/v1/chat/completions", json=chat_body())
    assert_error(r, 503)
    eng.shutdown()


async def test_metrics_text():
    c = await make_client()
    await c.post("/v1/chat/completions", json=chat_body())
    text = (await c.get("/metrics")).text
    for name in ("cluster_requests_total", "cluster_time_to_first_token_seconds_bucket",
                 "cluster_time_per_output_token_seconds_count", "cluster_prompt_tokens_total",
                 "cluster_generation_tokens_total", "cluster_kv_cache_usage_ratio", "cluster_requests_waiting",
                 "cluster_preemptions_total", "cluster_kv_cache_free_blocks"):
        assert name in text, name
    assert 'cluster_requests_total{endpoint="chat",model="fake-model",status="ok"} 1.0' in text
    c.engine.shutdown()


async def test_batched_adds_and_abort_on_close():
    """Concurrent requests reach rank 0 in few add calls; a consumer that stops reading aborts its request."""
    eng = FakeEngine(step_s=0.01)
    c = await make_client(eng)
    host_client = c.core.conn.client
    calls = []
    orig = host_client.add_requests

    async def counting(items):
        calls.append(len(items))
        await asyncio.sleep(0.01)
        return await orig(items)

    host_client.add_requests = counting
    rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=chat_body()) for _ in range(20)])
    assert all(r.status_code == 200 for r in rs)
    assert sum(calls) == 20 and len(calls) < 20, calls

    job = Job("x", [Choice(0, "a b", {"max_new_tokens": 50})], work=52)
    gen = c.core.generate(job)
    assert isinstance(await gen.__anext__(), Started)
    assert isinstance(await gen.__anext__(), Deltas)
    await gen.aclose()
    for _ in range(50):
        if "x-0" in eng.aborted:
            break
        await asyncio.sleep(0.02)
    assert "x-0" in eng.aborted and not eng.reqs
    assert c.core.pending_work == 0
    eng.shutdown()


async def test_openai_sdk_in_process():
    import openai

    c = await make_client(api_key="k")
    sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=c, max_retries=0)
    r = await sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, seed=1, temperature=0.5, top_p=0.9,
                                          extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    assert r.choices[0].message.content == " t1 t2 t3" and r.usage.completion_tokens == 3
    stream = await sdk.completions.create(model="fake-model", prompt="hi", max_tokens=3, stream=True,
                                          stream_options={"include_usage": True})
    pieces, usage = [], None
    async for ch in stream:
        pieces += [x.text for x in ch.choices]
        usage = ch.usage or usage
    assert "".join(pieces) == " t1 t2 t3" and usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as ei:
        await sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=100)
    assert "64" in str(ei.value)
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    bad = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", http_client=c, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    c.engine.shutdown()


async def test_webui_page():
    c = await make_client()
    r = await c.get("/")
    assert r.status_code == 200 and "/v1/chat/completions" in r.text
    c.engine.shutdown()


def test_webui_script_sends_images_as_parts(tmp_path):
    """The page's script, run by node against a fake DOM: an attached image goes out as an image_url part."""
    import shutil
    import subprocess
    from pathlib import Path

    from cluster.deployments.webui import page

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    html = page("")
    script = tmp_path / "page.js"
    script.write_text(html[html.index("<script>") + len("<script>"):html.index("</script>")])
    harness = Path(__file__).with_name("webui_harness.js")
    done = subprocess.run([node, str(harness), str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


async def test_stream_never_started_is_cleaned_up():
    """A streamed response whose body is never read (client gone before it started) still aborts its request."""
    import gc

    c = await make_client()
    before = c.server.in_flight
    body, stream = await c.server.completion(json.dumps(chat_body(max_tokens=50, stream=True)).encode(), chat=True)
    assert body is None and c.server.in_flight == before + 1
    del stream
    gc.collect()
    assert c.server.in_flight == before
    for _ in range(50):
        if c.engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert c.engine.aborted and not c.engine.reqs
    c.engine.shutdown()


async def test_two_models_route_by_name():
    async def core_for(engine):
        host = RankZeroHost(engine, asyncio.get_running_loop())

        async def connect():
            return Connection(LocalWorkerClient(host), host.info(), lambda: None)

        core = ReplicaCore(connect, restart=False, poll_timeout=0.2)
        await core.start()
        return core

    a, b = FakeEngine(), FakeEngine()
    b.session_len = 32
    server = OpenAIServer([LocalBackend(await core_for(a), "alpha"), LocalBackend(await core_for(b), "beta")])
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://test")
    models = (await c.get("/v1/models")).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("alpha", 64), ("beta", 32)]
    for name, eng in (("alpha", a), ("beta", b)):
        r = await c.post("/v1/chat/completions", json=chat_body(model=name))
        assert r.status_code == 200 and r.json()["model"] == name
    assert_error(await c.post("/v1/chat/completions", json=chat_body(model="beta", max_tokens=31)), 400,
                 contains="32")
    a.shutdown()
    b.shutdown()


async def test_poll_coalesces_a_stream_but_not_its_finish(monkeypatch):
    from cluster.workers import host as host_module

    monkeypatch.setattr(host_module, "REPLY_INTERVAL_S", 0.5)
    engine = FakeEngine(step_s=0.002)
    host = RankZeroHost(engine, asyncio.get_running_loop())
    host.add_requests([EngineRequest("r", [1, 2], {"max_new_tokens": 20})])
    t0 = time.monotonic()
    first = (await host.poll(1.0)).outputs["r"]
    assert first.finish_reason is None and len(first.token_ids) <= 3  # the first output goes at once
    last = (await host.poll(1.0)).outputs["r"]
    assert last.finish_reason == "length"
    assert time.monotonic() - t0 < 0.3  # the finish was not held back for the reply interval
    assert len(first.token_ids) + len(last.token_ids) == 20  # the rest came in one reply
    engine.shutdown()


async def test_echo_returns_the_prompt_and_refuses_what_it_cannot_echo():
    c = await make_client()
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "a b", "max_tokens": 2, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a b t1 t2"
    # the prompt's own logprobs are not computed: refused, not silently left out
    assert_error(await c.post("/v1/completions", json={"model": "fake-model", "prompt": "a b", "echo": True,
                                                       "logprobs": 1}), 400, contains=["echo", "logprobs"])
    assert_error(await c.post("/v1/completions", json={"model": "fake-model", "prompt": [1, 2], "echo": True}),
                 400, contains="text prompts")
    c.engine.shutdown()


class HeldBackEngine(FakeEngine):
    """Each request's first token comes after `delay` seconds, with its text held back (a partial character):
    Out text '' until the second token completes it."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay, self.born = delay, {}

    def submit(self, ids, gen, rid, loop, sink):
        self.born[rid] = time.perf_counter()
        return super().submit(ids, gen, rid, loop, sink)

    def loop(self):
        while not self.stop:
            time.sleep(self.step_s)
            with self.lock:
                items = [(rid, r) for rid, r in self.reqs.items()
                         if time.perf_counter() - self.born.get(rid, 0) >= self.delay]
            for rid, r in items:
                ids, gen, sink, n = r
                tok = n + 1
                r[3] = tok
                text = "" if tok == 1 else (" t1 t2" if tok == 2 else f" t{tok}")
                reason = "length" if tok >= gen.max_new_tokens else None
                if reason:
                    with self.lock:
                        self.reqs.pop(rid, None)
                sink.put(Out(rid, text, [tok], None, reason, len(ids), tok))


async def test_chat_stream_role_comes_with_the_first_token_and_every_step_streams():
    """The role chunk is not sent on arrival (a client timing the first chunk would read prefill as ~0), and a
    step whose text is held back still streams a chunk (empty content), so clients see progress."""
    c = await make_client(HeldBackEngine(delay=0.4))
    t0 = time.perf_counter()
    arrivals = []
    async with c.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append((time.perf_counter() - t0, json.loads(line[6:])))
    deltas = [ch["choices"][0]["delta"] for _, ch in arrivals]
    assert arrivals[0][0] >= 0.4 and deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"content": ""}  # the held-back first token
    assert "".join(d.get("content", "") for d in deltas) == " t1 t2 t3 t4"
    assert len(arrivals) >= 3  # the role, the held-back step, the rest (steps between two polls are merged)
    assert arrivals[-1][1]["choices"][0]["finish_reason"] == "length"
    c.engine.shutdown()
