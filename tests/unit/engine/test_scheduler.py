"""Scheduling policy, as pure bookkeeping."""

from __future__ import annotations

import pytest

from ccoe_common.engine.errors import Overloaded
from ccoe_common.engine.scheduler import Scheduler, Sequence


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(request_id=name, prompt_ids=list(range(prompt_len)), expert=None, max_new_tokens=4)


def test_long_prompts_are_chunked_and_decode_goes_first():
    s = Scheduler(num_slots=2, max_batched_tokens=10, prefill_chunk=6, max_waiting=4)
    a, b = seq("a", 9), seq("b", 3)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("a", 0, 6), ("b", 0, 3)]
    for c in plan.prefill:
        c.seq.computed += c.length
    b.output_ids.append(1)  # b's prompt completed: it now decodes
    plan = s.schedule()
    assert plan.decode == [b]
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("a", 6, 3)]
    assert plan.prefill[0].completes_prompt and plan.num_tokens == 4


def test_token_budget_caps_prefill_and_admission_waits_for_slots():
    s = Scheduler(num_slots=2, max_batched_tokens=4, prefill_chunk=8, max_waiting=8)
    for name in "abc":
        s.add(seq(name, 5))
    plan = s.schedule()
    assert [(c.seq.request_id, c.length) for c in plan.prefill] == [("a", 4)]  # budget 4, one chunk
    plan.prefill[0].seq.computed += 4
    plan = s.schedule()
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("a", 4, 1), ("b", 0, 3)]
    assert [q.request_id for q in s.waiting] == ["c"]  # no third slot
    for c in plan.prefill:
        c.seq.computed += c.length
    a = s.running[0]
    s.finish(a)
    assert len(s.free_slots) == 1
    s.schedule()
    assert [r.request_id for r in s.running] == ["b", "c"] and not s.waiting


def test_slots_are_unique_and_returned():
    s = Scheduler(num_slots=3, max_batched_tokens=30, prefill_chunk=8, max_waiting=8)
    seqs = [seq(str(i), 2) for i in range(3)]
    for q in seqs:
        s.add(q)
    s.schedule()
    assert sorted(q.slot for q in seqs) == [0, 1, 2]
    s.finish(seqs[1])
    assert seqs[1].slot is None and s.free_slots == [1]


def test_full_queue_is_a_retryable_overload():
    s = Scheduler(num_slots=1, max_batched_tokens=4, prefill_chunk=4, max_waiting=2, retry_after_s=0.5)
    for name in "abc":  # one for the free slot, two for the queue
        s.add(seq(name, 1))
    with pytest.raises(Overloaded, match=r"all 1 sequence slots are busy and the waiting queue is full "
                                         r"\(2 requests\); retry in 0.5s") as err:
        s.add(seq("d", 1))
    assert err.value.retryable and err.value.code == "RESOURCE_EXHAUSTED" and err.value.retry_after_s == 0.5
    s.schedule()  # "a" takes the slot; the queue holds b, c: still full
    with pytest.raises(Overloaded):
        s.add(seq("d", 1))


def test_budget_must_cover_every_slot():
    with pytest.raises(ValueError, match="max_batched_tokens=2 must be >= the 4 slots"):
        Scheduler(num_slots=4, max_batched_tokens=2, prefill_chunk=4, max_waiting=4)
