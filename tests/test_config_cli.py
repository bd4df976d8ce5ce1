"""Bad settings fail with clear messages; the CLI answers mistakes with one line, and chats."""
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cluster.config import EngineConfig, GenerationConfig


@pytest.mark.parametrize("kw, field", [
    ({"cache_max_entry_count": 0}, "cache_max_entry_count"),
    ({"cache_max_entry_count": 1.5}, "cache_max_entry_count"),
    ({"tp": 0}, "tp"),
    ({"block_size": 24}, "block_size"),
    ({"max_batch_size": -1}, "max_batch_size"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"quant_policy": 2}, "quant_policy"),
])
def test_engine_config_rejects(kw, field):
    with pytest.raises(ValidationError, match=field):
        EngineConfig(**kw)


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
    ({"stop_words": [""]}, "stop_words"),
    ({"logprobs": 50}, "logprobs"),
])
def test_generation_config_rejects(kw, field):
    with pytest.raises(ValidationError, match=field):
        GenerationConfig(**kw)


def test_bad_tp_names_valid_sizes(tiny_models, engine_cache):
    from cluster.engine.engine import LLMEngine

    path, _ = tiny_models("llama")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tp=3 .*valid tp sizes: \[1, 2, 4\]"):
        LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", tp=3))


def test_kv_cache_too_small_names_numbers(tiny_models, engine_cache):
    from cluster.engine.engine import LLMEngine
    from cluster.engine.errors import OutOfMemoryError

    path, _ = tiny_models("llama")
    with pytest.raises(OutOfMemoryError, match=r"KV cache of 2 blocks .* less than one session of 512 tokens"):
        LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", num_blocks=2))


def _cli(*args, stdin=""):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_missing_model_is_one_line():
    r = _cli("chat", "/no/such/model")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("cluster chat: error:") and "/no/such/model" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_setting_is_one_line():
    r = _cli("chat", "--cache-max-entry-count", "7")
    assert r.returncode == 2 and "cache_max_entry_count" in r.stderr and "Traceback" not in r.stderr


def test_cli_chat_two_turns(default_model_dir):
    r = _cli("chat", "--device", "cpu", "--max-new-tokens", "12", "--temperature", "0",
             stdin="What is the capital of France?\nAnd of Italy?\nexit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>> ") == 3
    assert "Paris" in r.stdout


def test_cli_convert_tp2(tiny_models, tmp_path):
    from cluster.models.config import ModelConfig

    path, _ = tiny_models("llama")
    r = _cli("convert", str(path), "--tp", "2", "--dtype", "float32", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "c").glob("rank*.safetensors")} == {"rank0.safetensors", "rank1.safetensors"}
    assert ModelConfig.load(tmp_path / "c" / "config.json").tp == 2
