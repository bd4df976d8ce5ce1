"""The router against hostile callers, fast (the fake engine of test_router_protocol behind the real worker host,
replica core and FastAPI app): body caps, a cheap length bound before any tokenizing, images from the server's
files, metrics and health behind the key and cheap, bounded metric labels, deep JSON, strict types and unknown
fields, and a real OpenAPI document."""
from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import pytest

from test_router_protocol import FakeEngine, assert_error, chat_body, make_client

pytestmark = pytest.mark.anyio
KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


class CountingEngine(FakeEngine):
    """Counts the prompts that reach rank 0."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.prepared: list = []
        self.tokenizer.max_token_chars = 16  # what a real tokenizer reports (cluster.engine.tokenizer)

    def prepare_prompt(self, prompt):
        self.prepared.append(prompt)
        return super().prepare_prompt(prompt)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _image_chat(url: str) -> dict:
    return chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": "what is it?"}]}])


async def test_big_body_is_413_before_it_is_read():
    c = await make_client(CountingEngine())
    big = b'{"model": "fake-model", "prompt": "' + b"x" * (20 * 2**20) + b'"}'
    t0 = time.perf_counter()
    r = await c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    err = assert_error(r, 413, contains="at most")
    assert err["code"] == "request_too_large" and time.perf_counter() - t0 < 2

    async def chunks():  # no Content-Length: cut off while reading
        for _ in range(40):
            yield b"x" * 2**20

    r = await c.post("/v1/completions", content=chunks())
    assert_error(r, 413)
    assert c.engine.prepared == []
    c.engine.shutdown()


async def test_prompt_that_cannot_fit_is_refused_without_tokenizing():
    eng = CountingEngine()
    c = await make_client(eng)
    await c.get("/v1/models")  # the router learns session_len and max_token_chars
    long_text = "word " * 2000  # 10,000 characters: at least 625 tokens at 16 characters a token; session 64
    for path, body in (("/v1/completions", {"model": "fake-model", "prompt": long_text, "max_tokens": 4}),
                       ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": long_text}]))):
        err = assert_error(await c.post(path, json=body), 400, contains=["at least 625 tokens", "64"])
        assert err["code"] == "context_length_exceeded"
    assert_error(await c.post("/v1/completions", json={"model": "fake-model", "prompt": list(range(1, 70))}), 400,
                 contains="at least 69 tokens")
    assert eng.prepared == []  # rank 0 never spent a moment on them
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "a short one", "max_tokens": 2})
    assert r.status_code == 200, r.text
    c.engine.shutdown()


async def test_server_files_are_refused_alike(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    c = await make_client(CountingEngine())
    bodies = [str(secret), str(tmp_path / "missing.png"), "../../../../etc/passwd", "~/x.png", f"file://{secret}",
              "http://169.254.169.254/latest"]
    errors = [assert_error(await c.post("/v1/chat/completions", json=_image_chat(u)), 400) for u in bodies]
    assert len({e["message"] for e in errors}) == 1, errors  # nothing tells which paths exist
    assert "data:" in errors[0]["message"] and errors[0]["param"] == "messages"
    assert c.engine.prepared == []
    c.engine.shutdown()


async def test_image_dir_serves_its_files_inline_and_nothing_else(tmp_path):
    from cluster.serving.app import create_app
    from cluster.serving.backends import LocalBackend
    from cluster.serving.server import OpenAIServer

    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "cat.png").write_bytes(_png())
    (tmp_path / "outside.png").write_bytes(_png())
    (pics / "link.png").symlink_to(tmp_path / "outside.png")
    c = await make_client(CountingEngine())
    server = OpenAIServer([LocalBackend(c.core)], image_dir=str(pics))
    c2 = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://test")
    refused = set()
    for url in ("../outside.png", str(tmp_path / "outside.png"), "link.png", "missing.png"):
        refused.add(assert_error(await c2.post("/v1/chat/completions", json=_image_chat(url)), 400)["message"])
    assert len(refused) == 1 and "image directory" in refused.pop()
    assert c.engine.prepared == []
    # the file inside goes to rank 0 inline, as a data: URL (the fake engine refuses images: a 400 after the add)
    await c2.post("/v1/chat/completions", json=_image_chat("cat.png"))
    [prompt] = c.engine.prepared
    url = prompt[0]["content"][0]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(_png()).decode()
    c.engine.shutdown()


async def test_metrics_need_the_key_health_hides_internals():
    c = await make_client(CountingEngine(), api_key=KEY)
    assert_error(await c.get("/metrics"), 401)
    r = await c.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and "cluster_kv_cache_capacity_blocks" in r.text
    h = await c.get("/health")  # probes need no key, and learn nothing but the verdict
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    h = await c.get("/health", headers=AUTH)
    assert h.json()["models"]["fake-model"]["replicas"] == 1
    c.engine.shutdown()


async def test_health_and_metrics_floods_are_cheap():
    from cluster.serving.server import STATS_TTL_S

    c = await make_client(api_key=KEY)
    client = c.core.conn.client
    calls = []
    real_stats = client.stats

    async def stats():  # the call to rank 0 that each /health or /metrics once made
        calls.append(time.monotonic())
        return await real_stats()

    client.stats = stats
    t0 = time.monotonic()
    await asyncio.gather(*[c.get("/health") for _ in range(200)], *[c.get("/metrics", headers=AUTH)
                                                                   for _ in range(200)])
    elapsed = time.monotonic() - t0
    assert 1 <= len(calls) <= elapsed / STATS_TTL_S + 2, (len(calls), elapsed)  # one round a TTL, shared
    c.engine.shutdown()


async def test_dead_engine_shows_at_once_despite_the_cache():
    eng = FakeEngine(step_s=0.02)
    c = await make_client(eng)
    assert (await c.get("/health")).status_code == 200
    eng.dead = True
    assert_error(await c.post("/v1/chat/completions", json=chat_body()), 503)
    assert (await c.get("/health")).status_code == 503
    eng.shutdown()


async def test_unknown_models_do_not_add_series():
    c = await make_client(CountingEngine(), api_key=KEY)
    text0 = (await c.get("/metrics", headers=AUTH)).text
    for i in range(50):
        assert_error(await c.post("/v1/chat/completions", json=chat_body(model=f"nope-{i}"), headers=AUTH), 404)
    text = (await c.get("/metrics", headers=AUTH)).text
    assert "nope-" not in text
    assert 'cluster_requests_total{endpoint="chat",model="unknown",status="404"} 50.0' in text
    assert len(text.splitlines()) - len(text0.splitlines()) <= 1
    c.engine.shutdown()


@pytest.mark.parametrize("raw, contains", [
    (b'{"model": "fake-model", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "JSON"),
    (b'{"model": "fake-model", "prompt": {"a": ' * 3000 + b"1" + b"}" * 3001, "JSON"),
    (b"\xff\xfe not utf-8", "JSON"),
    (b"", "empty"),
])
async def test_unparseable_bodies_are_400(raw, contains):
    c = await make_client()
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(await c.post(path, content=raw, headers={"content-type": "application/json"}), 400,
                     contains=contains)
    c.engine.shutdown()


@pytest.mark.parametrize("patch, param, contains", [
    ({"stream": "yes"}, "stream", "boolean"),
    ({"max_tokens": "10"}, "max_tokens", "integer"),
    ({"max_tokens": 10.5}, "max_tokens", "integer"),
    ({"n": True}, "n", "integer"),
    ({"temperature": "0.5"}, "temperature", "number"),
    ({"bogus_field": 1}, "bogus_field", "Unrecognized request argument"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages.0.colour", "Unrecognized"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "Unrecognized"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids.0", "less than"),
    ({"seed": 2**70}, "seed", "less than"),
    ({"tool_choice": "required"}, None, "tool_choice"),
])
async def test_strict_types_and_unknown_fields(patch, param, contains):
    c = await make_client()
    err = assert_error(await c.post("/v1/chat/completions", json=chat_body(**patch)), 400, contains=contains)
    if param:
        assert err["param"] == param, err
    c.engine.shutdown()


async def test_documented_openai_fields_are_accepted():
    c = await make_client()
    r = await c.post("/v1/chat/completions", json=chat_body(
        user="u1", store=False, metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=True,
        tool_choice="none", stream_options=None, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "refusal": None,
                                                "tool_calls": None}, {"role": "user", "content": "again"}]))
    assert r.status_code == 200, r.text
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [[1, 2], [3]], "max_tokens": 1,
                                              "user": "u1", "seed": 3})
    assert r.status_code == 200, r.text
    c.engine.shutdown()


@pytest.mark.parametrize("prompt, contains", [
    ([1, "a"], "not a mix"),
    ([[1, 2], []], "empty"),
    ([-1], "out of range"),
    ([2**63], "out of range"),
    ([[1, 2.5]], "integers only"),
    ({"text": "x"}, "must be a string"),
])
async def test_completion_prompt_shapes(prompt, contains):
    c = await make_client()
    assert_error(await c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt}), 400,
                 param="prompt", contains=contains)
    c.engine.shutdown()


async def test_openapi_document_describes_the_requests():
    c = await make_client()
    spec = (await c.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    schemas = spec["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert {"400", "401", "413", "503"} <= set(op["responses"])
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert "ChatMessage" in schemas and "ErrorResponse" in schemas
    c.engine.shutdown()
