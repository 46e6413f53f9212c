"""The rollout state machine: who loads when, when traffic flips, when it rolls back."""

from __future__ import annotations

import pytest

from ccoe_common.registry.rollout import (
    ReplicaView,
    RolloutPolicy,
    abort,
    advance,
    new_rollout,
    replica_statuses,
    versions_to_hold,
)

HAS_V1 = ReplicaView(frozenset({("math", 1)}))
HAS_V2 = ReplicaView(frozenset({("math", 1), ("math", 2)}))


def failed(reason: str) -> ReplicaView:
    return ReplicaView(frozenset({("math", 1)}), {("math", 2): reason})


def test_all_at_once_assigns_everyone_then_flips_when_all_hold_it():
    r = new_rollout("math", 1, 2, RolloutPolicy(), now=0)
    step = advance(r, {"a": HAS_V1, "b": HAS_V1}, now=1)
    assert step.rollout["assigned"] == ["a", "b"] and step.serving is None
    r = step.rollout
    assert advance(r, {"a": HAS_V2, "b": HAS_V1}, now=2) is None  # b still loading: nothing to write
    done = advance(r, {"a": HAS_V2, "b": HAS_V2}, now=3)
    assert (done.serving, done.rollout["state"], done.rollout["assigned"], done.what) == (2, "done", [], "rollout_done")
    assert advance(done.rollout, {"a": HAS_V2}, now=4) is None  # finished rollouts do not move


def test_canary_first_then_max_unavailable_at_a_time():
    policy = RolloutPolicy("canary", canary_replicas=1, max_unavailable=2, canary_wait_s=5)
    live = dict.fromkeys("abcd", HAS_V1)
    r = advance(new_rollout("math", 1, 2, policy, now=0), live, now=0).rollout
    assert r["assigned"] == ["a"] and r["state"] == "canary"
    live["a"] = HAS_V2
    r = advance(r, live, now=1).rollout
    assert r["canary_ready_at"] == 1 and r["state"] == "canary"  # holds for canary_wait_s
    assert advance(r, live, now=3) is None
    step = advance(r, live, now=6)
    assert step.what == "rollout_canary_passed" and step.rollout["assigned"] == ["a", "b", "c"]
    live["b"] = HAS_V2
    r = advance(step.rollout, live, now=7).rollout
    assert r["assigned"] == ["a", "b", "c", "d"]  # c still loading: one more slot
    live["c"] = live["d"] = HAS_V2
    assert advance(r, live, now=8).serving == 2


def test_a_failing_replica_rolls_back_with_its_reason():
    r = advance(new_rollout("math", 1, 2, RolloutPolicy(), now=0), {"a": HAS_V1, "b": HAS_V1}, now=0).rollout
    step = advance(r, {"a": HAS_V2, "b": failed("smoke test produced no tokens")}, now=1)
    assert step.rollout["state"] == "rolled_back" and step.failed_version == 2 and step.serving is None
    assert "replica b" in step.rollout["reason"] and "smoke test produced no tokens" in step.rollout["reason"]
    assert versions_to_hold({"math": 1}, {"math": step.rollout}, "a") == {("math", 1)}


def test_a_dead_replica_is_dropped_and_the_rollout_completes_on_survivors():
    r = advance(new_rollout("math", 1, 2, RolloutPolicy(), now=0), {"a": HAS_V1, "b": HAS_V1}, now=0).rollout
    assert [s[1] for s in replica_statuses(r, {"a": HAS_V2})] == ["ready", "gone"]
    step = advance(r, {"a": HAS_V2}, now=1)
    assert step.serving == 2
    # a replacement that joins later is simply told the serving version
    assert versions_to_hold({"math": 2}, {"math": step.rollout}, "c") == {("math", 2)}


def test_a_replica_that_joins_mid_rollout_is_assigned_too():
    r = advance(new_rollout("math", 1, 2, RolloutPolicy(), now=0), {"a": HAS_V1}, now=0).rollout
    step = advance(r, {"a": HAS_V2, "new": ReplicaView()}, now=1)
    assert step.serving is None and step.rollout["assigned"] == ["a", "new"]
    assert versions_to_hold({"math": 1}, {"math": step.rollout}, "new") == {("math", 1), ("math", 2)}


def test_no_live_replicas_means_no_progress():
    r = new_rollout("math", 0, 1, RolloutPolicy(), now=0)
    assert advance(r, {}, now=1) is None


def test_abort_and_policy_validation():
    r = abort(new_rollout("math", 1, 2, RolloutPolicy(), now=0), "manual rollback by ops", now=1)
    assert r["state"] == "rolled_back" and advance(r, {"a": HAS_V2}, now=2) is None
    with pytest.raises(ValueError, match="strategy must be one of"):
        RolloutPolicy("blue_green")
    with pytest.raises(ValueError, match="at least 1"):
        RolloutPolicy("canary", canary_replicas=0)
