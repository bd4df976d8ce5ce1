"""The names of a model replica's worker actors, so other processes (the router's /metrics and /health) can find
rank 0 with ray.util.list_named_actors. The one place that writes or reads them."""
from __future__ import annotations

from dataclasses import dataclass

PREFIX = "cluster-rank"
SEP = "|"


@dataclass(frozen=True)
class WorkerNames:
    """The actors of one worker group: one name per rank."""

    app: str
    deployment: str
    replica: str
    generation: int  # a rebuilt group gets new names: the old actors may still be dying

    def of_rank(self, rank: int) -> str:
        return SEP.join([f"{PREFIX}{rank}", self.app, self.deployment, self.replica, str(self.generation)])

    @classmethod
    def parse(cls, name: str) -> tuple[int, "WorkerNames"] | None:
        """(rank, names) of an actor name written by `of_rank`, else None."""
        parts = name.split(SEP)
        if len(parts) != 5 or not parts[0].startswith(PREFIX) or not parts[0][len(PREFIX):].isdigit():
            return None
        if not parts[4].isdigit():
            return None
        return int(parts[0][len(PREFIX):]), cls(parts[1], parts[2], parts[3], int(parts[4]))

