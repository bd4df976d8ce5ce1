"""Triton W4A16 matmul: y[M, N] = x[M, K] @ W[N, K].T with W 4-bit (reference.linear_w4 gives the layout).

Each program owns a BLOCK_M x BLOCK_N tile of y and walks K in BLOCK_K steps: it loads the packed bytes of its
BLOCK_N weight rows (each byte serves two input channels), turns them into (q - zero) * scale in the activation
dtype, and multiplies on the tensor cores with fp32 accumulation. BLOCK_K divides the group, so one zero and scale
per row serve a whole step."""
import torch
import triton
import triton.language as tl

INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
GPU_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)  # a first guess: not yet timed


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                  GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0)
        byte = tl.load(qw_ptr + rn[None, :].to(tl.int64) * (K // 2) + rk[:, None] // 2, mask=n_ok[None, :], other=0)
        q = ((byte >> ((rk[:, None] % 2) * 4)) & 0xF).to(tl.float32)  # [BLOCK_K, BLOCK_N]
        g = rn.to(tl.int64) * groups + k0 // GROUP
        z = tl.load(z_ptr + g, mask=n_ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + g, mask=n_ok, other=0.0).to(tl.float32)
        w = ((q - z[None, :]) * s[None, :]).to(x.dtype)
        if x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def linear_w4(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], qweight.shape[0]
    group = K // scales.shape[1]
    cfg = dict(GPU_CONFIG if x.is_cuda else INTERPRETER_CONFIG)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group)
    assert qweight.shape[1] * 2 == K and group % cfg["BLOCK_K"] == 0 and qweight.is_contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _w4a16_kernel[grid](x2, qweight, zeros.contiguous(), scales.contiguous(), bias if bias is not None else y, y,
                        M, N, K, x2.stride(0), y.stride(0), GROUP=group, HAS_BIAS=bias is not None, **cfg)
    return y.reshape(*lead, N)
