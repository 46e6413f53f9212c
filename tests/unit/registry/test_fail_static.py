"""The fail-static decision: which registry views a router or replica follows, and which it
holds back while it keeps serving what it has (invariant 8)."""

from __future__ import annotations

import pytest

from ccoe_common.registry.fail_static import FailStatic, View, judge
from ccoe_common.telemetry.metrics import Metrics

APPLIED = View.of("e1", 57, {"math", "law"})


def test_the_first_view_is_always_applied():
    assert judge(None, View.of("", 0, set())).apply


@pytest.mark.parametrize("incoming", [
    View.of("e1", 57, {"math", "law"}),  # the same view again (a resync)
    View.of("e1", 58, {"math"}),  # a pop in the same epoch is an ordinary change
    View.of("e1", 90, set()),  # so is popping the last expert
    View.of("e2", 3, {"math", "law"}),  # re-initialised, and it serves everything served here
    View.of("e2", 3, {"math", "law", "sql"}),
])
def test_consistent_views_are_applied(incoming):
    verdict = judge(APPLIED, incoming)
    assert verdict.apply and verdict.reason == ""


@pytest.mark.parametrize(("incoming", "words"), [
    (View.of("e1", 56, {"math", "law"}), "revision went backwards: r56 is older than r57"),
    (View.of("e1", 3, set()), "revision went backwards: r3 is older than r57"),
    (View.of("", 0, set()), "store is empty (no epoch, revision r0"),
    (View.of("", 12, {"math"}), "store is empty"),  # a store without an epoch is not trusted
    (View.of("e2", 4, set()), "does not serve law, math"),
    (View.of("e2", 9, {"math"}), "does not serve law, which this follower serves"),
])
def test_views_that_went_backwards_are_held(incoming, words):
    verdict = judge(APPLIED, incoming)
    assert not verdict.apply
    assert words in verdict.reason


def test_a_follower_holds_until_the_registry_is_consistent_again():
    metrics = Metrics(backend="prometheus")
    guard = FailStatic("router", metrics)
    assert guard.admit(APPLIED) and guard.status() == {"state": "following", "epoch": "e1", "revision": 57}
    # Redis restarted empty: held, counted once however many times the same view arrives.
    for _ in range(3):
        assert not guard.admit(View.of("", 0, set()))
    assert guard.holding and guard.applied == APPLIED
    assert guard.status()["state"] == "holding" and "store is empty" in str(guard.status()["reason"])
    assert guard.summary().startswith("holding: the registry's store is empty")
    # The registry re-initialised and is re-registering: still missing what is served here.
    assert not guard.admit(View.of("e2", 1, set()))
    assert not guard.admit(View.of("e2", 2, {"math"}))
    text = metrics.render()
    assert 'ccoe_registry_regressions_total{component="router"} 1.0' in text
    assert 'ccoe_registry_holding{component="router"} 1.0' in text
    # Everything served here is registered again: followed from now on.
    back = View.of("e2", 3, {"math", "law"})
    assert guard.admit(back) and not guard.holding and guard.applied == back
    assert guard.summary() == "following"
    assert 'ccoe_registry_holding{component="router"} 0.0' in metrics.render()
    # A later regression in the new epoch is judged against what was applied in it.
    assert not guard.admit(View.of("e2", 2, {"math", "law"}))
    assert 'ccoe_registry_regressions_total{component="router"} 2.0' in metrics.render()
