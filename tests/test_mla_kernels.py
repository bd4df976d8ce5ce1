"""The MLA Triton kernels (cluster/kernels/mla.py), run on the CPU by Triton's interpreter, against
mla_reference.py: the latent store, the paged decode over latent rows (splits, several pages a tile, heads not a
multiple of the head block, ragged contexts) and the causal prefill of mixed batches (prefix-cached chunks, whole
prompts, decode rows). Outputs start as NaN, so an element never written fails."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: @triton.jit reads it when the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_kernels import _load, _poisoned_empty  # noqa: E402  (its import also patches the interpreter's bf16 dots)

from cluster.kernels import mla_reference as ref  # noqa: E402

_load("attention")  # the reduce kernel mla.py launches, interpreted too
mla = _load("mla")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every float tensor the kernels allocate (their outputs and partials) starts as NaN."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


def _case(B: int, H: int, L: int, R: int, page: int, ctx: list[int], dtype=torch.float32):
    nb = sum(-(-c // page) for c in ctx) + 3
    cache = torch.randn(nb, page, 1, L + R, dtype=dtype)
    perm = torch.randperm(nb).tolist()  # each sequence's pages scattered over the cache
    width = max(-(-c // page) for c in ctx)
    tables = torch.zeros(B, width, dtype=torch.int32)
    for b, c in enumerate(ctx):
        n = -(-c // page)
        tables[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    q = torch.randn(B, H, L + R, dtype=dtype)
    return q, cache, tables, torch.tensor(ctx, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, page, splits", [(4, 16, 1), (20, 8, 3), (16, 64, 2)])
def test_mla_decode_matches_reference(dtype, H, page, splits):
    torch.manual_seed(H * page + splits)
    L, R = 32, 16
    q, cache, tables, ctx = _case(3, H, L, R, page, [1, 45, 70], dtype)
    scale = (16 + R) ** -0.5
    want = ref.mla_decode_attention(q.float(), cache.float(), tables, ctx, scale, L)
    got = mla.mla_decode_attention(q, cache, tables, ctx, scale, L, num_splits=splits)
    assert got.shape == (3, H, L) and not got.isnan().any()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).norm() / want.norm() < tol


def test_mla_decode_default_splits_and_bound():
    """The split count from the block table's capacity (what a CUDA graph captures) gives the same result."""
    q, cache, tables, ctx = _case(2, 16, 32, 16, 16, [130, 7])
    want = ref.mla_decode_attention(q, cache, tables, ctx, 0.2, 32)
    got = mla.mla_decode_attention(q, cache, tables, ctx, 0.2, 32)
    assert (got - want).norm() / want.norm() < 1e-3


def test_store_latent_skips_minus_one():
    cache = torch.zeros(4, 8, 1, 48)
    want = cache.clone()
    x = torch.randn(5, 48)
    slots = torch.tensor([3, -1, 17, 31, -1])
    mla.store_latent(x, cache, slots)
    ref.store_latent(x, want, slots)
    assert torch.equal(cache, want) and torch.equal(cache.view(-1, 48)[17], x[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 2])
def test_mla_attention_mixed_batch_matches_reference(dtype, splits):
    """A chunk after a cached prefix (5 new of 40), a whole prompt (33), a decode row (1 of 19), an empty one."""
    torch.manual_seed(7)
    L, R, H, page = 32, 16, 20, 8
    q_lens, ctx = [5, 33, 1, 0], [40, 33, 19, 8]
    _, cache, tables, ctx_t = _case(4, H, L, R, page, ctx, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), H, L + R, dtype=dtype)
    want = ref.mla_attention(q.float(), cache.float(), tables, ctx_t, cu, 0.2, L)
    got = mla.mla_attention(q, cache, tables, ctx_t, cu, 0.2, L, num_splits=splits)
    assert got.shape == (sum(q_lens), H, L) and not got.isnan().any()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).norm() / want.norm() < tol


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
def test_engine_through_the_interpreted_kernels_matches_transformers(kind, tokenizer_dir, tmp_path, monkeypatch):
    """The whole engine on the CPU with the MLA store, prefill (16-token chunks, so later chunks read the cache)
    and decode going through the Triton kernels (interpreted): the layer's views and strides as the GPU gets them."""
    import mla_models
    from cluster import kernels
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine
    from conftest import hf_greedy
    from test_tp import GREEDY, PROMPTS

    monkeypatch.setattr(kernels, "_triton", lambda name, t: mla if name == "mla" else None)
    path, hf_model = mla_models.build(kind, tokenizer_dir, tmp_path / kind)
    engine = LLMEngine(str(path), EngineConfig(cache_dir=str(tmp_path / "converted"), device="cpu", dtype="float32",
                                               max_prefill_token_num=16))
    tail = " Please answer in one short sentence, in English, and politely."
    ids = [engine.tokenizer.encode(p + tail) for p in PROMPTS]
    assert max(len(x) for x in ids) > 16
    got = [r.token_ids for r in engine.generate(ids, GREEDY)]
    assert got == [hf_greedy(hf_model, x, GREEDY.max_new_tokens) for x in ids], kind
