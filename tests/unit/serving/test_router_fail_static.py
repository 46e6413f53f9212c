"""A router holds its registry view when the registry goes backwards, and keeps routing on it."""

from __future__ import annotations

import pytest

from ccoe_common.errors import ExpertNotFound
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.router_core import RouterCore


class NoReplica:
    def stream(self, request, carrier):
        raise AssertionError("routing decisions only")


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> RouterCore:
    work = tmp_path_factory.mktemp("router-fail-static")
    uris = demo_experts(work)
    config = AppConfig.load({"backbone": str(demo_backbone(work)), "experts": [uris["math"]],
                             "telemetry": {"tracing": "memory"}})
    return RouterCore(config, NoReplica())


def test_a_router_keeps_its_view_while_the_registry_is_empty_and_follows_it_again(router):
    table = {"version": 2, "rules": [{"id": "m", "match": {"domain": ["math"]}, "experts": ["math"]}]}
    assert router.apply_desired({"math": 3}, 4, table, epoch="e1", revision=40)
    assert router.resolve("math", None) == 3 and router.table.version == 2
    # Redis restarted empty: the view is held; bare names still resolve to what was served.
    assert not router.apply_desired({}, 0, None, epoch="", revision=0)
    assert router.resolve("math", None) == 3 and router.table.version == 2
    assert router.fail_static.summary().startswith("holding: the registry's store is empty")
    # An older copy in the same epoch is held as well.
    assert not router.apply_desired({"math": 2}, 3, None, epoch="e1", revision=31)
    assert router.resolve("math", None) == 3
    # Re-registered: a new epoch serving math@1 is followed.
    assert router.apply_desired({"math": 1}, 0, None, epoch="e2", revision=5)
    assert router.resolve("math", None) == 1 and router.fail_static.summary() == "following"
    # Popping in the same epoch is an ordinary change.
    assert router.apply_desired({}, 0, None, epoch="e2", revision=6)
    with pytest.raises(ExpertNotFound):
        router.resolve("math", None)
