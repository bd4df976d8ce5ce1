"""AWQ checkpoints (AutoAWQ's GEMM layout; what `cluster lite auto_awq` writes too): their 4-bit linear layers are
unpacked at conversion, sliced over ranks exactly like full weights, and packed again in the engine's layout
(cluster/quant/int4.py). Embeddings, norms and the LM head stay in the model dtype, as AWQ leaves them."""
from __future__ import annotations

from typing import Callable

import torch

from cluster.quant import int4

Getter = Callable[[str], torch.Tensor]


def awq_config(hf: dict) -> dict:
    """{"method": "awq", "bits": 4, "group_size": G} for an AWQ checkpoint, {} for a plain one."""
    qc = hf.get("quantization_config") or {}
    if not qc:
        return {}
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise ValueError(f"quantization {method!r} is not supported; supported: awq (4-bit, version gemm)")
    bits, version = qc.get("bits", qc.get("w_bit", 4)), str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
        raise ValueError(f"AWQ with bits={bits}, version={version!r}, zero_point={qc.get('zero_point', True)} is not "
                         "supported; supported: 4 bits, version 'gemm', with zero points")
    return {"method": "awq", "bits": 4, "group_size": int(qc.get("group_size", qc.get("q_group_size", 128)))}


class AWQReader:
    """Three views of a checkpoint reader that answer `<linear>.weight` with the 4-bit weight's q values, zeros or
    scales (unpacked [out, in] / [out, in / group]) and every other name as it is. Unpacked layers are kept until
    `clear()`, so each is read once for the three views."""

    def __init__(self, get: Getter):
        self.get = get
        self.names = getattr(get, "names", set())
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.q, self.zeros, self.scales = (self._view(i) for i in range(3))

    def _view(self, part: int) -> Getter:
        def view(name: str) -> torch.Tensor:
            base = name[: -len(".weight")]
            if name.endswith(".weight") and name not in self.names and base + ".qweight" in self.names:
                if base not in self.memo:
                    self.memo[base] = int4.from_awq(self.get(base + ".qweight"), self.get(base + ".qzeros"),
                                                    self.get(base + ".scales"))
                return self.memo[base][part]
            return self.get(name)

        view.names = self.names  # type: ignore[attr-defined]
        return view

    def clear(self) -> None:
        self.memo.clear()


def merge_shards(q: dict[str, torch.Tensor], zeros: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """One rank's layer, sharded three times (q values, zeros, scales) -> engine names: `<linear>.qweight` (packed),
    `.zeros`, `.scales` for every projection, the rest (norms, biases) as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if name.endswith("_proj.weight"):
            base = name[: -len(".weight")]
            out[base + ".qweight"] = int4.pack(t)
            out[base + ".zeros"], out[base + ".scales"] = zeros[name], scales[name]
        else:
            out[name] = t
    return out
