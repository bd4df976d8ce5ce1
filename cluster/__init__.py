"""cluster: serve LLMs and VLMs with a paged-KV engine of our own, on one machine or a Ray cluster."""
from cluster.config import EngineConfig, GenerationConfig

__all__ = ["pipeline", "Pipeline", "Session", "Response", "EngineConfig", "GenerationConfig"]


def __getattr__(name: str):
    # the engine pulls in torch and transformers: import it only when used, so `cluster --help` stays fast
    if name in ("pipeline", "Pipeline", "Session", "Response"):
        from cluster import api as _p

        return getattr(_p, name)
    raise AttributeError(name)
