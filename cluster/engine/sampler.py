"""Batched sampling on the logits' device with no host synchronisation until the tokens are read out.

Per row: penalties (repetition, presence, frequency), min-tokens masking, the grammar's token mask (structured
output, cluster/engine/grammar.py), then greedy or temperature + top-k + top-p + min-p, drawn as argmax(p / Exp(1))
so a request with a seed draws from its own generator and gets the same tokens whatever else is in the batch. A
seeded row's noise depends only on (seed, the token's position in the sequence): a request resumed elsewhere with
its earlier output as prompt (the router's failover) draws the same tokens as the uninterrupted run."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from cluster.engine.grammar import apply_masks
from cluster.engine.sequence import Sequence


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[dict | None]


@dataclass
class Drawn:
    """Tokens drawn on the logits' device, with their copy to the host under way: the engine can launch the next
    step (feeding `tokens` to it on the device) before it waits for them."""

    tokens: torch.Tensor  # [N] int64 on the device
    host: torch.Tensor  # [N] int64, pinned when the device is a GPU
    ready: torch.cuda.Event | None
    logprobs: torch.Tensor | None  # [N, vocab] when any row asked for them
    want_lp: list[bool]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a stream sync (a plain copy to a GPU waits for every queued kernel,
    which would stall an overlapped step behind the one still running)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed of the token at `position` (its index in prompt + output) of a request seeded `seed`:
    a splitmix64 mix, so neighbouring positions and seeds give unrelated streams. Derived from the position, not
    from how many draws came before, so a request resumed with its earlier tokens as prompt (failover to another
    replica), recomputed after preemption, or drawn again after a wasted step ahead, draws the same noise."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], pending: torch.Tensor | None) -> torch.Tensor:
    """pending [N] (device): each row's latest token, drawn but not yet appended on the host (an overlapped step);
    it counts as seen and as output, without a sync."""
    rows = [i for i, s in enumerate(seqs) if s.gen.repetition_penalty != 1.0 or s.gen.presence_penalty
            or s.gen.frequency_penalty]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[1]
    for i in rows:
        g = seqs[i].gen
        row = logits[i]
        latest = pending[i:i + 1] if pending is not None else None
        if g.repetition_penalty != 1.0:  # HF semantics: over prompt and output tokens, each once
            seen = torch.zeros(V, dtype=torch.bool, device=dev)
            seen[to_device(sorted(set(seqs[i].token_ids)), torch.long, dev)] = True
            if latest is not None:
                seen[latest] = True
            p = g.repetition_penalty
            row.copy_(torch.where(seen, torch.where(row > 0, row / p, row * p), row))
        if g.presence_penalty or g.frequency_penalty:  # OpenAI semantics: over output tokens
            out = Counter(seqs[i].output_ids)
            if out or latest is not None:
                counts = torch.zeros(V, dtype=row.dtype, device=dev)
                counts.index_add_(0, to_device(list(out), torch.long, dev), to_device(list(out.values()), row.dtype, dev))
                if latest is not None:
                    counts.index_add_(0, latest, torch.ones(1, dtype=row.dtype, device=dev))
                row -= g.frequency_penalty * counts + g.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def _mask_early_stop(logits: torch.Tensor, seqs: list[Sequence], ahead: int) -> None:
    for i, s in enumerate(seqs):  # a grammar decides its own end: its last token may be a stop token alone
        if s.num_output_tokens + ahead < s.gen.min_new_tokens and s.stop_ids and s.matcher is None:
            logits[i].index_fill_(0, to_device(sorted(s.stop_ids), torch.long, logits.device), float("-inf"))


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    return read_out(draw(logits, seqs), seqs)


@torch.inference_mode()
def draw(logits: torch.Tensor, seqs: list[Sequence], pending: torch.Tensor | None = None) -> Drawn:
    """Pick each row's token on the device and start copying the tokens out; nothing here waits for the GPU.
    pending: see _apply_penalties."""
    logits = logits.float()
    logits = _apply_penalties(logits, seqs, pending)
    _mask_early_stop(logits, seqs, 1 if pending is not None else 0)
    # the matchers have seen every token (a step ahead under a grammar is drawn after its tokens in flight are
    # accepted); a sequence finished meanwhile has nothing left to constrain, and its row is dropped
    matchers = [None if s.is_finished else s.matcher for s in seqs]
    if any(m is not None for m in matchers):
        apply_masks(logits, matchers)
    want_lp = [s.gen.logprobs is not None for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    greedy = all(s.gen.greedy for s in seqs)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        dev = logits.device
        temps = to_device([1.0 if s.gen.greedy else s.gen.temperature for s in seqs], torch.float32, dev)
        x = logits / temps.unsqueeze(1)
        top_k = [s.gen.top_k for s in seqs]
        if any(k > 0 for k in top_k):
            V = x.shape[1]
            ks = to_device([min(k, V) if k > 0 else V for k in top_k], torch.long, dev)
            kth = torch.sort(x, dim=-1, descending=True).values.gather(1, (ks - 1).unsqueeze(1))
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        top_p = [s.gen.top_p for s in seqs]
        if any(p < 1.0 for p in top_p):
            sp, idx = torch.sort(probs, dim=-1, descending=True)
            cum = sp.cumsum(dim=-1)
            drop = (cum - sp) > to_device(top_p, torch.float32, dev).unsqueeze(1)
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sp)
        min_p = [s.gen.min_p for s in seqs]
        if any(p > 0 for p in min_p):
            thresh = probs.max(dim=-1, keepdim=True).values * to_device(min_p, torch.float32, dev).unsqueeze(1)
            probs = probs.masked_fill(probs < thresh, 0.0)
        noise = torch.empty_like(probs).exponential_()
        ahead = 1 if pending is not None else 0  # the token in flight (overlap) holds the next position
        for i, s in enumerate(seqs):
            if s.generator is not None:
                if s.gen.seed is not None:
                    s.generator.manual_seed(position_seed(s.gen.seed, len(s.token_ids) + ahead))
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_rows = to_device([s.gen.greedy for s in seqs], torch.bool, dev)
        tokens = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)

    if tokens.is_cuda:
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        host, ready = tokens, None
    return Drawn(tokens, host, ready, logprobs, want_lp)


def read_out(drawn: Drawn, seqs: list[Sequence]) -> SampleResult:
    """Wait for the drawn tokens and build the per-row logprob entries."""
    if drawn.ready is not None:
        drawn.ready.synchronize()
    token_list = drawn.host.tolist()
    logprobs, want_lp = drawn.logprobs, drawn.want_lp
    lp_out: list[dict | None] = [None] * len(seqs)
    if logprobs is not None:
        for i, s in enumerate(seqs):
            if not want_lp[i]:
                continue
            entry = {"token_id": token_list[i], "logprob": float(logprobs[i, token_list[i]]), "top_logprobs": {}}
            if s.gen.logprobs:
                vals, ids = logprobs[i].topk(s.gen.logprobs)
                # a grammar's mask leaves -inf where it forbids: not a logprob to report (nor valid JSON)
                entry["top_logprobs"] = {t: v for t, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")}
            lp_out[i] = entry
    return SampleResult(token_list, lp_out)
