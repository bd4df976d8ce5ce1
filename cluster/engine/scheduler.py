"""Continuous batching: each step gives every running sequence its next tokens (one when decoding, a chunk when
prefilling) under a token budget, then admits waiting sequences. When blocks run out the youngest running
sequence is preempted: its blocks are freed and it is recomputed later from its tokens. With overlapped steps,
schedule_ahead plans the decode step launched before the previous one's tokens are read."""
from __future__ import annotations

from collections import deque
from typing import Iterable

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_batched_tokens: int, session_len: int):
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.session_len = session_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The step's plan: (sequence, number of its tokens to compute now). Decodes first, then prefill chunks."""
        budget = self.max_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        queue = deque(sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival)))
        self.running = []
        preempted = False
        while queue:
            seq = queue.popleft()
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                self.running.append(seq)
                continue
            while not self.bm.can_grow(seq, n):
                victim = max(queue, key=lambda s: s.arrival) if queue else seq
                if victim is not seq:
                    queue.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.bm.grow(seq, n)
            plan.append((seq, n))
            self.running.append(seq)
            budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits = self.bm.plan_admission(seq, min(len(seq), budget))
            if hits is None:
                if not self.running and not plan:
                    raise MemoryError(f"a sequence of {len(seq)} tokens does not fit in the KV cache "
                                      f"({self.bm.num_blocks} blocks of {self.bm.block_size} tokens)")
                break
            self.waiting.popleft()
            self.bm.admit(seq, hits)
            n = min(seq.num_uncomputed, budget)
            self.bm.grow(seq, n)
            seq.status = Status.RUNNING
            plan.append((seq, n))
            self.running.append(seq)
            budget -= n
        return plan

    def schedule_ahead(self, sampled: list[Sequence], dry_run: bool = False) -> list[tuple[Sequence, int]]:
        """The decode step that can run before the tokens of the step in flight (which samples `sampled`) reach the
        host: every running sequence decodes one token, fed from that step on the device, except those its token
        surely finishes (length). A sequence that follows a grammar runs ahead too: the engine draws that step's
        tokens only once the matchers have accepted the tokens in flight. Empty when the step cannot be known
        ahead: a request could be admitted, a sequence is still prefilling, or blocks run short (schedule() then
        decides who is preempted). Blocks are grown unless `dry_run`."""
        if not sampled:
            return []
        if self.waiting and len(self.running) < self.max_batch_size:
            return []  # room to admit: schedule afresh (a full batch admits nobody, so it runs ahead)
        in_flight = set(sampled)
        plan: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if seq not in in_flight or seq.num_computed_tokens != len(seq):
                return []  # still prefilling
            if seq.num_output_tokens + 1 >= seq.gen.max_new_tokens or len(seq) + 1 >= self.session_len:
                continue  # finishes on the token in flight
            plan.append((seq, 1))
        if sum(self.bm.blocks_for(len(seq) + 1) - len(seq.block_table) for seq, _ in plan) > self.bm.num_free:
            return []
        if not dry_run:
            for seq, n in plan:
                self.bm.grow(seq, n)
        return plan

    def _preempt(self, seq: Sequence) -> None:
        self.bm.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # oldest-first order of the waiting queue: a preempted sequence goes back by arrival, ahead of newer ones
        idx = 0
        while idx < len(self.waiting) and self.waiting[idx].arrival < seq.arrival:
            idx += 1
        self.waiting.insert(idx, seq)

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        """A step failed halfway: every running one of `seqs` goes back to waiting, to be recomputed from its tokens
        (what the step left half-done, K/V and blocks, is dropped). `running` is rebuilt from `seqs`, since the
        failed schedule() may have taken some off it."""
        self.running = []
        for seq in seqs:
            if seq.status == Status.RUNNING:
                self._preempt(seq)

    def after_step(self, plan: list[tuple[Sequence, int]]) -> None:
        """Account the computed tokens and publish full blocks to the prefix cache."""
        for seq, n in plan:
            if seq.status == Status.RUNNING:
                seq.num_computed_tokens += n
                self.bm.register_computed(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.bm.release(seq)
