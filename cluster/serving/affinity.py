"""The cache-aware choice rule, apart from Serve: which replica a request should prefer for its cached prefix, or
none (then least pending work decides)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

from cluster.serving.prefix_table import Match

AFFINITY_MARGIN_TOKENS = 2048  # `--affinity-margin`: extra pending work a cached replica may carry and still win
AFFINITY_MARGIN_RATIO = 0.5  # ... or this share of the least-loaded replica's work, if that is more
MIN_MATCH_TOKENS = 16  # a shorter match saves no prefill: the engine caches full blocks (16 tokens by default)
MIN_MATCH_SHARE = 0.75  # a prefix that is no earlier whole prompt counts from this share of the prompt on


@dataclass(frozen=True)
class AffinityPolicy:
    margin_tokens: int = AFFINITY_MARGIN_TOKENS
    margin_ratio: float = AFFINITY_MARGIN_RATIO
    min_match_tokens: int = MIN_MATCH_TOKENS
    min_match_share: float = MIN_MATCH_SHARE

    def allowed_excess(self, least: float) -> float:
        """How much more pending work than the least-loaded replica (`least`) a cached replica may have. Scaled with
        the load, so a busy GPU replica is not called overloaded for a few requests more; never below the absolute
        margin, so an idle pair still keeps a conversation where its cache is."""
        return max(self.margin_tokens, self.margin_ratio * least)


@dataclass(frozen=True)
class Preference:
    replica: Hashable | None  # None: no replica is preferred, choose by load
    reason: str  # "affinity" | "no_prefix" (no replica holds enough of the prompt) | "overloaded" (the one that does
    # is past the margin)
    matched_tokens: int = 0


def counted(m: Match | None, prompt_tokens: int, policy: AffinityPolicy) -> int:
    """The cached tokens a replica is credited with: an earlier whole prompt this one extends (a conversation's
    previous turn), or any prefix covering `min_match_share` of the prompt (a long shared document or preamble).
    Not a shorter shared prefix alone, such as a system prompt before a new conversation's first message: the
    first replica to see it would draw every new conversation until it is past the margin, and keep them all.
    Sent by load instead, a new conversation lands where it may, and that replica caches the shared prompt too
    (one prefill of it per replica)."""
    if m is None:
        return 0
    share = m.tokens if m.tokens >= policy.min_match_share * prompt_tokens else 0
    tokens = max(m.whole, share)
    return tokens if tokens >= policy.min_match_tokens else 0


def prefer(loads: Mapping[Hashable, float], matched: Mapping[Hashable, Match], prompt_tokens: int,
           policy: AffinityPolicy) -> Preference:
    """The replica with the longest cached prefix that counts (`counted`; ties: the least loaded of them), unless it
    is overloaded: its pending work exceeds the least-loaded candidate's by more than `policy.allowed_excess`.
    `loads` holds every candidate; `matched` what those holding part of the prompt (of `prompt_tokens`) hold."""
    credit = {r: counted(matched.get(r), prompt_tokens, policy) for r in loads}
    best = max(credit.values(), default=0)
    if best == 0:
        return Preference(None, "no_prefix")
    holder = min((r for r in loads if credit[r] == best), key=lambda r: loads[r])
    least = min(loads.values())
    if loads[holder] - least > policy.allowed_excess(least):
        return Preference(None, "overloaded", best)
    return Preference(holder, "affinity", best)
