"""Triton SiLU-and-multiply for the gated MLP: reads [gate | up] once, writes silu(gate) * up."""
import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    # round silu(gate) to the activation dtype before the product, like the reference's two torch ops
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [..., 2N] = [gate | up] -> [..., N]."""
    N = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if x2.shape[0] and N:
        BLOCK = min(1024, triton.next_power_of_2(N))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, out, x2.stride(0), N, BLOCK=BLOCK, num_warps=4)
    return out
