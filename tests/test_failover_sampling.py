"""Seeded sampling survives a move (issue 16, part 2): each seeded token's noise comes from (seed, its position),
so a request resumed with its earlier output as prompt, as the router's failover resubmits it, draws the tokens the
uninterrupted run drew. Greedy requests likewise."""
import pytest

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.sampler import position_seed


@pytest.fixture(scope="module")
def engine(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu"))


PROMPT = "The quick brown fox jumps over the lazy dog because"


def test_position_seed_separates_positions_and_seeds():
    vals = {position_seed(s, p) for s in (0, 1, 2**40) for p in range(64)}
    assert len(vals) == 3 * 64 and all(0 <= v < 2**63 for v in vals)


@pytest.mark.parametrize("g", [
    GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True),
    GenerationConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True),
], ids=["seeded", "greedy"])
def test_resumed_request_continues_the_same_tokens(engine, g):
    ids = engine.tokenizer.prompt_ids(PROMPT)
    whole = engine.generate([ids], g)[0].token_ids
    assert len(whole) == 24
    for cut in (1, 9, 23):  # resumed after `cut` tokens, on "another replica" (a fresh request)
        rest = engine.generate([ids + whole[:cut]], g.model_copy(update={"max_new_tokens": 24 - cut}))[0].token_ids
        assert whole[:cut] + rest == whole, cut


def test_seeded_tokens_do_not_depend_on_batch_or_overlap(engine):
    g = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=77, ignore_eos=True)
    a = engine.generate([PROMPT], g)[0].token_ids
    b = engine.generate(["other prompt", PROMPT], [g.model_copy(update={"seed": 5}), g])[1].token_ids
    assert a == b
