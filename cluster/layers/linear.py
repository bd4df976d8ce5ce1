"""Linear layers over tensor-parallel ranks. Converted shards are already sliced per rank, so these only
need the per-rank shapes and the communication: column-parallel needs none, row-parallel all-reduces."""
from __future__ import annotations

import torch
from torch import nn

import os

from cluster import kernels
from cluster.layers.parallel import all_reduce

# Rows the oneDNN weight layout is tuned for: decode batches are a few to a few dozen rows.
CPU_PACK_ROWS = 16

# MB of a weight's front pulled towards L2 ahead of its batch-1 GEMV (kernels/prefetch.py), by the weight's role:
# "o" during rotary + attention, "gate_up" during the post-attention norm, "qkv" during the input norm.
# Off until measured on a GPU (benchmarks/decode_variants.py): CLUSTER_L2_PREFETCH=1 turns these sizes on, and
# e.g. "o=32,gate_up=0" gives others; read at each call (so at each graph capture).
PREFETCH_MB = {"o": 32, "gate_up": 8, "qkv": 8}


def prefetch_mb(role: str) -> float:
    spec = os.environ.get("CLUSTER_L2_PREFETCH", "0").strip()
    if spec in ("0", ""):
        return 0
    if spec == "1":
        return PREFETCH_MB.get(role, 0)
    given = dict(part.split("=") for part in spec.split(",") if "=" in part)
    return float(given.get(role, 0))


def cpu_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of an fp32 (or, where the CPU has bf16 dot products, bf16) CPU weight, or None where
    that does not apply.

    On x86 CPUs torch's default fp32 GEMM (MKL) is 1.2x (1 row) to 2.9x (4 rows) slower than oneDNN with a
    pre-packed weight at decoding's shapes; see benchmarks/bench_cpu_matmul.py."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype != torch.float32 and not (weight.dtype == torch.bfloat16
                                              and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), CPU_PACK_ROWS)
    except (AttributeError, RuntimeError):  # a torch built without the op: plain F.linear still works
        return None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None, gated: bool = False, act: str = "silu") -> torch.Tensor:
    """x @ weight.T + bias: through the packed weight on the CPU, through cluster.kernels.linear elsewhere.
    gated: the result is act_and_mul of the product (see kernels.linear)."""
    if packed is not None:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return kernels.act_and_mul(y, act) if gated else y
    return kernels.linear(x, weight, bias, gated, act)


def pack_cpu_weights(model: nn.Module) -> None:
    """Give every linear layer of a CPU model its packed weight, and free the plain copy it replaces, so the
    weights are not held twice (a tied LM head packs the embedding's weight, which the lookup still needs)."""
    for m in model.modules():
        if isinstance(m, PackableLinear) and not (m.w4 or m.fp8):
            m.packed = cpu_pack(m.matmul_weight())
            if m.packed is not None and isinstance(m.weight, nn.Parameter):
                m.weight = nn.Parameter(torch.empty(0, dtype=m.weight.dtype), requires_grad=False)


class PackableLinear(nn.Module):
    packed: torch.Tensor | None = None
    w4 = False  # 4-bit weight (qweight, zeros, scales) instead of `weight`; see cluster/quant/int4.py
    fp8 = False  # `weight` in e4m3 with `weight_scale` [out] fp32 beside it; see cluster/quant/fp8.py

    def matmul_weight(self) -> torch.Tensor:
        return self.weight

    def prefetch(self, rows: int, role: str, parts: int = 1) -> None:
        """Ahead of a one-row matmul of this layer (the GEMV), the front of its weight towards L2 (PREFETCH_MB);
        parts=2 for a gated [gate; up] weight, read from the front of both halves."""
        mb = prefetch_mb(role) if rows == 1 and self.packed is None else 0
        if mb > 0:
            kernels.prefetch_l2(self.qweight if self.w4 else self.weight, int(mb * 2 ** 20), parts)

    def _make_weight(self, out_features: int, in_features: int, group: int, fp8: bool = False) -> None:
        if fp8:
            self.fp8 = True
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                       requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        elif group:
            self.w4 = True
            self.qweight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                                        requires_grad=False)
            self.zeros = nn.Parameter(torch.empty(out_features, in_features // group), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(out_features, in_features // group), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False, act: str = "silu"
                ) -> torch.Tensor:
        if self.w4:
            return kernels.linear_w4(x, self.qweight, self.zeros, self.scales, bias, gated, act)
        if self.fp8:
            return kernels.linear_fp8(x, self.weight, self.weight_scale, bias, gated, act)
        return matmul(x, self.weight, bias, self.packed, gated, act)


class ColumnLinear(PackableLinear):
    """Output features split over ranks (fused qkv, fused gate/up): each rank computes its own slice."""

    def __init__(self, in_features: int, out_features_per_rank: int, bias: bool = False, group: int = 0,
                 fp8: bool = False):
        super().__init__()
        self._make_weight(out_features_per_rank, in_features, group, fp8)
        self.bias = nn.Parameter(torch.empty(out_features_per_rank), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, gated: bool = False, act: str = "silu") -> torch.Tensor:
        """gated: the weight is the MLP's [gate; up] and the result act(gate) * up (fused into the one-row GEMV)."""
        return self._matmul(x, self.bias, gated, act)


class RowLinear(PackableLinear):
    """Input features split over ranks (o_proj, down_proj): partial sums all-reduced into the full output; a bias
    (whole on every rank) is added once, after the reduction."""

    def __init__(self, in_features_per_rank: int, out_features: int, group: int = 0, fp8: bool = False,
                 bias: bool = False):
        super().__init__()
        self._make_weight(out_features, in_features_per_rank, group, fp8)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias
