"""Tensor-parallel process state: which rank this process is and the group its all-reduces go over."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPState:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed group of the replica's ranks (None when size == 1)


_state = TPState()


def tp() -> TPState:
    return _state


def set_tp(rank: int, size: int, group: object | None = None) -> None:
    global _state
    _state = TPState(rank, size, group)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.size > 1:
        dist.all_reduce(x, group=_state.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous(), group=_state.group)
    return torch.cat(parts, dim=-1)
