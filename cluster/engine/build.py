"""Rank 0's engine for the serving worker, from what crosses Ray (a model name and a config dict). Imports torch
only when called: the worker's module is imported by processes that never build an engine."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.engine.async_engine import AsyncEngine


def build_engine(model: str | None, engine_config: dict, init_method: str | None = None,
                 max_waiting: int = 4096) -> AsyncEngine:
    """tp=1: a plain engine in this process; tp=N: rank 0 of a group whose followers call run_follower with the
    same init_method (see cluster/executor/tp.py)."""
    from cluster.config import EngineConfig
    from cluster.engine.async_engine import AsyncEngine

    return AsyncEngine.from_model(model, EngineConfig(**engine_config), init_method=init_method,
                                  max_waiting=max_waiting)
