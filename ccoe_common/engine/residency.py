"""Which resident expert versions a request may run on, and when a retired one is freed.

The weights live in the model (`CCoEModel`); this class keeps the lifecycle around them,
apart from the step loop, so it is tested without a model (SGLang's `LoRARegistry` plays
the same part for adapters):

- a pushed version is **admitted** (any request may pin it) or **staged** (only requests
  with `allow_staged`, a replica's smoke test; `admit` makes it live);
- a request **acquires** one version at submission: "math" resolves to the newest admitted
  version *then* (say math@1), and the request keeps math@1 to its end, whatever is pushed
  meanwhile; it **releases** it when it ends, however it ends;
- `drain` (after a pop) refuses new pins of a version but keeps the accepted ones, and the
  weights are freed the moment the last of them releases (at once if none holds it).

    residency = ExpertResidency(model)
    residency.push(loaded_math_v2, staged=True)    # resident, smoke test only
    key = residency.acquire("math@2", allow_staged=True)   # -> ExpertKey("math", 2), count 1
    residency.admit(key)                           # now "math" resolves to math@2
    residency.drain([key])                         # no new pins; freed when the count is 0
    residency.release(key)                         # count 0: model.pop("math", 2) runs here
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Protocol

from ccoe_common.errors import ExpertNotFound, ExpertNotReady
from ccoe_common.experts.reference import ExpertKey

if TYPE_CHECKING:
    from ccoe_common.model.expert import LoadedExpert

log = logging.getLogger(__name__)


class ExpertStore(Protocol):
    """What residency needs from the holder of the weights; `CCoEModel` is one."""

    def push(self, source: LoadedExpert) -> ExpertKey: ...

    def pop(self, name: str, version: int | None = None) -> list[ExpertKey]: ...

    def get(self, selector: ExpertKey) -> LoadedExpert:
        """The resident version `selector` names; raises ExpertNotFound."""
        ...

    def resident(self) -> list[ExpertKey]: ...

    def versions_of(self, name: str) -> list[ExpertKey]: ...


class ExpertResidency:
    """Pins, staging and draining over an `ExpertStore`, under one lock.

    Every method is safe to call from any thread. The store is only read and changed under
    this lock by this class (other code may push to the store directly before serving, as
    tests and the replica's start-up do; such versions are admitted).
    """

    def __init__(self, store: ExpertStore):
        self._store = store
        self._lock = threading.Lock()
        self._refs: Counter[ExpertKey] = Counter()  # requests holding each version
        self._staged: set[ExpertKey] = set()
        self._draining: set[ExpertKey] = set()
        self._unloaded: dict[ExpertKey, threading.Event] = {}  # set when a draining version is freed

    # ---- versions ----------------------------------------------------------------------

    def push(self, expert: LoadedExpert, *, staged: bool = False) -> ExpertKey:
        """Make a loaded version resident: admitted, or staged for its smoke test.

        Refused while an earlier copy of the same name@version still drains: the freed
        copy's pop would take the new one with it.
        """
        with self._lock:
            if expert.key in self._draining:
                raise ExpertNotFound(f"expert {expert.key} is still draining after a pop; push another version")
            key = self._store.push(expert)
            if staged:
                self._staged.add(key)
            return key

    def admit(self, key: ExpertKey) -> None:
        """Let every request run on a staged version (it passed its smoke test)."""
        with self._lock:
            if key not in self._staged:
                state = "draining" if key in self._draining else (
                    "already admitted" if key in self._store.resident() else "not resident")
                raise ExpertNotFound(f"expert {key} is not staged here ({state}); push it with staged=True first")
            self._staged.discard(key)

    def retirable(self, name: str, version: int | None = None) -> list[ExpertKey]:
        """The resident, not yet draining versions a pop of `name` (or `name@version`) takes."""
        with self._lock:
            keys = ([self._store.get(ExpertKey(name, version)).key] if version is not None
                    else self._store.versions_of(name))
            keys = [k for k in keys if k not in self._draining]
            if not keys:
                raise ExpertNotFound(f"no resident, non-draining version of expert {name!r}")
            return keys

    def drain(self, keys: list[ExpertKey]) -> list[ExpertKey]:
        """Refuse new pins of `keys`; free each now if no request holds it, else when the last
        one releases it. Returns the keys this call started draining (resident, not already
        draining), e.g. [ExpertKey("sql", 1)]."""
        with self._lock:
            keys = [k for k in keys if k not in self._draining and k in self._store.resident()]
            for key in keys:
                self._draining.add(key)
                self._unloaded[key] = threading.Event()
                self._free_if_unused(key)
            return keys

    def wait_for_unload(self, keys: list[ExpertKey], timeout: float | None = None) -> bool:
        """Block until every draining version of `keys` is freed; False if `timeout` seconds
        (for each key) pass first. Keys that are not draining count as freed."""
        with self._lock:
            events = [self._unloaded[k] for k in keys if k in self._unloaded]
        return all(event.wait(timeout) for event in events)

    # ---- requests ----------------------------------------------------------------------

    def acquire(self, selector: str | ExpertKey | None, *, allow_staged: bool = False) -> ExpertKey | None:
        """Resolve a request's expert to one version and count the request on it.

        None (the bare backbone) stays None. "math" is the newest admitted version, "math@2"
        or ExpertKey("math", 2) exactly that one; staged versions only with `allow_staged`,
        draining ones never. The caller must `release` what this returns when the request ends.
        """
        if selector is None:
            return None
        with self._lock:
            key = self._resolve(selector, allow_staged)
            self._refs[key] += 1
            return key

    def release(self, key: ExpertKey | None) -> None:
        """A request pinned to `key` ended; the last one out of a draining version frees it."""
        if key is None:
            return
        with self._lock:
            if self._refs[key] <= 0:
                raise RuntimeError(f"expert {key} released more often than acquired")
            self._refs[key] -= 1
            self._free_if_unused(key)

    # ---- views -------------------------------------------------------------------------

    def in_use(self, key: ExpertKey) -> int:
        """Requests holding `key` now."""
        with self._lock:
            return self._refs[key]

    def staged(self) -> list[ExpertKey]:
        with self._lock:
            return sorted(self._staged)

    def draining(self) -> list[ExpertKey]:
        with self._lock:
            return sorted(self._draining)

    # ---- under the lock ----------------------------------------------------------------

    def _resolve(self, selector: str | ExpertKey, allow_staged: bool) -> ExpertKey:
        name, version = ((selector.name, selector.version) if isinstance(selector, ExpertKey)
                         else ExpertKey.parse(selector))
        closed = self._draining | self._staged  # resident, but not for a request that did not ask for staged
        live = [k for k in self._store.versions_of(name) if k not in closed]
        key = None if version is None else ExpertKey(name, version)
        if key is None:
            if live:
                return live[-1]
        elif key in live:
            return key
        elif key in self._draining:
            raise ExpertNotFound(f"expert {key} is being removed (draining); "
                                    f"live versions: {[k.version for k in live] or 'none'}")
        elif key in self._staged:
            if allow_staged:
                return key
            raise ExpertNotReady(f"expert {key} is still being smoke-tested here (staged); retry in a "
                                 f"few seconds; live versions: {[k.version for k in live] or 'none'}")
        resident = sorted({str(k) for k in self._store.resident() if k not in closed})
        raise ExpertNotFound(f"expert {selector!s} is not served here; resident experts: {resident or 'none'}")

    def _free_if_unused(self, key: ExpertKey) -> None:
        if key in self._draining and self._refs[key] == 0:
            self._store.pop(key.name, key.version)
            self._draining.discard(key)
            self._staged.discard(key)
            del self._refs[key]
            self._unloaded.pop(key).set()
            log.info("expert %s drained and freed", key)

