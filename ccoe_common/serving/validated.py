"""The last expert version a replica validated, kept for a while so that the rollout which
usually follows loads it from memory instead of reading and checking the artifact again.

A push has one replica load the artifact to validate it; a moment later the rollout asks every
replica, that one included, to load the copy in the artifact store. The copy holds the same
bytes (the store checks them against the manifest's sha256 as it copies), so an expert loaded
and checked from the source is the expert the stored copy would give: it is reused when the
stored manifest names the same name@version and the same weights_sha256. That takes one full
read, hash and tensor copy off the rollout (and off the CPU the engine shares), on that replica.

    cache = ValidatedExperts(ttl_s=60)
    cache.keep(expert, manifest.weights_sha256)  # after a validation passed
    cache.take(read_manifest(stored_uri))         # the expert, or None: load it
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ccoe_common.experts.manifest import ExpertManifest
from ccoe_common.model.expert import LoadedExpert


@dataclass(frozen=True)
class _Kept:
    expert: LoadedExpert
    weights_sha256: str
    at: float  # time.monotonic()


class ValidatedExperts:
    """At most one expert, for at most `ttl_s` (memory: one expert's weights, until a rollout
    takes it, another validation replaces it, or it expires)."""

    def __init__(self, ttl_s: float = 60.0):
        self.ttl_s = ttl_s
        self._kept: _Kept | None = None
        self._lock = threading.Lock()

    def keep(self, expert: LoadedExpert, weights_sha256: str) -> None:
        with self._lock:
            self._kept = _Kept(expert, weights_sha256, time.monotonic())

    def take(self, manifest: ExpertManifest) -> LoadedExpert | None:
        """The kept expert if `manifest` names it (same key and weights), handed over once."""
        with self._lock:
            kept = self._fresh()
            if kept is None or kept.expert.key != manifest.key or kept.weights_sha256 != manifest.weights_sha256:
                return None
            self._kept = None
            return kept.expert

    def expire(self) -> None:
        with self._lock:
            self._fresh()

    def _fresh(self) -> _Kept | None:
        if self._kept is not None and time.monotonic() - self._kept.at > self.ttl_s:
            self._kept = None
        return self._kept
