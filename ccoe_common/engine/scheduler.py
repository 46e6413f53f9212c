"""Which sequences run in the next step: continuous batching with chunked prefill.

Pure bookkeeping, no tensors: the engine asks `schedule()` for a plan before every step and
reports back what finished. Policy per step:

1. every running sequence whose prompt is fully in the KV cache decodes one token;
2. the remaining token budget (`max_batched_tokens` minus those decode tokens) goes to prompt
   chunks: first sequences already part-way through their prompt, then new ones admitted
   from the waiting queue in arrival order while a KV slot is free;
3. a chunk is at most `prefill_chunk` tokens, so a long prompt is spread over several steps
   and never stalls the decoding sequences for long.

KV memory is reserved as one contiguous slot of `max_seq_len` positions per admitted sequence,
so a sequence, once admitted, can always finish: no preemption, no recomputation.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ccoe_common.engine.errors import Overloaded
from ccoe_common.experts.reference import ExpertKey


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. `computed` = tokens already in its KV slot."""

    request_id: str
    prompt_ids: list[int]
    expert: ExpertKey | None  # the version pinned at submission; None = the bare backbone
    max_new_tokens: int
    deadline: float | None = None  # time.monotonic() value
    slot: int | None = None
    computed: int = 0
    output_ids: list[int] = field(default_factory=list)
    first_scheduled: float | None = None
    first_token: float | None = None
    state: Any = None  # the engine's per-request data (sampling, detokenizer, sink)

    @property
    def prompt_done(self) -> bool:
        return self.computed >= len(self.prompt_ids)


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first prompt position of the chunk
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length >= len(self.seq.prompt_ids)


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]
    prefill: list[PrefillChunk]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, max_batched_tokens: int, prefill_chunk: int, max_waiting: int,
                 retry_after_s: float = 1.0):
        if min(num_slots, max_batched_tokens, prefill_chunk, max_waiting) < 1:
            raise ValueError("num_slots, max_batched_tokens, prefill_chunk and max_waiting must all be >= 1")
        if max_batched_tokens < num_slots:
            raise ValueError(f"max_batched_tokens={max_batched_tokens} must be >= the {num_slots} slots, "
                             "or running sequences could not all decode in one step")
        self.max_batched_tokens = max_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, holding a slot, in admission order

    @property
    def num_slots(self) -> int:
        return len(self.free_slots) + len(self.running)

    def add(self, seq: Sequence) -> None:
        # Free slots count as room: requests that arrive together between two steps all
        # wait here until the next step admits them, and must not be refused for it.
        if len(self.waiting) >= self.max_waiting + len(self.free_slots):
            raise Overloaded(f"all {self.num_slots} sequence slots are busy and the waiting queue is full "
                             f"({self.max_waiting} requests)", self.retry_after_s)
        self.waiting.append(seq)

    def schedule(self, now: float | None = None) -> StepPlan:
        now = time.monotonic() if now is None else now
        decode = [s for s in self.running if s.prompt_done]
        budget = self.max_batched_tokens - len(decode)
        prefill: list[PrefillChunk] = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prompt_done:
                prefill.append(self._chunk(seq, budget))
                budget -= prefill[-1].length
        while budget > 0 and self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.first_scheduled = now
            self.running.append(seq)
            prefill.append(self._chunk(seq, budget))
            budget -= prefill[-1].length
        return StepPlan(decode, prefill)

    def _chunk(self, seq: Sequence, budget: int) -> PrefillChunk:
        length = min(len(seq.prompt_ids) - seq.computed, self.prefill_chunk, budget)
        return PrefillChunk(seq, seq.computed, length)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def all_sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]
