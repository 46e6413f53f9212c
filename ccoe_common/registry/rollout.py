"""Rollouts as pure logic: which replicas load a new version when, when traffic switches, and
when it rolls back. The registry's controller feeds it the stored record and the live
replicas' reports, and writes back whatever it returns (compare-and-set).

A rollout never moves traffic replica by replica. Replicas *load* the new version next to
the serving one (canary replicas first, then the rest at most `max_unavailable` at a time);
the serving version flips for the whole fleet in one atomic step, once every live replica
holds the new version and passed its smoke test. So a request can always be sent to any
replica, and every response comes from one version. A replica that fails to load or to pass
the smoke test rolls the rollout back: nobody was ever served the new version.

Record (JSON in `ccoe:rollouts`): id, expert, from_version, to_version, policy, state
(`canary` → `rolling` → `done`, or `rolled_back`), reason, assigned (replica ids told to load
the new version), started_at, canary_ready_at, finished_at.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeGuard

ACTIVE = ("canary", "rolling")
STRATEGIES = ("all_at_once", "canary")


@dataclass(frozen=True)
class RolloutPolicy:
    strategy: str = "all_at_once"
    canary_replicas: int = 1
    max_unavailable: int = 1
    canary_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"rollout strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.canary_replicas < 1 or self.max_unavailable < 1:
            raise ValueError("canary_replicas and max_unavailable must be at least 1, got "
                             f"{self.canary_replicas} and {self.max_unavailable}")
        if self.canary_wait_s < 0:
            raise ValueError(f"canary_wait_s must be >= 0, got {self.canary_wait_s}")

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "canary_replicas": self.canary_replicas,
                "max_unavailable": self.max_unavailable, "canary_wait_s": self.canary_wait_s}


@dataclass(frozen=True)
class ReplicaView:
    """What a live replica last reported: versions held (smoke-tested) and load failures."""

    loaded: frozenset[tuple[str, int]] = frozenset()
    failures: dict[tuple[str, int], str] = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> ReplicaView:
        return cls(frozenset((n, int(v)) for n, v in report.get("loaded", [])),
                   {(f["name"], int(f["version"])): f["reason"] for f in report.get("failures", [])})


@dataclass(frozen=True)
class Step:
    """What the controller must write: the new record, and the serving version if it flips."""

    rollout: dict[str, Any]
    what: str  # audit verb
    serving: int | None = None
    failed_version: int | None = None


def new_rollout(expert: str, from_version: int, to_version: int, policy: RolloutPolicy,
                now: float | None = None, trace: dict[str, str] | None = None) -> dict[str, Any]:
    """`trace`: the W3C trace context of the push, so every replica's load joins its trace."""
    return {"id": uuid.uuid4().hex[:12], "expert": expert, "from_version": from_version, "trace": trace or {},
            "to_version": to_version, "policy": policy.as_dict(),
            "state": "canary" if policy.strategy == "canary" else "rolling", "reason": "", "assigned": [],
            "started_at": time.time() if now is None else now, "canary_ready_at": None, "finished_at": None}


def is_active(rollout: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    return rollout is not None and rollout["state"] in ACTIVE


def advance(rollout: dict[str, Any], live: dict[str, ReplicaView], now: float) -> Step | None:
    """The next change to an active rollout given the live replicas, or None if nothing changes."""
    if not is_active(rollout):
        return None
    r = dict(rollout)
    key = (r["expert"], r["to_version"])
    policy = RolloutPolicy(**r["policy"])
    # A replica that died is dropped: the rollout completes on the survivors.
    assigned = [rid for rid in r["assigned"] if rid in live]
    for rid in assigned:
        if key in live[rid].failures:
            r.update(state="rolled_back", assigned=[], finished_at=now,
                     reason=f"replica {rid} could not serve {key[0]}@{key[1]}: {live[rid].failures[key]}")
            return Step(r, "rollout_rolled_back", failed_version=key[1])
    ready = [rid for rid in assigned if key in live[rid].loaded]
    waiting = sorted(rid for rid in live if rid not in assigned)
    what = "rollout_assign"

    if policy.strategy == "all_at_once":
        assigned += waiting
    elif r["state"] == "canary":
        assigned += waiting[:max(0, min(policy.canary_replicas, len(live)) - len(assigned))]
        canary_ready = bool(assigned) and len(ready) == len(assigned)
        if canary_ready and r["canary_ready_at"] is None:
            r["canary_ready_at"] = now  # stored, so a restarted registry does not restart the hold
            what = "rollout_canary_ready"
        elif not canary_ready:
            r["canary_ready_at"] = None
        if canary_ready and now - r["canary_ready_at"] >= policy.canary_wait_s:
            r["state"], what = "rolling", "rollout_canary_passed"
    if r["state"] == "rolling" and policy.strategy == "canary":
        loading = len(assigned) - len(ready)
        waiting = sorted(rid for rid in live if rid not in assigned)
        assigned += waiting[:max(0, policy.max_unavailable - loading)]

    if r["state"] == "rolling" and live and all(key in live[rid].loaded for rid in live):
        r.update(state="done", assigned=[], finished_at=now)
        return Step(r, "rollout_done", serving=key[1])
    r["assigned"] = assigned
    if r == rollout:
        return None
    return Step(r, what)


def abort(rollout: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    return {**rollout, "state": "rolled_back", "assigned": [], "finished_at": now, "reason": reason}


def replica_statuses(rollout: dict[str, Any], live: dict[str, ReplicaView]) -> list[tuple[str, str, str]]:
    """(replica id, state, detail) for display: waiting, loading, ready, failed or gone."""
    key = (rollout["expert"], rollout["to_version"])
    out = []
    for rid in sorted(set(live) | set(rollout["assigned"])):
        view = live.get(rid)
        if view is None:
            out.append((rid, "gone", "stopped reporting"))
        elif key in view.failures:
            out.append((rid, "failed", view.failures[key]))
        elif key in view.loaded:
            out.append((rid, "ready", ""))
        elif rid in rollout["assigned"]:
            out.append((rid, "loading", ""))
        elif is_active(rollout):
            out.append((rid, "waiting", ""))
        else:  # finished: the version has since been replaced, rolled back or popped here
            out.append((rid, "released", f"rollout {rollout['state']}; version no longer held"))
    return out


def versions_to_hold(serving: dict[str, int], rollouts: dict[str, dict[str, Any]],
                     replica_id: str) -> set[tuple[str, int]]:
    """What one replica should hold resident: every serving version, plus the new version of
    each active rollout that assigned it."""
    want = set(serving.items())
    for name, r in rollouts.items():
        if is_active(r) and replica_id in r["assigned"]:
            want.add((name, int(r["to_version"])))
    return want


def trace_of(rollouts: dict[str, dict[str, Any]], name: str, version: int) -> dict[str, str]:
    """The trace context of the rollout bringing name@version in (empty if none)."""
    r = rollouts.get(name)
    return dict(r.get("trace") or {}) if r is not None and int(r["to_version"]) == version else {}
