"""Fail static: when the registry's state goes backwards, routers and replicas keep serving what
they hold instead of following it into an outage (invariant 8).

Every desired state carries the store's *epoch* (an id the registry writes once into a fresh
store, `ccoe:epoch`) and its revision. A follower remembers the last view it applied and judges
each new one:

| incoming state | verdict |
| --- | --- |
| first view, or same epoch and revision >= the applied one | apply |
| same epoch, revision lower than the applied one (an older backup restored, a lost AOF tail) | hold |
| no epoch: an empty store (Redis restarted without its data, FLUSHALL) | hold |
| a new epoch (the registry re-registered the config's experts) that serves every expert this follower serves | apply |
| a new epoch that lacks some of them | hold, naming them |

While it holds, a router keeps its serving versions and rules, and a replica keeps every version
it holds (it still loads what it is told to, so a re-registration's rollout can complete, but
frees nothing). Each hold is logged at ERROR, counted in `ccoe_registry_regressions_total`,
shown by `ccoe_registry_holding` = 1, and named in the follower's status; the follower converges
at the first view that passes.

    guard = FailStatic("router")
    if guard.admit(View.of(msg.epoch, msg.revision, msg.serving)):
        apply(msg)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """One desired state as a follower judges it, e.g. View("9f2c41d0", 57, frozenset({"math"}))."""

    epoch: str  # "" = the store has no epoch (empty, or not yet initialised)
    revision: int
    serving: frozenset[str]  # names of the experts it serves

    @classmethod
    def of(cls, epoch: str, revision: int, serving: Iterable[str]) -> View:
        return cls(epoch, int(revision), frozenset(serving))


@dataclass(frozen=True)
class Verdict:
    apply: bool
    reason: str = ""  # why the view is held back; "" when it is applied


def judge(applied: View | None, incoming: View) -> Verdict:
    """Whether a follower that applied `applied` may apply `incoming` (pure; see the table above)."""
    if applied is None:
        return Verdict(True)
    if incoming.epoch == applied.epoch:
        if incoming.revision >= applied.revision:
            return Verdict(True)
        return Verdict(False, f"the registry's revision went backwards: r{incoming.revision} is older than "
                              f"r{applied.revision} applied here (restored from an older copy?)")
    if not incoming.epoch:
        return Verdict(False, f"the registry's store is empty (no epoch, revision r{incoming.revision}, serving "
                              f"{_names(incoming.serving)}) while this follower applied epoch {applied.epoch} "
                              f"r{applied.revision} (Redis restarted without its data?)")
    missing = applied.serving - incoming.serving
    if missing:
        return Verdict(False, f"the registry was re-initialised (epoch {incoming.epoch}, was {applied.epoch}) and "
                              f"does not serve {_names(missing)}, which this follower serves; push them again "
                              "to converge")
    return Verdict(True)


def _names(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "nothing"


class FailStatic:
    """A follower's memory of what it applied, and whether it is holding back now."""

    def __init__(self, component: str, metrics: Metrics | None = None):
        self.component = component  # "router" or "replica", for logs and metrics
        self.metrics = metrics
        self.applied: View | None = None
        self.reason = ""  # non-empty while holding
        self.since: float | None = None  # time.time() when the current hold began

    @property
    def holding(self) -> bool:
        return bool(self.reason)

    def admit(self, incoming: View) -> bool:
        """True if `incoming` may be applied (it becomes the applied view); False to hold."""
        verdict = judge(self.applied, incoming)
        if verdict.apply:
            if self.holding:
                log.warning("%s: the registry is consistent again (epoch %s r%d); following it after holding "
                            "for %.1fs", self.component, incoming.epoch or "-", incoming.revision,
                            time.time() - (self.since or time.time()))
                self._set(False)
            self.applied = incoming
            return True
        if verdict.reason != self.reason:
            # Logged on every change of reason, not on every message: a hold can last long.
            log.error("%s: FAIL STATIC, keeping what it serves (%s): %s", self.component,
                      _names(self.applied.serving if self.applied else frozenset()), verdict.reason)
            if not self.holding:
                self.since = time.time()
                if self.metrics is not None:
                    self.metrics.registry_regression(self.component)
            self.reason = verdict.reason
            self._set(True)
        return False

    def _set(self, holding: bool) -> None:
        if not holding:
            self.reason, self.since = "", None
        if self.metrics is not None:
            self.metrics.registry_holding(self.component, holding)

    def status(self) -> dict[str, object]:
        """For health and stats answers, e.g. {"state": "holding", "reason": "...", "since": 1.7e9}."""
        applied = self.applied
        base: dict[str, object] = {"epoch": applied.epoch if applied else "",
                                   "revision": applied.revision if applied else 0}
        if self.holding:
            return {"state": "holding", "reason": self.reason, "since": self.since, **base}
        return {"state": "following", **base}

    def summary(self) -> str:
        """One line for a health answer's metadata: "following" or "holding: <reason>"."""
        text = f"holding: {self.reason}" if self.holding else "following"
        return text.encode("ascii", "replace").decode()  # gRPC metadata values are ASCII
