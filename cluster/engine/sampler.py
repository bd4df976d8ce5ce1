"""Batched sampling on the logits' device with no host synchronisation until the tokens are read out.

Per row: penalties (repetition, presence, frequency), min-tokens masking, then greedy or temperature + top-k +
top-p + min-p, drawn as argmax(p / Exp(1)) so a request with a seed draws from its own generator and gets the
same tokens whatever else is in the batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.gen.repetition_penalty != 1.0 or s.gen.presence_penalty
            or s.gen.frequency_penalty]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[1]
    for i in rows:
        g = seqs[i].gen
        row = logits[i]
        if g.repetition_penalty != 1.0:  # HF semantics: over prompt and output tokens
            seen = torch.tensor(sorted(set(seqs[i].token_ids)), device=dev, dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / g.repetition_penalty, vals * g.repetition_penalty)
        if g.presence_penalty or g.frequency_penalty:  # OpenAI semantics: over output tokens
            out = seqs[i].output_ids
            if out:
                counts = torch.bincount(torch.tensor(out, device=dev), minlength=V)[:V].to(row.dtype)
                row -= g.frequency_penalty * counts + g.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def _mask_early_stop(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.gen.min_new_tokens and s.stop_ids:
            logits[i, list(s.stop_ids)] = float("-inf")


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    return read_out(draw(logits, seqs), seqs)


@torch.inference_mode()
def draw(logits: torch.Tensor, seqs: list[Sequence]) -> Drawn:
    """Pick each row's token on the device and start copying the tokens out; nothing here waits for the GPU."""
    logits = logits.float()
    logits = _apply_penalties(logits, seqs)
    _mask_early_stop(logits, seqs)
    want_lp = [s.gen.logprobs is not None for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    greedy = all(s.gen.greedy for s in seqs)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        dev = logits.device
        temps = torch.tensor([1.0 if s.gen.greedy else s.gen.temperature for s in seqs], device=dev)
        x = logits / temps.unsqueeze(1)
        top_k = [s.gen.top_k for s in seqs]
        if any(k > 0 for k in top_k):
            V = x.shape[1]
            ks = torch.tensor([k if k > 0 else V for k in top_k], device=dev).clamp(max=V)
            kth = torch.sort(x, dim=-1, descending=True).values.gather(1, (ks - 1).unsqueeze(1))
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        top_p = [s.gen.top_p for s in seqs]
        if any(p < 1.0 for p in top_p):
            sp, idx = torch.sort(probs, dim=-1, descending=True)
            cum = sp.cumsum(dim=-1)
            drop = (cum - sp) > torch.tensor(top_p, device=dev).unsqueeze(1)
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sp)
        min_p = [s.gen.min_p for s in seqs]
        if any(p > 0 for p in min_p):
            thresh = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < thresh, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_rows = torch.tensor([s.gen.greedy for s in seqs], device=dev)
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
                entry["top_logprobs"] = dict(zip(ids.tolist(), vals.tolist()))
            lp_out[i] = entry
    return SampleResult(token_list, lp_out)
