"""Expert residency without a model: pins, staging, draining, reference counts, freeing."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from ccoe_common.engine.residency import ExpertResidency
from ccoe_common.errors import ExpertNotFound, ExpertNotReady
from ccoe_common.experts.errors import ExpertVersionExists
from ccoe_common.experts.reference import ExpertKey

MATH1, MATH2, MATH3, SQL1 = ExpertKey("math", 1), ExpertKey("math", 2), ExpertKey("math", 3), ExpertKey("sql", 1)


@dataclass(frozen=True)
class Weights:
    key: ExpertKey


class FakeStore:
    """The part of CCoEModel residency uses: a set of resident keys, and a log of pops."""

    def __init__(self, *keys: ExpertKey):
        self.keys = set(keys)
        self.popped: list[ExpertKey] = []

    def push(self, source: Weights) -> ExpertKey:
        if source.key in self.keys:
            raise ExpertVersionExists(f"expert {source.key} is already resident")
        self.keys.add(source.key)
        return source.key

    def pop(self, name: str, version: int | None = None) -> list[ExpertKey]:
        key = ExpertKey(name, version)
        self.keys.remove(key)
        self.popped.append(key)
        return [key]

    def get(self, selector: ExpertKey) -> Weights:
        if selector not in self.keys:
            raise ExpertNotFound(f"expert {selector.name!r} has no resident version {selector.version}")
        return Weights(selector)

    def resident(self) -> list[ExpertKey]:
        return sorted(self.keys)

    def versions_of(self, name: str) -> list[ExpertKey]:
        return sorted(k for k in self.keys if k.name == name)


def test_a_name_pins_the_newest_admitted_version_and_keeps_it_across_a_push():
    store = FakeStore(MATH1, SQL1)
    residency = ExpertResidency(store)
    assert residency.acquire(None) is None
    first = residency.acquire("math")
    assert first == MATH1
    residency.push(Weights(MATH2))
    assert residency.acquire("math") == MATH2
    assert residency.acquire("math@1") == MATH1 == residency.acquire(MATH1)
    assert (residency.in_use(MATH1), residency.in_use(MATH2)) == (3, 1)


def test_an_unknown_expert_or_version_is_not_found_naming_what_is_served():
    residency = ExpertResidency(FakeStore(MATH1, SQL1))
    with pytest.raises(ExpertNotFound, match=r"expert medical is not served here; resident experts: "
                                                r"\['math@1', 'sql@1'\]") as err:
        residency.acquire("medical")
    assert (err.value.code, err.value.retryable) == ("NOT_FOUND", False)
    with pytest.raises(ExpertNotFound, match="expert math@4 is not served here"):
        residency.acquire(ExpertKey("math", 4))


def test_a_staged_version_is_refused_unless_the_request_allows_it():
    residency = ExpertResidency(FakeStore(MATH1))
    assert residency.push(Weights(MATH2), staged=True) == MATH2
    assert residency.staged() == [MATH2]
    assert residency.acquire("math") == MATH1, "a name resolves to the newest *admitted* version"
    with pytest.raises(ExpertNotReady, match=r"math@2 is still being smoke-tested here \(staged\); retry in a few "
                                             r"seconds; live versions: \[1\]") as err:
        residency.acquire("math@2")
    assert (err.value.code, err.value.retryable) == ("UNAVAILABLE", True)
    assert residency.in_use(MATH2) == 0, "a refused pin holds nothing"
    assert residency.acquire("math@2", allow_staged=True) == MATH2
    residency.admit(MATH2)
    assert residency.staged() == [] and residency.acquire("math") == MATH2
    with pytest.raises(ExpertNotFound, match=r"math@2 is not staged here \(already admitted\)"):
        residency.admit(MATH2)
    with pytest.raises(ExpertNotFound, match=r"math@3 is not staged here \(not resident\)"):
        residency.admit(MATH3)


def test_the_only_version_staged_leaves_a_name_with_nothing_to_pin():
    residency = ExpertResidency(FakeStore())
    residency.push(Weights(MATH1), staged=True)
    with pytest.raises(ExpertNotFound, match=r"expert math is not served here; resident experts: none"):
        residency.acquire("math")


def test_draining_refuses_new_pins_but_keeps_accepted_ones_until_the_last_release():
    store = FakeStore(MATH1, MATH2)
    residency = ExpertResidency(store)
    held = [residency.acquire("math@1"), residency.acquire("math@1")]
    assert residency.drain(residency.retirable("math", 1)) == [MATH1]
    assert residency.draining() == [MATH1]
    with pytest.raises(ExpertNotFound, match=r"math@1 is being removed \(draining\); live versions: \[2\]"):
        residency.acquire("math@1")
    assert residency.acquire("math") == MATH2, "a name skips the draining version"
    with pytest.raises(ExpertNotFound, match="no resident, non-draining version of expert 'math'"):
        residency.retirable("math", 1)
    with pytest.raises(ExpertNotFound, match="still draining after a pop"):
        residency.push(Weights(MATH1))

    residency.release(held[0])
    assert store.popped == [] and MATH1 in store.keys, "one accepted request still runs on it"
    residency.release(held[1])
    assert store.popped == [MATH1], "freed exactly when the count reaches 0"
    assert residency.draining() == [] and residency.in_use(MATH1) == 0
    assert residency.wait_for_unload([MATH1], timeout=0)


def test_an_idle_version_is_freed_at_once_and_a_staged_one_too():
    store = FakeStore(SQL1)
    residency = ExpertResidency(store)
    residency.push(Weights(MATH2), staged=True)
    assert residency.drain(residency.retirable("math")) == [MATH2]
    assert residency.drain(residency.retirable("sql")) == [SQL1]
    assert store.popped == [MATH2, SQL1]
    assert residency.staged() == [] and residency.draining() == []
    with pytest.raises(ExpertNotFound, match="no resident, non-draining version of expert 'nope'"):
        residency.retirable("nope")
    with pytest.raises(ExpertNotFound, match="has no resident version 4") as err:
        residency.retirable("math", 4)
    assert err.value.code == "NOT_FOUND"  # the store's own error, passed through unchanged


def test_a_version_not_in_use_is_never_freed_unless_drained():
    store = FakeStore(MATH1)
    residency = ExpertResidency(store)
    residency.release(residency.acquire("math"))
    assert store.popped == [] and residency.in_use(MATH1) == 0
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        residency.release(MATH1)


def test_wait_for_unload_blocks_until_the_last_release():
    store = FakeStore(MATH1)
    residency = ExpertResidency(store)
    key = residency.acquire("math")
    residency.drain([MATH1])
    assert not residency.wait_for_unload([MATH1], timeout=0), "still held"
    released = threading.Thread(target=residency.release, args=(key,))
    released.start()
    assert residency.wait_for_unload([MATH1], timeout=30)
    released.join()
    assert store.popped == [MATH1]


def test_concurrent_pins_and_releases_free_once_and_never_under_a_holder():
    store = FakeStore(MATH1, MATH2)
    residency = ExpertResidency(store)
    threads, rounds = 8, 300
    start = threading.Barrier(threads + 1)
    problems: list[str] = []

    def worker() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                key = residency.acquire("math@1")
            except ExpertNotFound:  # drained meanwhile: what a new request sees
                key = residency.acquire("math")
            if key not in store.keys:
                problems.append(f"pinned {key}, which is already freed")
            residency.release(key)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    drained = residency.drain([MATH1])
    for w in workers:
        w.join()
    assert drained == [MATH1] and problems == []
    assert store.popped == [MATH1], "freed exactly once"
    assert residency.in_use(MATH1) == 0 and residency.in_use(MATH2) == 0
    assert residency.wait_for_unload([MATH1], timeout=0)
