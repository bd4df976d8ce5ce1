"""M-RoPE (Qwen2-VL, Qwen2.5-VL) on the engine's one rotary kernel. Each token has three position ids (temporal,
height, width); `mrope_section` splits a head's rotary frequencies into three runs, each rotated by one of the ids.
A text token's three ids are equal, so it is ordinary rope at that position; only a step holding image tokens needs
per-token cos/sin rows, built here from the model's cos/sin cache (the kernel then reads row t for token t)."""
from __future__ import annotations

import torch


def mrope_positions(token_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """As transformers' get_rope_index for images: ([3, n] position ids of tokens [0, n), n = the end of the last
    image, and rope_delta). Text continues from the largest id so far + 1, so token i >= n sits at i + rope_delta
    with three equal ids. An image is a run of image tokens, one per merged patch, in its grid's row-major order."""
    parts: list[torch.Tensor] = []
    pos, i, n, k = 0, 0, len(token_ids), 0
    while i < n and k < len(grids):
        j = token_ids.index(image_token_id, i) if image_token_id in token_ids[i:] else n
        if j > i:  # text: three equal ids
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        if j == n:
            break
        t, h, w = grids[k][0], grids[k][1] // merge, grids[k][2] // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w)
        i, k = j + t * h * w, k + 1
    if k != len(grids):
        raise ValueError(f"the prompt has image tokens for {k} image(s), not {len(grids)}")
    ids = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return ids.long(), pos - i


def step_positions(mrope: torch.Tensor | None, delta: int, start: int, end: int) -> torch.Tensor:
    """[3, end - start] position ids of a sequence's tokens [start, end)."""
    plain = torch.arange(start, end) + delta
    if mrope is None or start >= mrope.shape[1]:
        return plain.expand(3, -1)
    have = mrope[:, start:min(end, mrope.shape[1])]
    return torch.cat([have, plain[have.shape[1]:].expand(3, -1)], dim=1)


def mrope_table(cos_sin: torch.Tensor, positions: torch.Tensor, section: list[int]) -> torch.Tensor:
    """[T, head_dim] cos/sin rows for [3, T] position ids: frequency j of each half from the row of its section's id
    (transformers' recomposition_frequencies on a [cos | sin] cache)."""
    half = cos_sin.shape[1] // 2
    sec = torch.repeat_interleave(torch.arange(3, device=cos_sin.device), torch.tensor(section, device=cos_sin.device))
    assert sec.numel() == half, (section, half)
    cols = torch.cat([sec, sec])  # [head_dim]: which of the three ids each column reads
    rows = cos_sin[positions.t()]  # [T, 3, head_dim]
    return rows.gather(1, cols.view(1, 1, -1).expand(rows.shape[0], 1, -1)).squeeze(1).contiguous()
