"""A replica's side of the registry: follow the desired state, load and smoke-test what it
names, free what it no longer names, and report.

The watch stream sends the full desired state first, so a replica that starts late or
reconnects converges from it (not from events it missed). Loading reads and validates the
artifact on a worker thread (`model.load`: manifest, checksum, fingerprint, shapes, budget);
the step loop only sees the finished expert appear. A freshly pushed version is then
smoke-tested through the real engine, pinned by version, before it is reported as loaded:
the registry moves traffic to a version only once every replica reports it. A version that
stops being wanted is popped (drained) after `retire_grace_s`, which lets routers that still
resolve to it catch up.

Fail static (fail_static.py): a desired state that goes backwards (an older revision, an empty
store, a re-initialised one missing experts held here) is not followed into freeing anything.
The replica keeps every version it holds, still loads what it is told to load, and frees nothing
until a consistent state arrives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from ccoe_common.engine.engine import Engine
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.config import RegistryConfig
from ccoe_common.registry.fail_static import FailStatic, View
from ccoe_common.telemetry import tracing
from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
Watch = Callable[[str], AsyncGenerator[pb.DesiredState, None]]
Report = Callable[[pb.ReplicaState], Awaitable[object]]
_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)


class SmokeTestFailed(RuntimeError):
    pass


class ReplicaFollower:
    def __init__(self, engine: Engine, replica_id: str, watch: Watch, report: Report, config: RegistryConfig,
                 metrics: Metrics | None = None, loader: Callable[[str], LoadedExpert] | None = None):
        """loader: uri -> a checked, not yet resident expert (default `engine.load`)."""
        self.engine = engine
        self._loader = loader or engine.load
        self.replica_id = replica_id
        self._watch = watch
        self._report = report
        self.config = config
        self.metrics = metrics
        self.failures: dict[ExpertKey, str] = {}
        self.seen_revision = 0
        self._unwanted_since: dict[ExpertKey, float] = {}
        self._want: dict[ExpertKey, str] = {}
        self._stop = asyncio.Event()
        self.fail_static = FailStatic("replica", metrics)

    # ---- state ---------------------------------------------------------------------------

    def held(self) -> set[ExpertKey]:
        """Resident versions that passed their smoke test and take new requests. Staged ones
        (still under test) are left out, or the registry would count this replica ready for a
        version that may yet fail; draining ones are on their way out."""
        stats = self.engine.stats()
        gone = set(stats.draining) | set(stats.staged)
        return {k for k in self.engine.model.resident() if str(k) not in gone}

    def state(self) -> pb.ReplicaState:
        s = self.engine.stats()
        mem = self.engine.model.memory_report()
        return pb.ReplicaState(
            replica_id=self.replica_id, healthy=self.engine.alive, seen_revision=self.seen_revision,
            running=s.running, memory_bytes=mem.backbone_bytes + sum(mem.experts.values()),
            loaded=[pb.LoadedVersion(name=k.name, version=k.version) for k in sorted(self.held())],
            failures=[pb.LoadFailure(name=k.name, version=k.version, reason=r)
                      for k, r in sorted(self.failures.items())])

    async def report(self) -> None:
        await self._report(self.state())

    # ---- applying the desired state -------------------------------------------------------

    async def apply(self, msg: pb.DesiredState) -> None:
        want = {ExpertKey(d.name, d.version): d.uri for d in msg.load}
        traces = {ExpertKey(d.name, d.version): d.traceparent for d in msg.load if d.traceparent}
        consistent = self.fail_static.admit(View.of(msg.epoch, msg.revision, msg.serving))
        # Holding: what it held stays wanted (nothing is freed), what is asked for is loaded.
        self._want = want if consistent else {**self._want, **want}
        # A failure is remembered while the version is wanted (no retry loop on a bad
        # artifact); once it is no longer wanted, a later rollout of it gets a fresh try.
        self.failures = {k: r for k, r in self.failures.items() if k in self._want}
        for key, uri in sorted(want.items()):
            if key in self.held() or str(key) in self.engine.stats().staged or key in self.failures:
                continue  # held or under test already; a failed version is not retried
            parent = tracing.extract({"traceparent": traces[key]}) if key in traces else None
            with tracing.span("replica.load_expert", parent, expert=str(key), uri=uri,
                              replica_id=self.replica_id) as span:
                started = time.monotonic()
                try:
                    await self.load(key, uri)
                except Exception as e:  # noqa: BLE001 - any failure is reported, never fatal
                    self.failures[key] = f"{type(e).__name__}: {e}"
                    span.set_attribute("error", self.failures[key])
                    log.warning("could not load %s from %s: %s", key, uri, e)
                if self.metrics is not None:
                    self.metrics.expert_loaded(str(key), key not in self.failures, time.monotonic() - started)
        if consistent:
            self.seen_revision = msg.revision
        self._retire_unwanted()
        await self.report()

    def _retire_unwanted(self) -> None:
        if self.fail_static.holding:
            return
        now = time.monotonic()
        for key in self.held():
            if key in self._want:
                self._unwanted_since.pop(key, None)
                continue
            since = self._unwanted_since.setdefault(key, now)
            if now - since >= self.config.retire_grace_s:
                try:
                    self.engine.pop(key.name, key.version)  # drains: accepted requests finish
                    log.info("retired %s", key)
                except Exception as e:  # noqa: BLE001 - already going; nothing to free
                    log.warning("pop of %s: %s", key, e)
                self._unwanted_since.pop(key, None)

    async def load(self, key: ExpertKey, uri: str) -> None:
        started = time.monotonic()
        expert = await asyncio.to_thread(self._loader, uri)
        if expert.key != key:
            raise ValueError(f"artifact {uri} holds {expert.key}, the registry expected {key}")
        # Staged: only the smoke test runs on it until it passes, whoever asks for it by name.
        self.engine.push(expert, staged=True)
        try:
            await self.smoke_test(key)
        except Exception:
            self.engine.pop(key.name, key.version)
            raise
        self.engine.admit(key)
        log.info("loaded %s in %.2fs", key, time.monotonic() - started)

    async def smoke_test(self, key: ExpertKey) -> None:
        request = GenerationRequest(
            prompt=self.config.smoke_prompt, expert=key, request_id=f"smoke-{key}-{time.monotonic_ns()}",
            sampling=SamplingParams.create(max_new_tokens=self.config.smoke_tokens, ignore_eos=True, logprobs=True),
            timeout_s=30.0, allow_staged=True)
        result = await self.engine.complete(request)
        if len(result.token_ids) != self.config.smoke_tokens:
            raise SmokeTestFailed(f"smoke test of {key} produced {len(result.token_ids)} tokens, "
                                  f"expected {self.config.smoke_tokens}")
        if not all(math.isfinite(lp) for lp in result.logprobs or []):
            raise SmokeTestFailed(f"smoke test of {key} produced non-finite log-probabilities "
                                  "(the weights hold NaN or inf)")

    # ---- loops ---------------------------------------------------------------------------

    async def sync_once(self, timeout_s: float) -> None:
        """Apply the first (full) desired state; used before a replica takes traffic."""
        stream = self._watch(self.replica_id)
        try:
            msg = await asyncio.wait_for(anext(stream), timeout_s)
        finally:
            await stream.aclose()
        await self.apply(msg)

    async def run(self) -> None:
        """Follow the desired state for the life of the replica, reconnecting after failures."""
        failures = 0
        while not self._stop.is_set():
            stream = self._watch(self.replica_id)
            try:
                async for msg in stream:
                    failures = 0
                    await self.apply(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry or Redis is away: retry
                log.warning("desired-state stream broke (%s); reconnecting", e)
            finally:
                await stream.aclose()
            await asyncio.sleep(_BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)])
            failures += 1

    async def heartbeat(self) -> None:
        """Report on a timer, and retire versions whose grace ran out between messages."""
        while not self._stop.is_set():
            await asyncio.sleep(self.config.report_interval_s)
            try:
                self._retire_unwanted()
                await self.report()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry may be restarting
                log.debug("report failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
