"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel before
it in the stream is still finishing, which hides the launch gap between the ~300 small kernels of a decode step.

The contract of every kernel that takes `USE_PDL`: until `wait_for_previous` it reads only what no kernel writes (the
weights) and writes nothing, so a chain of such kernels computes exactly what plain stream order computes. A kernel
launched without PDL waits for its predecessor as usual. Off on older GPUs, under the interpreter, and with
CLUSTER_PDL=0 (read at each launch, so a benchmark can compare)."""
import os

import torch
import triton
import triton.language as tl

_CAPABLE: dict[int, bool] = {}


def enabled(t: torch.Tensor) -> bool:
    if not t.is_cuda or os.environ.get("CLUSTER_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABLE:
        _CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _CAPABLE[idx]


def launch_args(t: torch.Tensor) -> dict:
    """The kernel's USE_PDL and, when on, the launch option that goes with it."""
    on = enabled(t)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Let the next kernel launch now, then wait until the previous one has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
