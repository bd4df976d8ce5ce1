"""Token-exact greedy parity with transformers `generate` (fp32, CPU, 32 new tokens) on the same weights."""
import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from conftest import hf_greedy

GREEDY32 = GenerationConfig(max_new_tokens=32, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello there, how are you doing today?", "The capital of France is"]


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2", "internlm2", "gqa1"])
def test_greedy_matches_transformers(kind, tiny_models, engine_cache):
    path, hf_model = tiny_models(kind)
    hf_ref = tiny_models("llama")[1] if kind == "internlm2" else hf_model  # repacked Llama: same tokens as Llama
    engine = LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", dtype="float32"))
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate([ids], GREEDY32)[0].token_ids
        assert ours == hf_greedy(hf_ref, ids, 32), f"{kind}: diverged from transformers"


def test_embedded_default_matches_transformers(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.convert.source import default_model_path

    gguf = default_model_path()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    engine = LLMEngine(None, EngineConfig(device="cpu", dtype="float32"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenizer.prompt_ids(msgs)
    ours = engine.generate([ids], GREEDY32)[0]
    assert ours.token_ids == hf_greedy(hf_model, ids, 32)
    assert "Paris" in ours.text
