"""The cache-aware choice rule, apart from Serve: which replica a request should prefer for its cached prefix, or
none (then least pending work decides)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

AFFINITY_MARGIN_TOKENS = 2048  # `--affinity-margin`: extra pending work a cached replica may carry and still win
AFFINITY_MARGIN_RATIO = 0.5  # ... or this share of the least-loaded replica's work, if that is more
MIN_MATCH_TOKENS = 16  # a shorter match saves no prefill: the engine caches full blocks (16 tokens by default)


@dataclass(frozen=True)
class AffinityPolicy:
    margin_tokens: int = AFFINITY_MARGIN_TOKENS
    margin_ratio: float = AFFINITY_MARGIN_RATIO
    min_match_tokens: int = MIN_MATCH_TOKENS

    def allowed_excess(self, least: float) -> float:
        """How much more pending work than the least-loaded replica (`least`) a cached replica may have. Scaled with
        the load, so a busy GPU replica is not called overloaded for a few requests more; never below the absolute
        margin, so an idle pair still keeps a conversation where its cache is."""
        return max(self.margin_tokens, self.margin_ratio * least)


@dataclass(frozen=True)
class Preference:
    replica: Hashable | None  # None: no replica is preferred, choose by load
    reason: str  # "affinity" | "no_prefix" (nothing cached anywhere worth it) | "overloaded" (the cached one is busy)
    matched_tokens: int = 0


def prefer(loads: Mapping[Hashable, float], matched: Mapping[Hashable, int], policy: AffinityPolicy) -> Preference:
    """The replica with the longest cached prefix (ties: the least loaded of them), unless it is overloaded: its
    pending work exceeds the least-loaded candidate's by more than `policy.allowed_excess`. `loads` holds every
    candidate; `matched` the estimated cached tokens of those holding some prefix."""
    best = max((matched.get(r, 0) for r in loads), default=0)
    if best < policy.min_match_tokens:
        return Preference(None, "no_prefix")
    holder = min((r for r in loads if matched.get(r, 0) == best), key=lambda r: loads[r])
    least = min(loads.values())
    if loads[holder] - least > policy.allowed_excess(least):
        return Preference(None, "overloaded", best)
    return Preference(holder, "affinity", best)
