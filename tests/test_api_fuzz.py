"""Schema fuzzing: schemathesis reads the server's own /openapi.json and sends generated requests, valid and
invalid, to the real router app over the real engine path (replica core, rank-0 host, AsyncEngine) on a tiny
random-weight Llama with SmolLM2's tokenizer (fp32, CPU), served by uvicorn on the loopback.

No answer may be a 5xx or carry internal text, each must come within a bound, and afterwards the engine still
serves and holds no KV blocks. The example count is bounded and derandomized, so CI runs the same cases each time."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from cluster.config import EngineConfig  # noqa: E402
from cluster.deployments.replica import Connection, LocalWorkerClient, ReplicaCore  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402
from cluster.engine.engine import LLMEngine  # noqa: E402
from cluster.serving.app import create_app  # noqa: E402
from cluster.serving.backends import LocalBackend  # noqa: E402
from cluster.serving.server import OpenAIServer  # noqa: E402
from cluster.workers.host import RankZeroHost  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INTERNAL = ("Traceback", "IndexError", "RuntimeError", "Overflow", "TextEncodeInput", "RecursionError")


class ServerThread:
    """The router app on uvicorn in a thread with its own event loop (the replica core lives on that loop)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the fuzzing server did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main():
            host = RankZeroHost(self.engine, asyncio.get_running_loop())

            async def connect():
                return Connection(LocalWorkerClient(host), host.info(), lambda: None)

            core = ReplicaCore(connect, restart=False, poll_timeout=0.2)
            await core.start()
            app = create_app(OpenAIServer([LocalBackend(core, name="tiny")], api_key=KEY))
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                        lifespan="off"))
            await self.server.serve()

        loop.run_until_complete(main())

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def api(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    engine = AsyncEngine(LLMEngine(str(path), EngineConfig(device="cpu", dtype="float32", session_len=64,
                                                           num_blocks=64, max_batch_size=8, cache_dir=engine_cache)))
    srv = ServerThread(engine)
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_dict(httpx.get(api.url + "/openapi.json", timeout=10).json())


CASES = [("POST", "/v1/chat/completions", 60, mode) for mode in ("positive", "negative")] + [
    ("POST", "/v1/completions", 60, mode) for mode in ("positive", "negative")] + [
    ("GET", "/v1/models", 3, "positive"), ("GET", "/v1/models/{model_id}", 10, "positive"),
    ("GET", "/health", 3, "positive"), ("GET", "/metrics", 3, "positive")]  # no parameters to break: no negative


@pytest.mark.parametrize("method, path, examples, mode", CASES)
def test_no_server_error_no_hang(api, api_schema, method, path, examples, mode):
    """Valid requests (positive) and requests that break the schema on purpose (negative) alike."""
    strategy = api_schema[path][method].as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def one(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # a random name would stop at the 404, before the engine sees anything
        t0 = time.monotonic()
        r = case.call(base_url=api.url, headers=AUTH, timeout=30)
        assert r.status_code < 500, (case.body, r.status_code, r.text[:500])
        assert time.monotonic() - t0 < 30
        if r.status_code >= 400:
            assert not any(word in r.text for word in INTERNAL), r.text[:500]
            if "application/json" in str(r.headers.get("content-type")):
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:500]

    one()


def test_engine_serves_and_holds_nothing_after_fuzzing(api):
    """Runs after the fuzzing (file order): every request ended, the engine is healthy, no KV block is held."""
    r = httpx.post(api.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    bm = api.engine.engine.bm
    deadline = time.monotonic() + 10
    while bm.num_free != bm.num_blocks and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bm.num_free == bm.num_blocks
    api.engine.check_health()
