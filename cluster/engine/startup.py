"""What an engine's start spent, phase by phase: one log line once it is ready, so an operator sees where a slow
start went (conversion, loading, the KV-cache profile, kernel compilation, CUDA-graph capture)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Phases:
    """Seconds per start-up phase, in the order they first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., T], *args, **kwargs) -> T:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def merge(self, other: "Phases") -> None:
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        return f"start-up {self.total:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
