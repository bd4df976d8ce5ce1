"""The CLI's shape: engine flags derived from EngineConfig, one chat loop for `chat` and `client`, `cluster --help`
naming real commands, `make serve HOST= PORT=`, and `cluster serve` failing fast (a wrong model before Ray starts,
a Ray cluster that refuses us before `ray.init` retries for half a minute). No Ray, no model."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.cli_args import engine_config_from_args, flag
from cluster.config import EngineConfig

REPO = Path(__file__).resolve().parent.parent


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**os.environ, **(env or {})})
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_every_engine_field_has_a_flag(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: argparse may break a line after a hyphen
    p = _subparser(command)
    options = {s for a in p._actions for s in a.option_strings}
    help_text = " ".join(p.format_help().split())
    for name, info in EngineConfig.model_fields.items():
        assert flag(name) in options, name
        if info.description:
            assert " ".join(info.description.split()) in help_text, name
    # nothing given: nothing set, so EngineConfig's own defaults apply
    assert engine_config_from_args(p.parse_args([])).model_fields_set == set()


def test_changed_default_shows_in_help(monkeypatch):
    monkeypatch.setattr(EngineConfig.model_fields["max_prefill_token_num"], "default", 777)
    help_text = " ".join(_subparser("serve").format_help().split())
    assert "token budget of one step (prefill chunks + decodes) (default: 777)" in help_text


def test_old_flags_still_work():
    args = _subparser("chat").parse_args(
        ["m", "--tp", "2", "--dtype", "float16", "--session-len", "512", "--max-batch-size", "8",
         "--cache-max-entry-count", "0.5", "--quant-policy", "8", "--device", "cpu", "--no-prefix-caching"])
    ec = engine_config_from_args(args)
    assert args.model == "m"
    assert (ec.tp, ec.dtype, ec.session_len, ec.max_batch_size, ec.cache_max_entry_count, ec.quant_policy,
            ec.device, ec.enable_prefix_caching) == (2, "float16", 512, 8, 0.5, 8, "cpu", False)
    args = _subparser("serve").parse_args(["--no-cuda-graph", "--overlap-steps", "--no-enable-prefix-caching"])
    ec = engine_config_from_args(args)
    assert (ec.cuda_graph, ec.overlap_steps, ec.enable_prefix_caching) == (False, True, False)
    with pytest.raises(SystemExit):
        _subparser("serve").parse_args(["--quant-policy", "2"])  # choices of the Literal


def test_help_names_real_commands(capsys):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    listed = out.split("commands:")[1].split("(")[0].replace(",", " ").split()
    assert listed == list(sub.choices) and "benchmark" not in out


def test_serve_does_not_import_cli():
    """cli -> serve -> cli_args: one direction, so an ImportError is never a question of import order."""
    code = "import sys, cluster.serve; assert 'cluster.cli' not in sys.modules, 'serve imports cli'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "except ImportError" not in (REPO / "cluster" / "cli.py").read_text()


def test_make_serve_host_port():
    r = subprocess.run(["make", "-n", "serve", "HOST=0.0.0.0", "PORT=8100"], capture_output=True, text=True,
                       cwd=REPO, check=True)
    (line,) = [ln for ln in r.stdout.splitlines() if "cluster serve" in ln]
    assert "--host 0.0.0.0" in line and "--port 8100" in line


# -- the chat loop ------------------------------------------------------------------------------------------------
def _chat(monkeypatch, capsys, lines: list, send, **kw) -> tuple[int, str]:
    from cluster.chat_loop import chat_loop

    feed = iter(lines)

    def fake_input(_prompt=""):
        item = next(feed)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    rc = chat_loop(send, "m", lambda p: f"url:{p}", **kw)
    return rc, capsys.readouterr().out


def test_chat_loop_history_clear_and_leaving(monkeypatch, capsys):
    seen = []

    def send(messages):
        seen.append([m["content"] for m in messages])
        yield "ok"

    rc, out = _chat(monkeypatch, capsys, ["a", "", "b", "/clear", "c", KeyboardInterrupt(), "quit"], send,
                    system="sys")
    assert rc == 0 and out.startswith("chat with m;")
    assert seen == [["sys", "a"], ["sys", "a", "ok", "b"], ["sys", "c"]]
    rc, _ = _chat(monkeypatch, capsys, ["a", EOFError()], send)  # Ctrl-D leaves
    assert rc == 0


def test_chat_loop_stop_error_and_image(monkeypatch, capsys):
    """Ctrl-C stops an answer and closes its stream (the request's abort), keeping the text so far; an error
    before any text leaves the history as it was; /image attaches to the next message only."""
    seen, closed = [], []

    def send(messages):
        seen.append([m["content"] for m in messages])
        turn = len(seen)
        try:
            if turn == 1:
                yield "part"
                raise KeyboardInterrupt
            if turn == 2:
                raise ValueError("prompt too long")
            yield "fine"
        finally:
            closed.append(turn)

    def bad_attach(path):
        raise ValueError("not an image")

    rc, out = _chat(monkeypatch, capsys, ["one", "two", "/image cat.png", "three", "exit"], send)
    assert rc == 0 and "part [stopped]" in out and "[error: prompt too long]" in out
    assert "[image attached: cat.png" in out
    assert seen[1] == ["one", "part", "two"]
    assert seen[2] == ["one", "part", [{"type": "image_url", "image_url": {"url": "url:cat.png"}},
                                       {"type": "text", "text": "three"}]]
    assert closed == [1, 2, 3]
    from cluster.chat_loop import chat_loop

    lines = iter(["/image x", "exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert chat_loop(send, "m", bad_attach) == 0
    assert "[error: not an image]" in capsys.readouterr().out


# -- cluster serve: fail fast -------------------------------------------------------------------------------------
def test_serve_wrong_model_fails_fast():
    r, took = _cli("serve", "/no/such/model", "--port", "1")
    assert r.returncode == 2 and "ray:" not in r.stdout and "starting" not in r.stdout
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("cluster serve: error:") and "/no/such/model" in line
    assert took < 30, took  # the import of torch, not a Ray start (which took 31.6 s to fail)


@pytest.fixture
def fake_gcs():
    """A gRPC server answering GetClusterId as a Ray 2.60 GCS with token auth does: UNAUTHENTICATED unless the
    token comes along."""
    grpc = pytest.importorskip("grpc")

    def get_cluster_id(_request, context):
        if ("authorization", "Bearer s3cret") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(get_cluster_id)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("ray.rpc.NodeInfoGcsService",
                                                                          {"GetClusterId": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_join_needs_the_token(fake_gcs, tmp_path, monkeypatch):
    from cluster.serve import check_ray_access

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"uses token authentication and .*auth_token has no token: copy"):
        check_ray_access(fake_gcs)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("wrong\n")
    with pytest.raises(RuntimeError, match="refuses the token in"):
        check_ray_access(fake_gcs)
    (tmp_path / ".ray" / "auth_token").write_text("s3cret\n")
    check_ray_access(fake_gcs)
    assert os.environ["RAY_AUTH_MODE"] == "token"  # so ray.init sends it
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match="set RAY_AUTH_MODE=token"):
        check_ray_access(fake_gcs)
    with pytest.raises(RuntimeError, match="no Ray cluster answers at 127.0.0.1:1: start one there"):
        check_ray_access("127.0.0.1:1")


def test_join_refused_is_one_line_and_fast(fake_gcs, tmp_path):
    env = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": "", "RAY_ADDRESS": ""}
    r, took = _cli("serve", "--address", fake_gcs, env=env)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "uses token authentication" in line and "auth_token" in line and "ray:" not in r.stdout
    assert took < 30, took
