"""Prompt prefix keys the router computes without a tokenizer, for cache-aware replica choice.

A prompt becomes a chain of keys, one per piece: key_i = hash(key_{i-1}, piece_i). Two prompts share their first k
keys exactly when their first k pieces are equal, so a replica that served a prompt whose keys include key_k holds
(up to what its engine has evicted since) the KV blocks of everything up to piece k.

Pieces:
- chat messages: one message each (role, content, name, tool calls: the whole message). The chat template renders
  messages in order, each from its own fields, so equal leading messages render to equal leading text and
  tokenize to equal leading tokens; the engine's prefix cache (full blocks keyed by a chained hash of their
  tokens) then hits on all of them but the last partial block. A multi-turn chat resends its history (system,
  user, assistant, ...) and adds a turn: every earlier message is a key the previous turn recorded. Keys per
  message, not per block of text, keep the table small (a turn adds two) and need no template.
- text: fixed runs of TEXT_CHUNK_CHARS characters; token ids: runs of TOKEN_CHUNK ids. Shared leading runs are
  shared leading text, so shared leading tokens up to the boundary of the last equal run.

Each key carries the estimated tokens of the prompt up to and including its piece (characters / 4, as
cluster.protocol's estimate), so a match says how much prefill it would save. blake2b, not hash(): the same key
in every process and every run (str hashes are salted per process).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

TEXT_CHUNK_CHARS = 256  # ~64 tokens: 4 default KV blocks
TOKEN_CHUNK = 64
MAX_PIECES = 512  # the first 512 pieces only: a longer prompt's tail still routes, by what came before it


def _chain(prev: int, data: bytes) -> int:
    h = hashlib.blake2b(prev.to_bytes(8, "little"), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little")


def _message_bytes(m: Any) -> tuple[bytes, int]:
    """(canonical bytes, estimated tokens) of one chat message; anything JSON cannot say (a PIL image given to an
    in-process server) is hashed by its repr, which may differ between two equal images: a missed hint, no more."""
    text = json.dumps(m, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return text.encode(), len(text) // 4 + 1


def prefix_keys(prompt: Any) -> list[tuple[int, int]]:
    """[(key, estimated tokens up to and including this piece)] of a Job choice's prompt (text, token ids, or chat
    messages); [] for an empty or unknown prompt (it routes by load alone)."""
    pieces: list[tuple[bytes, int]] = []
    if isinstance(prompt, str):
        for i in range(0, min(len(prompt), TEXT_CHUNK_CHARS * MAX_PIECES), TEXT_CHUNK_CHARS):
            chunk = prompt[i:i + TEXT_CHUNK_CHARS]
            pieces.append((chunk.encode(), len(chunk) // 4 + 1))
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        pieces = [_message_bytes(m) for m in prompt[:MAX_PIECES]]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        for i in range(0, min(len(prompt), TOKEN_CHUNK * MAX_PIECES), TOKEN_CHUNK):
            run = prompt[i:i + TOKEN_CHUNK]
            pieces.append((b",".join(str(t).encode() for t in run), len(run)))
    keys, key, total = [], 0, 0
    for data, tokens in pieces:
        key = _chain(key, data)
        total += tokens
        keys.append((key, total))
    return keys
