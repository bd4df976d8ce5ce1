"""Paged KV cache bookkeeping: fixed-size blocks with reference counts, and a prefix cache of full blocks keyed by
a chained hash of their tokens. Freed blocks keep their hash until reused, so a later request with the same
prefix finds them (least recently freed blocks are reused first)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from cluster.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------------------
    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached full blocks of the sequence's tokens, leaving at least one token to compute (for its logits)."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        bs = self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = seq.cache_key(i * bs, (i + 1) * bs)
            h = chain_hash(prev, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            prev = h
        return hits

    def plan_admission(self, seq: Sequence, num_new_tokens: int) -> list[int] | None:
        """The sequence's cached prefix blocks if it fits with `num_new_tokens` more tokens, else None."""
        hits = self._lookup(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return hits if need + reusable_free <= self.num_free else None

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting sequence its cached prefix blocks; the rest is computed (and allocated) chunk by chunk."""
        assert not seq.block_table
        prev = None
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            prev = block.hash
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.last_block_hash = prev
        seq.num_cached_prompt_tokens = seq.num_computed_tokens
        if self.enable_prefix_caching:
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_computed_tokens

    # -- growth and release ---------------------------------------------------------------------------------------
    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate blocks so the next `num_new_tokens` tokens have slots."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_fresh())

    def _take_fresh(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return bid

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache (only once their K/V exist)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(seq.num_hashed_blocks, full):
            tokens = seq.cache_key(i * bs, (i + 1) * bs)
            h = chain_hash(seq.last_block_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block.setdefault(h, block.block_id)
            seq.last_block_hash = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks at zero go back to the pool (tail first, so prefixes live longest)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
