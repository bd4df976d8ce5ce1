"""Triton multi-head latent attention over the paged latent cache (semantics and layout: mla_reference.py).

* `store_latent`: one program per token writes its L + R row into its slot (slot -1 skipped, no host sync).
* `mla_decode_attention`: one query per sequence, flash-decoding as attention.py's decode: programs are (sequence,
  block of BLOCK_H heads, split); every head of a block shares each [BLOCK_N, L + R] tile of latent rows it loads
  (multi-query: one KV row for all heads), scores are q_lat . c + q_rope . k_rope in two dots, and the output is
  p @ c (the value is the first L dims of the same row). Splits write partial (output, log2-sum-exp2) pairs that
  attention.py's reduce kernel merges. Grid and split count come from python ints only: CUDA-graph capturable.
* `mla_attention`: prefill, chunks and mixed batches through the same kernel, one query token a row: each token
  reads its sequence's block table and sees keys up to its own position (causal), found on the device from
  cu_seqlens_q and context_lens (no host sync). Tokens of a sequence do not share K tiles as a query-tiled
  flash-attention kernel would, and the absorbed form's scores are 576 dims wide where decompressed K would be
  192: a first kernel, not tuned (decompressing the latent for long prefills is the known faster way).
"""
import torch
import triton
import triton.language as tl

from cluster.kernels import pdl
from cluster.kernels.attention import (LOG2E, _decode_reduce_kernel, _dot, _softmax_step, decode_num_splits,
                                      split_buffers)
from cluster.kernels.pdl import wait_for_previous

# BLOCK_H heads a program (tl.dot needs 16 rows); 32-key tiles keep a [32, 576] bf16 tile and the [16, 512] fp32
# accumulator in registers. A first guess: not tuned on a GPU.
DECODE_CONFIG = dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2, MIN_SPLIT_TOKENS=64, MAX_SPLITS=64)


@triton.jit
def _store_latent_kernel(x_ptr, c_ptr, slot_ptr, stride_xt, stride_cb, stride_cs,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding token (a CUDA-graph batch slot)
        return
    d = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + d, mask=d < D)
    tl.store(c_ptr + (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + d, x.to(c_ptr.dtype.element_ty),
             mask=d < D)


def store_latent(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, L + R] (unit stride along the row) into cache [nb, bs, 1, L + R] at slot_mapping."""
    T, D = latent.shape
    if T == 0:
        return
    assert latent.stride(1) == 1 and cache.stride(3) == 1 and cache.shape[3] == D
    _store_latent_kernel[(T,)](latent, cache, slot_mapping, latent.stride(0), cache.stride(0), cache.stride(1),
                               D=D, BLOCK_D=triton.next_power_of_2(D), PAGE=cache.shape[1], num_warps=4)


@triton.jit(do_not_specialize=["stride_bt", "NUM_SPLITS"])
def _mla_decode_kernel(q_ptr, c_ptr, bt_ptr, ctx_ptr, seq_ptr, o_ptr, mo_ptr, mlse_ptr, qk_scale,
                       stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_cs, stride_bt,
                       H, NUM_SPLITS, L: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """Row b of q attends to the first ctx[b] cached rows of its sequence: b itself (decode), or with ROWS
    seq[b] (a query token of a prefill, ctx[b] its position + 1)."""
    wait_for_previous(USE_PDL)
    b = tl.program_id(0)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    if ROWS:
        seq = tl.load(seq_ptr + b)
    else:
        seq = b
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)

    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = head < H
    dl = tl.arange(0, L)
    dr = tl.arange(0, R)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh
    q_lat = tl.load(q_row + dl[None, :], mask=h_ok[:, None], other=0.0)
    q_rope = tl.load(q_row + L + dr[None, :], mask=h_ok[:, None], other=0.0)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, L], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)  # unused table entries are arbitrary
        row = page * stride_cb + (n % PAGE) * stride_cs
        c = tl.load(c_ptr + row[:, None] + dl[None, :], mask=n_ok[:, None], other=0.0)  # [BLOCK_N, L]
        k_rope = tl.load(c_ptr + row[:, None] + L + dr[None, :], mask=n_ok[:, None], other=0.0)
        s = (_dot(q_lat, tl.trans(c)) + _dot(q_rope, tl.trans(k_rope))) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, False)
        acc = acc * alpha[:, None] + _dot(p.to(c.dtype), c)
    if not SPLIT:
        o_off = b.to(tl.int64) * stride_ob + head * stride_oh
        tl.store(o_ptr + o_off[:, None] + dl[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=h_ok[:, None])
    else:  # attention.py's [B, H, splits] partials, for its reduce kernel; an empty split gets weight 0
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        idx = (b * H + head).to(tl.int64) * NUM_SPLITS + split
        tl.store(mo_ptr + idx[:, None] * L + dl[None, :], out, mask=h_ok[:, None])
        tl.store(mlse_ptr + idx, lse, mask=h_ok)


def mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, scale: float, v_dim: int, *, num_splits: int | None = None
                  ) -> torch.Tensor:
    """Causal attention of each sequence's new tokens q [T, H, L + R] over its cached rows -> [T, H, L]: token i of
    a sequence with q_len new tokens and ctx cached sees ctx - q_len + i + 1 rows."""
    T = q.shape[0]
    t = torch.arange(T, device=q.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_seqlens_q[1:], t, right=True).to(torch.int32)  # each token's sequence
    limit = (context_lens[seq] - cu_seqlens_q[1:][seq] + t + 1).to(torch.int32)
    return mla_decode_attention(q, cache, block_tables, limit, scale, v_dim, None, num_splits=num_splits, rows=seq)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, scale: float, v_dim: int, max_context_len: int | None = None,
                         *, num_splits: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, L + R] ([q_lat | q_rope], unit stride along a head) over cache [nb, bs, 1, L + R] -> [B, H, L].

    L = v_dim and R must be powers of two >= 16 (DeepSeek's 512 and 64). max_context_len only sizes the split count
    (default: the block table's capacity); num_splits overrides it (tests). rows: each q row's block-table row
    (mla_attention), else row b is sequence b."""
    B, H, D = q.shape
    L, R = v_dim, D - v_dim
    assert all(x >= 16 and x & (x - 1) == 0 for x in (L, R)), "kv_lora_rank and the rope dims: powers of two >= 16"
    assert q.stride(2) == 1 and cache.stride(3) == 1 and cache.shape[2] == 1 and cache.shape[3] == D
    out = torch.empty((B, H, L), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    cfg = DECODE_CONFIG
    head_blocks = triton.cdiv(H, cfg["BLOCK_H"])
    bound = max_context_len if max_context_len is not None else block_tables.shape[1] * cache.shape[1]
    splits = num_splits or decode_num_splits(B, head_blocks, int(bound), q.device, cfg)
    mid_o, mid_lse = split_buffers(out, splits, L)
    _mla_decode_kernel[(B, head_blocks, splits)](
        q, cache, block_tables, context_lens, context_lens if rows is None else rows, out, mid_o, mid_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), H, splits, L=L, R=R, BLOCK_H=cfg["BLOCK_H"], PAGE=cache.shape[1],
        BLOCK_N=cfg["BLOCK_N"], SPLIT=splits > 1, ROWS=rows is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl.launch_args(q))
    if splits > 1:
        _decode_reduce_kernel[(B, H)](mid_o, mid_lse, out, out.stride(0), out.stride(1), splits, D=L,
                                      SPLITS_P=triton.next_power_of_2(splits), num_warps=4, **pdl.launch_args(q))
    return out
