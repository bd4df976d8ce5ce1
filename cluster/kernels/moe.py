"""Triton mixture-of-experts: each expert's weights are read once, by the tiles of tokens routed to it.

The (token, slot) pairs are sorted by expert and each expert's run padded to a whole tile (`align`), so a tile of
pairs belongs to one expert; a grouped GEMM then multiplies each tile by its expert's weights. Everything
has a fixed size for a given token count (the grid covers the most tiles any routing can need; tiles past the
routing's own count exit at once), and nothing reads the routing on the host, so a decode step with experts can be
captured in a CUDA graph. At decode, where a step is bound by reading weights, only the chosen experts are read.
"""
import torch
import triton
import triton.language as tl

from cluster import kernels

INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 16}


def tile_rows(pairs: int, num_experts: int) -> int:
    """Rows of a tile: 16 (tl.dot's smallest) when few tokens reach each expert, up to 128 when many do, so an
    expert's weights are read about once per 128 of its tokens rather than once per 16."""
    per_expert = max(1, pairs // num_experts)
    return min(128, max(16, triton.next_power_of_2(per_expert)))


def align(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """experts [T, k] -> (pair index at each padded slot (T * k where padding) [max_tiles * block_m],
    expert of each tile (num_experts past the last used tile) [max_tiles])."""
    flat = experts.reshape(-1)
    P = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first_of_e = torch.cumsum(counts, 0) - counts
    rank = torch.arange(P, device=flat.device) - first_of_e[sorted_e]
    dest = (tile_end - tiles)[sorted_e] * block_m + rank
    max_tiles = -(-P // block_m) + num_experts
    slots = torch.full((max_tiles * block_m,), P, dtype=torch.long, device=flat.device)
    slots.scatter_(0, dest, order)
    tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=flat.device), right=True)
    return slots, tile_expert


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, slots_ptr, tile_expert_ptr, scale_ptr, N, K, P, num_experts,
                         A_ROW_DIV: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair] = a[pair // A_ROW_DIV] @ w[expert].T (* scale[pair]) for the BLOCK_M pairs of this tile."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= num_experts:
        return
    pairs = tl.load(slots_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < P
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + e.to(tl.int64) * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + rk[None, :], mask=valid[:, None] & (rk[None, :] < K), other=0.0)
        w = tl.load(w_base + rn[None, :].to(tl.int64) * K + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K),
                    other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if SCALE:
        acc *= tl.load(scale_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & (rn[None, :] < N))


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, tile_expert: torch.Tensor, P: int,
                  block_m: int, a_row_div: int, scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    E, N, K = w.shape
    out = torch.empty(P, N, dtype=out_dtype, device=a.device)
    blocks = INTERPRETER_BLOCKS if not a.is_cuda else {"BLOCK_N": 64, "BLOCK_K": 64}
    grid = (tile_expert.numel(), triton.cdiv(N, blocks["BLOCK_N"]))
    _grouped_gemm_kernel[grid](a, w, out, slots, tile_expert, scale if scale is not None else out, N, K, P, E,
                               A_ROW_DIV=a_row_div, SCALE=scale is not None,
                               PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_M=block_m, **blocks)
    return out


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.moe_experts: sum over each token's k experts of weight * down(silu(gate) * up)."""
    T, k = experts.shape
    P = T * k
    x = x.contiguous()
    block_m = tile_rows(P, w13.shape[0])
    slots, tile_expert = align(experts, w13.shape[0], block_m)
    h = _grouped_gemm(x, w13.contiguous(), slots, tile_expert, P, block_m, k, None, x.dtype)  # [P, 2F] by pair
    h = kernels.silu_and_mul(h)
    y = _grouped_gemm(h.contiguous(), w2.contiguous(), slots, tile_expert, P, block_m, 1,
                      weights.reshape(-1).float().contiguous(), torch.float32)  # [P, H], weighted
    return y.view(T, k, -1).sum(dim=1).to(x.dtype)
