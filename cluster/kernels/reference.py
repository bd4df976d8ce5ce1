"""Plain-torch versions of every kernel: the CPU path of the engine and the ground truth for the Triton tests.

Shapes (T = tokens in the step, B = sequences, Hq/Hkv = heads, D = head dim):
  k_cache, v_cache: [num_blocks, block_size, Hkv, D]
  block_tables:     [B, max_blocks] int32 (unused entries arbitrary)
  context_lens:     [B] int32, tokens of each sequence in the cache once this step's K/V are stored
  cu_seqlens_q:     [B+1] int32, prefix sums of this step's query tokens per sequence
  slot_mapping:     [T] int64, flat cache slot (block * block_size + offset) of each new token; -1 skips
  k_scale, v_scale: None for a cache in the model dtype. quant_policy 8: the cache is int8 and these are
                    [num_blocks, Hkv, block_size] fp32 (a page's scales of one head side by side), each
                    (token, head) row int8 times its own scale (max |x| / 127). quant_policy 4: the cache is uint8
                    [..., D / 2] (value 2j in the low nibble, 2j + 1 in the high one) and these are
                    [num_blocks, Hkv, block_size, 2] fp32, (scale, min) of each row: x = q * scale + min, q in
                    0..15. quant_policy 'fp8': the cache is float8_e4m3fn and these are [Hkv] fp32, one scale per
                    kv head of the layer: x = q * scale (saturating at +-448 * scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.quant.fp8 import to_fp8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pre_weight: torch.Tensor | None = None):
    """RMSNorm in fp32; with `residual`, adds it first and also returns the sum (the next residual). pre_weight
    (sandwich norms): x is first normed by it, before the add."""
    if pre_weight is not None:
        x = rms_norm(x, pre_weight, eps).to(x.dtype)
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# the MLP's activations, by ModelConfig.hidden_act
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """x = [gate | up] on the last dim -> act(gate) * up (gelu_tanh: transformers' gelu_pytorch_tanh)."""
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Neox-style rotary (rotate halves) on q [T, Hq, D] and k [T, Hkv, D]; cos_sin [max_pos, D] = [cos | sin]."""
    cs = cos_sin[positions]
    cos, sin = cs.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


INT8_MAX = 127.0
MIN_AMAX = 1e-6  # an all-zero row still gets a usable scale


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], fp32 scale [...]): symmetric, one scale per row, rounding half away from 0."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(MIN_AMAX) / INT8_MAX
    y = xf / scale.unsqueeze(-1)
    q = torch.where(y >= 0, y + 0.5, y - 0.5).trunc().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


INT4_MAX = 15.0


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 [..., D / 2] two values a byte, fp32 [..., 2] (scale, min)): asymmetric per row."""
    xf = x.float()
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
    scale = (hi - lo).clamp_min(MIN_AMAX) / INT4_MAX
    q = ((xf - lo.unsqueeze(-1)) / scale.unsqueeze(-1) + 0.5).floor().clamp(0, INT4_MAX).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), torch.stack((scale, lo), dim=-1)


def quantize_fp8(x: torch.Tensor, head_scale: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, D] -> float8_e4m3fn [..., Hkv, D]: x / its head's scale, saturated, rounded to nearest even."""
    return to_fp8(x.float() / head_scale.unsqueeze(-1))


def kv_row_bytes(quant_policy, head_dim: int, elem_size: int) -> int:
    """Bytes of one cached (token, kv head) row of K or V under quant_policy, its scales included (the layouts
    above): model-dtype values; int8 and an fp32 scale; 4-bit and an fp32 (scale, min); e4m3 (its scales are one
    per kv head and layer)."""
    return {0: head_dim * elem_size, 8: head_dim + 4, 4: head_dim // 2 + 8, "fp8": head_dim}[quant_policy]


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def _select(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cache.index_select(0, rows), for fp8 too (as bytes: torch's CPU gather and scatter have no fp8 kernels)."""
    if is_fp8(cache):
        return cache.view(torch.uint8).index_select(0, rows).view(cache.dtype)
    return cache.index_select(0, rows)


def scales_to_layout(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales as quantize_int8/int4 return them for a cache [nb, page, Hkv, D] ([nb, page, Hkv(, 2)]) ->
    the cache's scale layout [nb, Hkv, page(, 2)], contiguous."""
    return scale.transpose(1, 2).contiguous()


def scale_rows(scale: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The per-row scales of `blocks`, as rows: [len(blocks) * page, Hkv(, 2)] (the cache's rows' order)."""
    return scale.index_select(0, blocks).transpose(1, 2).flatten(0, 1)


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A whole cache [nb, page, Hkv, D(/2)] with its scales in the cache's layout -> [nb, page, Hkv, D] in dtype."""
    if scale is not None and not is_fp8(cache):
        scale = scale.transpose(1, 2)
    return dequantize(cache, scale, dtype)


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the cache in `dtype`: as they are, int8 times the row's scale, 4-bit (uint8 cache) with the
    row's (scale, min), or fp8 times its head's scale ([Hkv])."""
    if scale is None:
        return cache.to(dtype)
    if is_fp8(cache):
        return (cache.float() * scale.unsqueeze(-1)).to(dtype)
    if cache.dtype == torch.uint8:
        q = torch.stack((cache & 0xF, cache >> 4), dim=-1).flatten(-2).float()
        return (q * scale[..., :1] + scale[..., 1:]).to(dtype)
    return (cache.float() * scale.unsqueeze(-1)).to(dtype)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write this step's K/V [T, Hkv, D] into their cache slots (quantized when the cache has scales)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    nb, bs, h, d = k_cache.shape
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scale is None:
            cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, x.to(cache.dtype))
        elif is_fp8(cache):
            cache.view(torch.uint8).view(nb * bs, h, d).index_copy_(0, slot_mapping,
                                                                    quantize_fp8(x, scale).view(torch.uint8))
        else:
            xq, xs = (quantize_int4 if cache.dtype == torch.uint8 else quantize_int8)(x)
            cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, xq)
            scale[slot_mapping // bs, :, slot_mapping % bs] = xs  # [T, h(, 2)]: the rows' scales


def rotary_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """apply_rotary, then store_kvcache of the rotated k and v; returns the rotated q."""
    q, k = apply_rotary(q, k, positions, cos_sin)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def _gather(cache: torch.Tensor, block_table: torch.Tensor, n: int, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    bs = cache.shape[1]
    blocks = block_table[:(n + bs - 1) // bs]
    rows = _select(cache, blocks).flatten(0, 1)[:n]  # [n, Hkv, D]
    if scale is not None and not is_fp8(cache):
        scale = scale_rows(scale, blocks)[:n]
    return dequantize(rows, scale, dtype)


def softcap_scores(s: torch.Tensor, cap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): cap * tanh(s / cap), in place on fp32 scores; cap 0 leaves them."""
    return s.div_(cap).tanh_().mul_(cap) if cap else s


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                        softcap: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention as transformers' eager path computes it (SDPA takes no soft-cap): fp32 scores times scale,
    soft-capped, plus `bias` (ALiBi's), masked, fp32 softmax. q [..., M, D], k and v [..., N, D], visible and bias
    [..., M, N]."""
    s = softcap_scores(torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale), softcap)
    if bias is not None:
        s += bias
    s.masked_fill_(~visible, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context (prefix, chunk or decode).

    Query i of a sequence with q_len new tokens and ctx cached tokens sits at position ctx - q_len + i and sees
    keys 0..that position (with a sliding `window`, only the last `window` of them: pos - key < window). Handles
    prefill, chunked prefill, prefix-cache hits and decode alike. softcap: scores soft-capped before the mask.
    alibi: fp32 [Hq] slopes (ALiBi, Baichuan-13B): head h's scores get slope_h * (key - query position).
    """
    T, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    ctx_list = context_lens.tolist()
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(ctx_list):
        s, e = cu[b], cu[b + 1]
        ql = e - s
        if ql == 0:
            continue
        k = _gather(k_cache, block_tables[b], ctx, k_scale, q.dtype)  # [ctx, Hkv, D]
        v = _gather(v_cache, block_tables[b], ctx, v_scale, q.dtype)
        qb = q[s:e].view(ql, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * ql, d)
        qpos = torch.arange(ctx - ql, ctx, device=q.device).repeat(group)
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos[:, None]
        if window:
            mask &= kpos > qpos[:, None] - window
        if softcap or alibi is not None:
            bias = None if alibi is None else (alibi.float().view(hkv, group, 1).expand(hkv, group, ql).reshape(
                hkv, group * ql, 1) * (kpos - qpos[:, None]).float())
            o = _explicit_attention(qb, k.transpose(0, 1), v.transpose(0, 1), mask, scale, softcap, bias)
        else:
            o = F.scaled_dot_product_attention(qb, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        out[s:e] = o.view(hkv, group, ql, d).permute(2, 0, 1, 3).reshape(ql, hq, d)
    return out


CPU_BMM_DECODE_BATCH = 16  # from this batch on, half-precision CPU decode attention runs as two batched matmuls


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context_len: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           softcap: float = 0.0, window: int = 0, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence ([B, Hq, D]) over its cache, batched with padding: one SDPA call for the batch.
    softcap, window and alibi as in paged_attention.

    Slots past a sequence's context are masked; they must hold finite values (the engine zero-fills the cache),
    since a mask is added as -inf and NaN + -inf is still NaN."""
    B, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    max_ctx = int(max_context_len if max_context_len is not None else context_lens.max())
    nblocks = (max_ctx + bs - 1) // bs
    bt = block_tables[:, :nblocks].clamp(0, nb - 1).flatten()
    # index_select, not k_cache[bt]: on the CPU it is about 8x faster than advanced indexing
    fp8 = is_fp8(k_cache)
    ks = None if k_scale is None else k_scale if fp8 else scale_rows(k_scale, bt)
    vs = None if v_scale is None else v_scale if fp8 else scale_rows(v_scale, bt)
    k = dequantize(_select(k_cache, bt).flatten(0, 1), ks, q.dtype).view(B, nblocks * bs, hkv, d).transpose(1, 2)
    v = dequantize(_select(v_cache, bt).flatten(0, 1), vs, q.dtype).view(B, nblocks * bs, hkv, d).transpose(1, 2)
    kpos = torch.arange(nblocks * bs, device=q.device)[None, :]
    mask = kpos < context_lens[:, None]  # [B, L]
    if window:
        mask &= kpos >= context_lens[:, None] - window
    qb = q.view(B, hkv, group, d)
    if softcap or alibi is not None:
        bias = None if alibi is None else (alibi.float().view(1, hkv, group, 1)
                                           * (kpos - (context_lens[:, None] - 1)).float()[:, None, None, :])
        o = _explicit_attention(qb, k, v, mask[:, None, None, :], scale, softcap, bias)
    elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and B >= CPU_BMM_DECODE_BATCH:
        # one query a sequence, many sequences: oneDNN's half-precision batched matmuls beat SDPA's CPU flash kernel
        # (2.4x in bf16 at batch 64 on AVX512-BF16; at batch 1 SDPA is 3x faster); the softmax stays in fp32
        s = torch.matmul(qb, k.transpose(-1, -2)).float().mul_(scale)
        s.masked_fill_(~mask[:, None, None, :], float("-inf"))
        o = torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)
    else:
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o.reshape(B, hq, d)


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor) -> torch.Tensor:
    """Mixture of experts: for each token, sum over its k chosen experts (experts [T, k], weights [T, k]) of
    weight * w2[e] @ silu_and_mul(w13[e] @ x), with w13 [E, 2F, H] ([gate; up]) and w2 [E, H, F].

    Each expert runs once on the tokens routed to it, which reads the routing on the host; inside a CUDA graph
    capture (this path on CUDA without Triton) every expert runs on every token instead, zero-weighted where the
    token did not choose it."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return moe_experts_dense(x, w13, w2, weights, experts)
    T, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // k
    w_sorted = weights.reshape(-1)[order]
    out = torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = token_of[start:start + n]
            y = F.linear(silu_and_mul(F.linear(x[rows], w13[e])), w2[e]).float() * w_sorted[start:start + n, None]
            out.index_add_(0, rows, y)
            start += n
    return out.to(x.dtype)


def moe_experts_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      experts: torch.Tensor) -> torch.Tensor:
    """moe_experts with no data-dependent shapes: every expert on every token, zero-weighted where not chosen."""
    dense = torch.zeros(x.shape[0], w13.shape[0], dtype=torch.float32, device=x.device)
    dense.scatter_(1, experts, weights.float())
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        out += F.linear(silu_and_mul(F.linear(x, w13[e])), w2[e]).float() * dense[:, e:e + 1]
    return out.to(x.dtype)


def linear_w4(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) with W [N, K] 4-bit: qweight uint8 [N, K / 2] (even k in the low nibble), zeros and scales
    [N, K / group]; W = (q - zero) * scale (see cluster/quant/int4.py)."""
    from cluster.quant.int4 import dequantize, unpack

    return F.linear(x, dequantize(unpack(qweight), zeros, scales, x.dtype), bias)
