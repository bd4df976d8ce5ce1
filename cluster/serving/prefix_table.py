"""Which replica was sent which prompt prefixes: a bounded LRU of (prefix key, replica) entries, one table per model
in each router process. A hint, never a promise: the replica's engine may have evicted those blocks, another router
replica may have sent the same prefix elsewhere, and a replica that is gone is dropped. Routing on a wrong hint
costs one prefill, never a wrong answer."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable

DEFAULT_MAX_ENTRIES = 100_000  # (key, replica) entries per model: ~11 MB (one Python int and an LRU link each)
_SLOT_BITS = 16  # an entry is key << 16 | replica slot: one int, not a tuple (half the memory)


@dataclass(frozen=True)
class Match:
    """What one replica holds of a prompt, in estimated tokens: its longest prefix, and the longest earlier prompt
    sent there that this one extends or repeats (a conversation's previous turn, a retry; 0: none)."""

    tokens: int
    whole: int = 0


class PrefixTable:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._lru: OrderedDict[int, bool] = OrderedDict()  # oldest first; True: a prompt sent there ended here
        self._slots: dict[Hashable, int] = {}  # replica -> slot
        self._free: list[int] = []
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _slot(self, replica: Hashable, create: bool) -> int | None:
        s = self._slots.get(replica)
        if s is None and create:
            if self._free:
                s = self._free.pop()
            elif len(self._slots) < (1 << _SLOT_BITS):
                s = len(self._slots)
            else:
                return None  # 65536 live replicas of one model: not a case to plan for
            self._slots[replica] = s
        return s

    def matched(self, keys: list[tuple[int, int]], replicas: Iterable[Hashable]) -> dict[Hashable, Match]:
        """Per replica, what it holds of the prompt of `keys` (replicas holding nothing left out). The entries that
        matched become the most recently used."""
        out = {}
        lru = self._lru
        for r in replicas:
            s = self._slot(r, create=False)
            if s is None:
                continue
            n, whole = 0, 0
            while n < len(keys):
                ended = lru.get(keys[n][0] << _SLOT_BITS | s)
                if ended is None:
                    break
                n += 1
                if ended:
                    whole = keys[n - 1][1]
            if n:
                out[r] = Match(keys[n - 1][1], whole)
                self._touch([k for k, _ in keys[:n]], s)
        return out

    def record(self, keys: list[tuple[int, int]], replica: Hashable) -> None:
        """`replica` now holds every prefix of `keys` (it was just sent the prompt), and the whole of it."""
        s = self._slot(replica, create=True)
        if s is None or not keys:
            return
        self._touch([k for k, _ in keys], s)
        self._lru[keys[-1][0] << _SLOT_BITS | s] = True
        while len(self._lru) > self.max_entries:
            self._lru.popitem(last=False)
            self.evicted += 1

    def _touch(self, keys: list[int], slot: int) -> None:
        """Deepest key first, so a prefix is always used more recently than its extensions: eviction takes the
        longest prefixes first and never leaves an extension unreachable behind an evicted parent."""
        lru = self._lru
        for k in reversed(keys):
            e = k << _SLOT_BITS | slot
            if e in lru:
                lru.move_to_end(e)
            else:
                lru[e] = False

    def replicas(self) -> list[Hashable]:
        return list(self._slots)

    def forget(self, replica: Hashable) -> None:
        """The replica is gone: drop its entries (a scan, on a rare event) and free its slot."""
        s = self._slots.pop(replica, None)
        if s is None:
            return
        mask = (1 << _SLOT_BITS) - 1
        for e in [e for e in self._lru if e & mask == s]:
            del self._lru[e]
        self._free.append(s)
