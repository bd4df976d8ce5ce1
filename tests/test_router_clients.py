"""Terminal client, web UI proxy, serving benchmark and Serve config files, against the router app over a fake
engine served by uvicorn in a thread (real HTTP, no Ray, no model)."""
from __future__ import annotations

import asyncio
import copy
import io
import json
import socket
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest
import yaml

from test_router_protocol import make_app

REPO = Path(__file__).resolve().parent.parent
KEY = "k3y"
SERVED: dict = {}  # what api_url serves: "engine" (the fake engine), for tests that look behind the HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_url():
    import uvicorn

    port = _free_port()
    ready = threading.Event()
    holder: dict = {}

    def run():
        async def main():
            app, engine, _, _ = await make_app(api_key=KEY)
            holder["engine"] = SERVED["engine"] = engine
            srv = holder["srv"] = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            task = asyncio.create_task(srv.serve())
            while not srv.started:
                await asyncio.sleep(0.02)
            ready.set()
            await task

        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(20)
    yield f"http://127.0.0.1:{port}"
    holder["srv"].should_exit = True
    holder["engine"].shutdown()
    t.join(10)


def test_terminal_client_keeps_history(api_url, monkeypatch):
    from cluster.client import APIClient, chat_loop

    lines = iter(["hello there", "and again", "exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    out = io.StringIO()
    client = APIClient(api_url + "/v1", KEY)
    with redirect_stdout(out):
        assert chat_loop(client, None, "be brief", stats=True, max_tokens=3) == 0
    text = out.getvalue()
    assert "chat with fake-model" in text
    assert text.count(" t1 t2 t3") == 2
    prompts = [int(x) for x in __import__("re").findall(r"\[(\d+) prompt", text)]
    assert len(prompts) == 2 and prompts[1] > prompts[0]  # the second turn carries the first


def test_terminal_client_attaches_images(monkeypatch, tmp_path, capsys):
    """`/image PATH` attaches a file (inline, as a data: URL) to the next message only; a bad path is a one-line
    error and sends nothing."""
    from PIL import Image

    from cluster.client import APIClient, chat_loop

    Image.new("RGB", (8, 6), "red").save(tmp_path / "red.png")
    lines = iter([f"/image {tmp_path}/nope.png", f"/image {tmp_path}/red.png", "what colour?", "and now?", "exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    sent = []

    def chat_stream(model, messages, **params):
        sent.append(copy.deepcopy(messages))
        yield {"text": "red"}

    client = APIClient("http://127.0.0.1:1")
    monkeypatch.setattr(client, "chat_stream", chat_stream)
    assert chat_loop(client, "m") == 0
    out = capsys.readouterr().out
    assert "[error: image file" in out and "[image attached" in out
    assert len(sent) == 2
    first = sent[0][-1]["content"]
    assert first[0]["type"] == "image_url" and first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first[1] == {"type": "text", "text": "what colour?"}
    assert sent[1][-1]["content"] == "and now?" and sent[1][0]["content"] == first  # history keeps the image


def test_client_cli_errors_are_one_line(api_url, capsys):
    from cluster.cli import main

    assert main(["client", api_url, "--api-key", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "401" in err and len(err.strip().splitlines()) == 1
    assert main(["client", f"http://127.0.0.1:{_free_port()}"]) == 2


def test_client_reads_the_stream_with_the_openai_sdk(api_url):
    """The client is the openai SDK's: its errors are one line with the server's message; closing a stream (what
    Ctrl-C does) closes the connection, and the server aborts the request."""
    import openai

    from cluster.client import APIClient

    client = APIClient(api_url, KEY)
    engine = SERVED["engine"]
    try:
        assert isinstance(client.sdk, openai.OpenAI)
        assert client.models() == ["fake-model"]
        with pytest.raises(RuntimeError) as ei:
            list(client.chat_stream("no-such-model", [{"role": "user", "content": "hi"}]))
        assert str(ei.value).startswith("HTTP 404: ") and "fake-model" in str(ei.value)
        assert len(str(ei.value).splitlines()) == 1
        engine.step_s, aborted = 0.05, len(engine.aborted)  # slow enough to stop mid-answer
        stream = client.chat_stream("fake-model", [{"role": "user", "content": "hi"}], max_tokens=40)
        assert next(stream) == {"text": " t1"}
        stream.close()
        deadline = time.time() + 5
        while len(engine.aborted) == aborted:
            assert time.time() < deadline, "closing the stream did not abort the request"
            time.sleep(0.02)
    finally:
        engine.step_s = 0.002
        client.close()


def test_webui_proxy(api_url):
    from cluster.deployments.webui import make_server

    srv = make_server(api_url, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and "<script>" in page.text and "/v1/chat/completions" in page.text
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 401  # the key is the user's to give
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        text = "".join(json.loads(d[6:])["choices"][0]["delta"].get("content", "") for d in data[:-1])
        assert text == " t1 t2 t3"
    finally:
        srv.shutdown()
        srv.server_close()


def test_bench_serving(api_url, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "benchmarks" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    rc = bench.main([api_url, "--concurrency", "1,4", "--num-prompts", "8", "--max-tokens", "5",
                     "--prompt-tokens", "10", "--api-key", KEY, "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 4]
    for lv in res["levels"]:
        assert lv["completed"] == 8 and lv["mean_output_tokens"] == 5
        for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "output_token_throughput"):
            assert lv[k] is not None and lv[k] > 0


def _app_args_of(cfg: dict) -> dict:
    (app,) = cfg["applications"]
    assert app["import_path"] == "cluster.router:build_app"
    return app.get("args") or {}


def test_serve_configs_build(capsys):
    """The Serve config in the repo, the one `--print-config` writes and KubeRay's all build the application."""
    from cluster.cli import main
    from cluster.router import build_app

    configs = [yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())]
    rs = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    configs.append(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    assert main(["serve", "--print-config", "--replicas", "3", "--session-len", "2048", "--model-name", "m"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    configs.append(printed)
    spec = printed["applications"][0]["args"]["models"][0]
    assert spec["replicas"] == 3 and spec["engine"]["session_len"] == 2048 and spec["name"] == "m"
    for cfg in configs:
        build_app(_app_args_of(cfg))


def test_bad_serve_options_fail_fast(capsys):
    from cluster.cli import main

    assert main(["serve", "--print-config", "--replicas", "0"]) == 2
    assert "replicas" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--cache-max-entry-count", "3"]) == 2
    assert "cache_max_entry_count" in capsys.readouterr().err
