"""A step's plan on the wire from rank 0 to the other ranks: a fixed-size int64 header, then one int64 tensor with
every index tensor of the StepInput packed (and the image embeddings, when the step has some, as a float message).
Two broadcasts a step on a CPU (gloo) group: no step costs a Ray call."""
from __future__ import annotations

import torch

from cluster.engine.model_runner import StepInput

HEADER_LEN = 9  # [cmd, T tokens, B seqs, W block-table width, N sampled rows, max_context_len, decode_only,
#                   M image-embedding rows (LLaVA: sent as a second, float message), R: 1 with M-RoPE ids [3, T]]
CMD_SHUTDOWN, CMD_STEP = 0, 1


def pack_step(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(header int64[HEADER_LEN], payload int64[...]): every index tensor of the step, flattened into one (the
    image embeddings' rows included; the embeddings themselves go as a float message, `embeds_message`)."""
    t, (b, w), n = step.input_ids.numel(), step.block_tables.shape, step.logit_indices.numel()
    m = 0 if step.embed_rows is None else step.embed_rows.numel()
    r = int(step.mrope is not None)
    header = torch.tensor([CMD_STEP, t, b, w, n, step.max_context_len, int(step.decode_only), m, r],
                          dtype=torch.long)
    parts = [step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.context_lens,
             step.cu_seqlens_q, step.logit_indices] + ([step.embed_rows] if m else []) + ([step.mrope] if r else [])
    payload = torch.cat([p.reshape(-1).to("cpu", torch.long) for p in parts])
    return header, payload


def embeds_message(step: StepInput) -> torch.Tensor | None:
    """The step's image embeddings as the CPU fp32 tensor every follower receives, or None."""
    return None if step.embeds is None else step.embeds.to("cpu", torch.float32).contiguous()


def payload_len(header: torch.Tensor) -> int:
    _, t, b, w, n = header[:5].tolist()
    return 3 * t + b * w + b + (b + 1) + n + int(header[7]) + 3 * t * int(header[8])


def unpack_step(header: torch.Tensor, payload: torch.Tensor, embeds: torch.Tensor | None = None) -> StepInput:
    _, t, b, w, n, max_ctx, decode_only, m, r = header.tolist()
    sizes = [t, t, t, b * w, b, b + 1, n, m, 3 * t * r]
    ids, pos, slots, tables, ctx, cu, rows, embed_rows, mrope = payload.split(sizes)
    return StepInput(input_ids=ids, positions=pos, slot_mapping=slots,
                     block_tables=tables.view(b, w).to(torch.int32), context_lens=ctx.to(torch.int32),
                     cu_seqlens_q=cu.to(torch.int32), logit_indices=rows, max_context_len=max_ctx,
                     decode_only=bool(decode_only), embeds=embeds, embed_rows=embed_rows if m else None,
                     mrope=mrope.view(3, t) if r else None)
