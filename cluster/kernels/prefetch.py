"""Weights into L2 ahead of their GEMV, while latency-bound kernels leave the memory bus idle.

At batch 1 a decode step streams the weights once, but between the GEMVs come kernels that read a few KB each and
wait on their own round trips: rotary + KV store + attention (10-12 us a layer), the norms (2 us). DRAM sits idle
there. A bulk prefetch (sm_90 `cp.async.bulk.prefetch.L2`) issued at the start of such a gap pulls the front of the
next GEMV's weight into L2 (50 MB on an H100/H200), so the GEMV begins on cache hits and the weight stream never
pauses. The prefetch is a hint: it changes no value, only when bytes arrive.

The kernel runs in the PDL chain (pdl.py): it lets the next kernel launch, issues its prefetches (it reads only
weights and writes nothing), then waits for its predecessor like every kernel of the chain, so that the next
kernel's wait still covers everything before it.
"""
import torch
import triton
import triton.language as tl

CHUNK = 16384  # bytes one prefetch instruction asks for
BLOCK = 128  # prefetches a program issues (one a thread at 4 warps)
_L2_BYTES: dict[int, int] = {}


@triton.jit
def _prefetch_kernel(base, nbytes, part_stride, BLOCK: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    off = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.maximum(tl.minimum(nbytes - off, CHUNK), 0).to(tl.int32)
    addr = base + tl.program_id(1).to(tl.int64) * part_stride + off
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


def l2_bytes(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _L2_BYTES:
        _L2_BYTES[idx] = torch.cuda.get_device_properties(idx).L2_cache_size
    return _L2_BYTES[idx]


def prefetch_l2(weight: torch.Tensor, nbytes: int, parts: int = 1) -> None:
    """The first `nbytes` of each of `parts` equal row blocks of `weight` (a gated [gate; up] weight is read from
    the front of both halves at once) towards L2. Only inside a PDL chain on sm_90+: launched on its own, in
    stream order, a prefetch would only add its launch to the step."""
    from cluster.kernels import pdl

    if not pdl.enabled(weight):  # also off below sm_90, which lacks the bulk prefetch
        return
    stride = weight.numel() * weight.element_size() // parts
    nbytes = min(nbytes, stride, l2_bytes(weight.device) * 3 // 4 // parts) // 16 * 16
    if nbytes <= 0 or stride % 16 or weight.data_ptr() % 16:
        return
    grid = (triton.cdiv(triton.cdiv(nbytes, CHUNK), BLOCK), parts)
    _prefetch_kernel[grid](weight.data_ptr(), nbytes, stride, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=4,
                           **pdl.launch_args(weight))
