"""The registry's logic behind its gRPC API, independent of Ray: requests in, messages out.

Redis (RegistryStore) is the only state; this object holds none that matters, so a registry
process can die and restart at any time. Checks happen before anything is written: an
artifact is copied into the artifact store (sha256 checked), then validated against the
backbone by a replica that loads it *without* adding it to its live set (`validate`), and only
then registered. A rollout is then driven by `tick()` (rollout.py decides, the store applies
with compare-and-set) until every live replica holds the version and the serving version flips.

Every request is checked before anything is read or written (invariants 6 and 9): names,
lengths, the source and export locations (sources.py), the rule table's size and shape. An
outside location is refused on its text alone, so the answer never says whether it exists.

    service = RegistryService(store, artifacts, validate, config.registry)
    await service.push(pb.PushExpertRequest(uri="file:///exports/math/v2"))
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis

from ccoe_common.errors import ExpertNotFound, quote
from ccoe_common.experts.artifact import read_manifest
from ccoe_common.experts.errors import ExpertError
from ccoe_common.experts.reference import NAME_RE
from ccoe_common.pb import inference_pb2 as ipb
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.pb.lenient import Undecodable
from ccoe_common.registry import rollout as ro
from ccoe_common.registry.artifact_store import ArtifactConflict, ArtifactStore, StoredArtifact
from ccoe_common.registry.config import DEFAULT_UPLOAD_IDLE_TIMEOUT_S, RegistryConfig
from ccoe_common.registry.errors import (
    ArtifactRefused,
    BadRequest,
    ExportFailed,
    NothingToRollBack,
    RegistryError,
    RevisionConflict,
    RolloutInProgress,
    StoreUnavailable,
    UploadAbandoned,
)
from ccoe_common.registry.sources import LocationPolicy
from ccoe_common.registry.store import DesiredState, RegistryStore
from ccoe_common.routing.rules import RuleTable, RuleTableError, load_table_text
from ccoe_common.telemetry import tracing
from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Validator = Callable[[str], Awaitable[None]]  # raises ArtifactRefused naming the problem
_STRATEGIES = {pb.ROLLOUT_STRATEGY_UNSPECIFIED: "all_at_once", pb.ALL_AT_ONCE: "all_at_once", pb.CANARY: "canary"}
_STRATEGY_PB = {"all_at_once": pb.ALL_AT_ONCE, "canary": pb.CANARY}
_CAS_RETRIES = 5  # internal retries when the caller did not pin a revision
_REDIS_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # between reads of an unreachable Redis


def policy_from_pb(p: pb.RolloutPolicy) -> ro.RolloutPolicy:
    try:
        return ro.RolloutPolicy(strategy=_STRATEGIES.get(p.strategy, "?"), canary_replicas=p.canary_replicas or 1,
                                max_unavailable=p.max_unavailable or 1, canary_wait_s=p.canary_wait_ms / 1000)
    except ValueError as e:
        raise BadRequest(f"rollout policy: {e}") from e


def rollout_to_pb(r: dict[str, Any] | None, live: dict[str, ro.ReplicaView]) -> pb.Rollout:
    if r is None:
        return pb.Rollout()
    p = r["policy"]
    return pb.Rollout(
        id=r["id"], expert=r["expert"], from_version=r["from_version"], to_version=r["to_version"],
        policy=pb.RolloutPolicy(strategy=_STRATEGY_PB[p["strategy"]], canary_replicas=p["canary_replicas"],
                                max_unavailable=p["max_unavailable"], canary_wait_ms=int(p["canary_wait_s"] * 1000)),
        state=r["state"], reason=r["reason"], started_at=r["started_at"], finished_at=r["finished_at"] or 0.0,
        replicas=[pb.ReplicaRolloutStatus(replica_id=rid, state=st, detail=d)
                  for rid, st, d in ro.replica_statuses(r, live)])


async def receive_upload(artifacts: ArtifactStore, chunks: AsyncIterator[pb.ArtifactChunk], *,
                         idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S) -> pb.UploadArtifactResponse:
    """Land an artifact streamed in chunks in the artifact store (checked there, sha256
    included); nothing is registered. The store's limits apply while it streams; a chunk that
    did not decode, a client silent for `idle_timeout_s` or one that cancelled ends the upload.
    Any failure removes what was staged."""
    upload = None
    stream = aiter(chunks)
    try:
        for index in itertools.count():
            try:
                chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError as e:
                raise UploadAbandoned(f"upload: no chunk for {idle_timeout_s:g} s (registry.upload_idle_timeout_s); "
                                      "what was sent is removed, start again") from e
            if isinstance(chunk, Undecodable):
                raise BadRequest(f"chunk {index}: {chunk.reason}")
            if upload is None:
                if not chunk.expert or chunk.version < 1:
                    raise BadRequest("the first chunk must name the expert and its version (>= 1)")
                try:
                    upload = await asyncio.to_thread(artifacts.begin_upload, chunk.expert, chunk.version)
                except ValueError as e:
                    raise BadRequest(str(e)) from e
            try:
                await asyncio.to_thread(upload.write, chunk.file, chunk.data)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        # Ray's proxy ends the stream it hands the router when the client cancels, as if the
        # upload were complete; what it sent is removed rather than checked.
        cancelled = getattr(chunks, "is_cancelled", None)
        if callable(cancelled) and cancelled():
            raise UploadAbandoned("upload: the client cancelled; what it sent is removed", code="CANCELLED")
        if upload is None:
            raise BadRequest("the upload sent no chunks")
        try:
            stored = await asyncio.to_thread(upload.finish)
        except (ExpertError, ArtifactConflict) as e:
            raise ArtifactRefused(str(e)) from e
    except BaseException:
        if upload is not None:
            upload.abort()
        raise
    return pb.UploadArtifactResponse(uri=stored.uri, bytes=stored.bytes, weights_sha256=stored.weights_sha256)


class RegistryService:
    def __init__(self, store: RegistryStore, artifacts: ArtifactStore, validate: Validator, config: RegistryConfig,
                 metrics: Metrics | None = None):
        self.store = store
        self.metrics = metrics
        self.artifacts = artifacts
        self.validate = validate
        self.config = config
        self.locations = LocationPolicy(artifacts.root, config.allowed_sources, config.allowed_export_prefixes)
        self._snapshot: DesiredState | None = None
        self._changed = asyncio.Condition()
        self._poke = asyncio.Event()  # set after our own writes: re-read at once, not at the next poll
        # Wakes the rollout controller: a replica reported, or the desired state changed. Without
        # it the controller would find a replica's "loaded" report only at its next interval.
        self._work = asyncio.Event()
        self._config_uris: tuple[str, ...] = ()  # the config's experts, re-registered into an empty store

    # ---- plumbing --------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call off the event loop; an unreachable Redis is UNAVAILABLE."""
        try:
            return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"the registry's Redis is unreachable ({e}); nothing was changed, retry") from e

    async def _live(self) -> dict[str, ro.ReplicaView]:
        reports = await self._io(self.store.replicas)
        return {rid: ro.ReplicaView.from_report(rep) for rid, rep in reports.items() if rep.get("healthy", True)}

    async def _with_cas(self, expected: int | None, name: str, attempt: Callable[[int], T]) -> T:
        """Run `attempt(rev)`: with the caller's revision once; without one, re-read and retry a
        few times, since the controller moving a rollout also bumps the revision."""
        if expected is not None:
            result = await self._io(attempt, expected)
            self._poke.set()
            return result
        for i in range(_CAS_RETRIES):
            rev = await self._io(self.store.expert_rev, name)
            try:
                result = await self._io(attempt, rev)
                self._poke.set()
                return result
            except RevisionConflict:
                if i == _CAS_RETRIES - 1:
                    raise
                await asyncio.sleep(0.01 * (i + 1))
        raise AssertionError("unreachable")

    # ---- request checks (before anything is read or written) --------------------------------

    @staticmethod
    def _name(field: str, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise BadRequest(f"{field}: {quote(value)} is not an expert name (lowercase letters, digits, '_', '.', "
                             "'-'; at most 63 characters)")
        return value

    def _text(self, field: str, value: str) -> str:
        if len(value) > self.config.max_text_chars:
            raise BadRequest(f"{field}: {quote(value)} is longer than registry.max_text_chars "
                             f"({self.config.max_text_chars} characters)")
        return value

    def _uri(self, field: str, value: str) -> str:
        if len(value) > self.config.max_uri_chars:
            raise BadRequest(f"{field}: {quote(value)} is longer than registry.max_uri_chars "
                             f"({self.config.max_uri_chars} characters)")
        return value

    # ---- experts ---------------------------------------------------------------------------

    async def push(self, req: pb.PushExpertRequest) -> pb.PushExpertResponse:
        self._uri("uri", req.uri)
        self._text("who", req.who)
        # One trace per rollout: this span's context travels in the rollout record to every
        # replica, whose load and smoke test become its children.
        with tracing.span("registry.push", uri=req.uri, who=req.who or "unknown") as span:
            response = await self._push(req)
            span.set_attribute("expert", f"{response.expert.name}@{response.expert.version}")
            return response

    async def _push(self, req: pb.PushExpertRequest) -> pb.PushExpertResponse:
        if not req.uri:
            raise BadRequest("uri: give the artifact folder to push (an fsspec URI with manifest.json "
                             "and weights.safetensors)")
        policy = policy_from_pb(req.rollout)
        # Decided on the URI's text before anything reads it (no fetch of a URL it names, no
        # answer that depends on whether a path exists); the normalised form is what is read.
        source = self.locations.source(req.uri)
        # A replica validates the source (loads it without serving it) while this process copies it
        # into the store (sha256 checked as it streams): the same bytes read by two processes at
        # once, so a push costs the slower of the two, not their sum. The copy of an artifact that
        # is refused, or cannot be validated now, is removed before the answer goes out.
        copying = asyncio.ensure_future(self._store_copy(source))
        try:
            await self.validate(source)
        except BaseException as e:
            await self._undo_copy(source, copying, refused=isinstance(e, (ArtifactRefused, ExpertError)))
            raise
        stored = await copying
        name, version = stored.name, stored.version
        expected = req.expected_revision if req.HasField("expected_revision") else None
        who = req.who or "unknown"

        def attempt(rev: int) -> tuple[int, dict[str, Any] | None]:
            current = self.store.rollout(name)
            if ro.is_active(current):
                raise RolloutInProgress(f"expert {name!r} is rolling out version {current['to_version']} "
                                        f"(rollout {current['id']}); wait for it or roll it back first")
            if req.register_only:
                return self.store.push_version(name, version, stored.manifest.model_dump(mode="json"), stored.uri,
                                               expected_rev=rev, who=who, make_desired=False), None
            serving = self.store.desired_state().experts.get(name, 0)
            record = ro.new_rollout(name, serving, version, policy, trace=tracing.inject())
            return self.store.push_version(name, version, stored.manifest.model_dump(mode="json"), stored.uri,
                                           expected_rev=rev, who=who, make_desired=False, rollout=record), record

        rev, record = await self._with_cas(expected, name, attempt)
        log.info("registered %s@%d (revision %d) from %s", name, version, rev, source)
        return pb.PushExpertResponse(expert=ipb.ExpertRef(name=name, version=version), revision=rev,
                                     stored_uri=stored.uri, rollout=rollout_to_pb(record, await self._live()))

    async def _undo_copy(self, source: str, copying: asyncio.Future[StoredArtifact], *, refused: bool) -> None:
        """After validation failed: an upload (a source inside the store) is removed only if it was
        refused (an UNAVAILABLE push of it can be retried); a copy this push made is removed in any
        case, unless it is registered or another push has since replaced it with other weights."""
        try:
            copied = await copying
        except Exception:  # noqa: BLE001 - the validation's error is the answer
            copied = None
        if self.artifacts.stored_key(source) is not None:
            if refused:
                await self._discard_unregistered(source)
            return
        if copied is not None:
            await self._discard_unregistered(copied.uri, copied.weights_sha256)

    async def _discard_unregistered(self, source: str, weights_sha256: str | None = None) -> None:
        """An uploaded artifact whose push was refused leaves the store (a 48 MiB junk upload
        used to stay there); a registered version is never removed."""
        key = self.artifacts.stored_key(source)
        if key is None:
            return
        try:
            await self._io(self.store.version, *key)
        except ExpertNotFound:
            if weights_sha256 is not None:
                try:
                    if (await asyncio.to_thread(read_manifest, source)).weights_sha256 != weights_sha256:
                        return  # another push's copy took its place meanwhile
                except ExpertError:
                    pass
            if await asyncio.to_thread(self.artifacts.discard, *key):
                log.info("removed %s@%d from the artifact store: its push was refused", *key)

    async def _store_copy(self, uri: str) -> StoredArtifact:
        """Copy into the artifact store (sha256 checked). A different copy of the same
        name@version left by a push that was never registered is replaced; a registered one never is."""
        try:
            try:
                return await asyncio.to_thread(self.artifacts.put, uri)
            except ArtifactConflict:
                manifest = await asyncio.to_thread(read_manifest, uri)
                try:
                    await self._io(self.store.version, manifest.name, manifest.version)
                    raise
                except ExpertNotFound:
                    await asyncio.to_thread(self.artifacts.discard, manifest.name, manifest.version)
                return await asyncio.to_thread(self.artifacts.put, uri)
        except (ExpertError, ArtifactConflict) as e:
            raise ArtifactRefused(str(e)) from e
        except (OSError, ValueError, ImportError) as e:  # unreadable source, a filesystem fsspec lacks
            raise ArtifactRefused(f"uri: cannot copy {quote(uri)} into the artifact store: {e}") from e

    async def pop(self, req: pb.PopExpertRequest) -> pb.PopExpertResponse:
        self._name("name", req.name)
        self._text("who", req.who)
        if req.wait_ms > self.config.max_wait_ms:
            raise BadRequest(f"wait_ms: {req.wait_ms} is over registry.max_wait_ms ({self.config.max_wait_ms}); "
                             "pop without waiting and follow `ccoe expert show` instead")
        dest = self.locations.export_destination(self._uri("export_to", req.export_to)) if req.export_to else ""
        record = await self._io(self.store.expert, req.name)
        live_versions = [v.version for v in record.versions if v.state != "retired"]
        versions = [req.version] if req.version else live_versions
        if req.version and req.version not in [v.version for v in record.versions]:
            raise ExpertNotFound(f"expert {req.name!r} has no version {req.version}; "
                                 f"registered: {[v.version for v in record.versions]}")
        if not versions:
            raise ExpertNotFound(f"expert {req.name!r} has no version left to pop (all are retired)")
        exported = ""
        if dest:
            source = next(v for v in reversed(record.versions) if v.version == max(versions))
            exported = (await self._export(source.uri, dest)).uri

        def attempt(rev: int) -> int:
            current = self.store.rollout(req.name)
            ended = None
            if ro.is_active(current) and int(current["to_version"]) in versions:
                ended = ro.abort(current, f"version {current['to_version']} was popped", time.time())
            return self.store.retire(req.name, versions, expected_rev=rev, who=req.who or "unknown", rollout=ended)

        expected = req.expected_revision if req.HasField("expected_revision") else None
        rev = await self._with_cas(expected, req.name, attempt)
        drained = False
        if req.wait_ms:
            drained = await self._wait_until_gone(req.name, set(versions), req.wait_ms / 1000)
        return pb.PopExpertResponse(retired=[ipb.ExpertRef(name=req.name, version=v) for v in versions],
                                    revision=rev, exported_to=exported, drained=drained)

    async def _export(self, src: str, dest: str) -> StoredArtifact:
        """A deep copy out of the store before the pop; a failure retires nothing."""
        try:
            return await asyncio.to_thread(self.artifacts.export, src, dest)
        except ArtifactConflict:
            raise
        except ExpertError as e:
            raise ArtifactRefused(f"export_to: the stored copy could not be exported: {e}") from e
        except (OSError, ValueError, ImportError) as e:
            raise ExportFailed(f"export_to: cannot write {quote(dest)}: {getattr(e, 'strerror', None) or e}; "
                               "nothing was retired, choose another destination") from e

    async def _wait_until_gone(self, name: str, versions: set[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = await self._live()
            if not any((name, v) in view.loaded for view in live.values() for v in versions):
                return True
            await asyncio.sleep(0.1)
        return False

    async def get(self, name: str) -> pb.ExpertInfo:
        self._name("name", name)
        record = await self._io(self.store.expert, name)
        rollout = await self._io(self.store.rollout, name)
        return self._info(record, rollout, await self._live())

    async def list(self) -> pb.ListExpertsResponse:
        state = await self._io(self.store.desired_state)
        live = await self._live()
        infos = []
        for name in await self._io(self.store.names):
            try:
                record = await self._io(self.store.expert, name)
            except ExpertNotFound:  # removed between the two reads
                continue
            infos.append(self._info(record, state.rollouts.get(name), live))
        return pb.ListExpertsResponse(revision=state.rev, experts=infos)

    @staticmethod
    def _info(record, rollout: dict[str, Any] | None, live: dict[str, ro.ReplicaView]) -> pb.ExpertInfo:
        return pb.ExpertInfo(
            name=record.name, revision=record.rev, latest=record.latest, serving=record.desired or 0,
            rollout=rollout_to_pb(rollout, live),
            versions=[pb.VersionInfo(version=v.version, uri=v.uri, state=v.state,
                                     manifest_json=json.dumps(v.manifest, sort_keys=True),
                                     registered_revision=v.registered_rev,
                                     loaded_on=sorted(rid for rid, view in live.items()
                                                      if (record.name, v.version) in view.loaded))
                      for v in record.versions])

    # ---- rules -----------------------------------------------------------------------------

    async def get_rules(self) -> pb.RulesResponse:
        rev, table = await self._io(self.store.rules)
        return pb.RulesResponse(revision=rev, table_json="" if table is None else json.dumps(table, sort_keys=True))

    async def set_rules(self, req: pb.SetRulesRequest) -> pb.RulesResponse:
        self._text("who", req.who)
        limit = self.config.max_table_bytes
        # Characters first: no encoding of a text already too long by its length alone.
        if len(req.table) > limit or len(req.table.encode("utf-8", "surrogatepass")) > limit:
            raise BadRequest(f"table: is over registry.max_table_bytes ({limit} bytes of UTF-8); split the table's "
                             "rules or raise the limit")
        limits = self.config.rule_limits
        try:
            table = load_table_text(req.table, limits.max_depth)
        except RuleTableError as e:
            raise BadRequest(f"table: {e}") from e
        if not isinstance(table, dict):
            raise BadRequest(f"table: expected a mapping with a `rules` list, got {type(table).__name__}")
        known = set(await self._io(self.store.names))
        try:
            RuleTable.from_dict(table, known, limits)
        except RuleTableError as e:
            raise BadRequest(str(e)) from e
        expected = req.expected_revision if req.HasField("expected_revision") else None
        if expected is None:
            expected, _ = await self._io(self.store.rules)
        rev = await self._io(self.store.set_rules, table, expected_rev=expected, who=req.who or "unknown")
        self._poke.set()
        return pb.RulesResponse(revision=rev, table_json=json.dumps(table, sort_keys=True))

    # ---- rollouts --------------------------------------------------------------------------

    async def start_rollout(self, req: pb.StartRolloutRequest) -> pb.Rollout:
        self._name("expert", req.expert)
        self._text("who", req.who)
        policy = policy_from_pb(req.policy)
        version = await self._io(self.store.version, req.expert, req.version)
        if version.state == "retired":
            raise BadRequest(f"{req.expert}@{req.version} is retired; push it again as a new version")

        def attempt(rev: int) -> dict[str, Any]:
            current = self.store.rollout(req.expert)
            if ro.is_active(current):
                raise RolloutInProgress(f"expert {req.expert!r} is already rolling out version "
                                        f"{current['to_version']} (rollout {current['id']})")
            serving = self.store.desired_state().experts.get(req.expert, 0)
            if serving == req.version:
                raise BadRequest(f"{req.expert}@{req.version} is already the serving version")
            record = ro.new_rollout(req.expert, serving, req.version, policy, trace=tracing.inject())
            self.store.update_expert(req.expert, expected_rev=rev, who=req.who or "unknown", what="rollout_start",
                                     detail={"to_version": req.version, "from_version": serving},
                                     rollout=record, version_states={req.version: "active"})
            return record

        expected = req.expected_revision if req.HasField("expected_revision") else None
        record = await self._with_cas(expected, req.expert, attempt)
        return rollout_to_pb(record, await self._live())

    async def get_rollout(self, expert: str) -> pb.Rollout:
        self._name("expert", expert)
        record = await self._io(self.store.rollout, expert)
        if record is None:
            await self._io(self.store.expert, expert)  # NOT_FOUND naming an unknown expert
            raise ExpertNotFound(f"expert {expert!r} is registered but has had no rollout yet")
        return rollout_to_pb(record, await self._live())

    async def rollback(self, req: pb.RollbackRequest) -> pb.Rollout:
        """Abort a rollout in progress; or roll the last finished one back to its from_version."""
        self._name("expert", req.expert)
        self._text("who", req.who)
        self._text("reason", req.reason)
        who = req.who or "unknown"
        reason = req.reason or f"manual rollback by {who}"

        def attempt(rev: int) -> dict[str, Any]:
            current = self.store.rollout(req.expert)
            if current is None:
                self.store.expert(req.expert)
                raise NothingToRollBack(f"expert {req.expert!r} has had no rollout to roll back")
            now = time.time()
            if ro.is_active(current):
                record = ro.abort(current, reason, now)
                self.store.update_expert(req.expert, expected_rev=rev, who=who, what="rollout_rolled_back",
                                         detail={"version": current["to_version"], "reason": reason}, rollout=record,
                                         version_states={int(current["to_version"]): "rolled_back"})
                return record
            back_to = int(current["from_version"])
            if current["state"] != "done" or back_to == 0:
                raise NothingToRollBack(f"expert {req.expert!r}: the last rollout ({current['state']}) left no "
                                        "earlier version to go back to; pop the expert instead")
            if self.store.version(req.expert, back_to).state == "retired":
                raise NothingToRollBack(f"{req.expert}@{back_to} was retired; push it again as a new version")
            record = ro.new_rollout(req.expert, int(current["to_version"]), back_to,
                                    ro.RolloutPolicy(**current["policy"]), now)
            self.store.update_expert(req.expert, expected_rev=rev, who=who, what="rollback",
                                     detail={"from_version": current["to_version"], "to_version": back_to,
                                             "reason": reason},
                                     rollout=record, version_states={int(current["to_version"]): "rolled_back",
                                                                     back_to: "active"})
            return record

        record = await self._with_cas(None, req.expert, attempt)
        return rollout_to_pb(record, await self._live())

    async def wait_for_work(self, timeout_s: float) -> None:
        """Until a replica reports or the desired state changes, at most `timeout_s`: the
        controller's pause between ticks."""
        try:
            await asyncio.wait_for(self._work.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._work.clear()

    async def tick(self) -> int:
        """Advance every active rollout one step; returns how many changed. Which rollouts are
        active comes from the followed snapshot (no extra read per tick); each one is re-read
        under its revision before it is advanced."""
        state = self._snapshot or await self._io(self.store.desired_state)
        if state is None:
            return 0
        active = [name for name, r in state.rollouts.items() if ro.is_active(r)]
        if not active:
            return 0
        live = await self._live()
        changed = 0
        for name in active:
            rev = await self._io(self.store.expert_rev, name)
            current = await self._io(self.store.rollout, name)  # read after the revision: CAS covers it
            step = ro.advance(current, live, time.time()) if current else None
            if step is None:
                continue
            r = step.rollout
            detail = {"rollout": r["id"], "to_version": r["to_version"], "state": r["state"],
                      "assigned": r["assigned"]}
            if r["reason"]:
                detail["reason"] = r["reason"]
            try:
                await self._io(self.store.update_expert, name, expected_rev=rev, who="registry", what=step.what,
                               detail=detail, rollout=r, serving=step.serving,
                               version_states=({step.failed_version: "failed"} if step.failed_version else None))
                changed += 1
                self._poke.set()
                if step.what in ("rollout_done", "rollout_rolled_back"):
                    if self.metrics is not None:
                        self.metrics.rollout_finished(name, r["state"], r["finished_at"] - r["started_at"])
                    log.info("rollout %s of %s@%s: %s %s", r["id"], name, r["to_version"], r["state"], r["reason"])
            except RevisionConflict:
                pass  # someone else changed the expert meanwhile: next tick re-reads
        return changed

    # ---- replicas --------------------------------------------------------------------------

    async def report(self, state: pb.ReplicaState) -> pb.ReportReplicaStateResponse:
        if not state.replica_id:
            raise BadRequest("replica_id: a report must name its replica")
        self._text("replica_id", state.replica_id)
        if len(state.loaded) + len(state.failures) > self.config.max_report_versions:
            raise BadRequest(f"loaded, failures: {len(state.loaded)} + {len(state.failures)} entries, over "
                             f"registry.max_report_versions ({self.config.max_report_versions})")
        for i, failure in enumerate(state.failures):
            self._text(f"failures[{i}].reason", failure.reason)
        body = {"loaded": [[v.name, v.version] for v in state.loaded],
                "failures": [{"name": f.name, "version": f.version, "reason": f.reason} for f in state.failures],
                "healthy": state.healthy, "memory_bytes": state.memory_bytes,
                "seen_revision": state.seen_revision, "running": state.running, "at": time.time()}
        await self._io(self.store.heartbeat, state.replica_id, body, self.config.heartbeat_ttl_s)
        self._work.set()
        snapshot = self._snapshot
        return pb.ReportReplicaStateResponse(revision=snapshot.rev if snapshot else 0)

    async def desired_for(self, replica_id: str, state: DesiredState) -> pb.DesiredState:
        msg = pb.DesiredState(revision=state.rev, serving=state.experts, rules_revision=state.rules_rev,
                              epoch=state.epoch,
                              rules_json="" if state.rules is None else json.dumps(state.rules, sort_keys=True))
        if replica_id:
            want = sorted(ro.versions_to_hold(state.experts, state.rollouts, replica_id))
            uris = await self._io(self.store.uris, want)
            msg.load.extend(pb.DesiredVersion(name=n, version=v, uri=uris[(n, v)],
                                              traceparent=ro.trace_of(state.rollouts, n, v).get("traceparent", ""))
                            for n, v in want if (n, v) in uris)
        return msg

    async def current(self, replica_id: str) -> pb.DesiredState:
        """The desired state read from Redis now, not the followed snapshot."""
        return await self.desired_for(replica_id, await self._io(self.store.desired_state))

    async def follow(self) -> None:
        """Keep `_snapshot` current and wake watchers on each change (runs for the process's life).
        Polling one counter is cheap, and unlike a subscription it survives a Redis restart.
        A store found without its epoch lost its data: its config experts are registered again
        (`recover_empty_store`). Redis unreachable: retried with backoff, serving goes on."""
        last: tuple[str, int] | None = None
        last_sync, failures = 0.0, 0
        while True:
            try:
                epoch, rev = await asyncio.to_thread(self.store.head)
                if not epoch:
                    await self.recover_empty_store()
                    epoch, rev = await asyncio.to_thread(self.store.head)
                if last is not None and epoch == last[0] and rev < last[1]:
                    log.error("the registry's revision went backwards: r%d after r%d (Redis restored from an older "
                              "copy?); routers and replicas hold what they serve until it is consistent", rev, last[1])
                now = time.monotonic()
                if (epoch, rev) != last or now - last_sync > self.config.resync_s:
                    self._snapshot = await asyncio.to_thread(self.store.desired_state)
                    last, last_sync = (epoch, rev), now
                    self._work.set()
                    async with self._changed:
                        self._changed.notify_all()
                if failures:
                    log.warning("registry Redis reachable again after %d failed reads", failures)
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError, StoreUnavailable) as e:
                delay = _REDIS_BACKOFF_S[min(failures, len(_REDIS_BACKOFF_S) - 1)]
                failures += 1
                log.warning("registry Redis unreachable (%s); retrying in %.1fs, serving goes on", e, delay)
                await asyncio.sleep(delay)
            except Exception:
                log.exception("reading the desired state failed")
                await asyncio.sleep(0.5)
            try:
                await asyncio.wait_for(self._poke.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()

    async def recover_empty_store(self) -> builtins.list[str]:
        """A store without an epoch gets one. If it also holds no expert, it lost its data (Redis
        restarted without its AOF, FLUSHALL): the config's experts are registered again, each
        through an all-at-once rollout, so serving flips only once every live replica holds it.
        Returns what was re-registered. Of several registries, only the one that wrote the epoch
        re-registers."""
        empty = not await self._io(self.store.names)
        written, epoch = await self._io(self.store.init_epoch, uuid.uuid4().hex[:12], "registry")
        if not written:
            return []
        if not empty:
            log.warning("the registry's store had no epoch; it is now %s", epoch)
            return []
        log.error("the registry's store is EMPTY (Redis lost its data?): new epoch %s; re-registering the config's "
                  "experts %s; routers and replicas keep serving what they hold meanwhile", epoch,
                  list(self._config_uris))
        if self.metrics is not None:
            self.metrics.registry_reinitialized()
        seeded = await self.seed(self._config_uris, via_rollout=True)
        self._poke.set()
        return seeded

    async def watch(self, replica_id: str) -> AsyncIterator[pb.DesiredState]:
        """The full desired state for this watcher at once, then again whenever it changes
        (and at least every resync_s, so a watcher never trusts a stale picture for long)."""
        self._text("replica_id", replica_id)
        if self._snapshot is None:
            self._snapshot = await self._io(self.store.desired_state)
        last, last_sent = None, 0.0
        while True:
            snapshot = self._snapshot
            msg = await self.desired_for(replica_id, snapshot)
            body = msg.SerializeToString(deterministic=True)
            if body != last or time.monotonic() - last_sent > self.config.resync_s:
                yield msg
                last, last_sent = body, time.monotonic()
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=self.config.resync_s)
                except asyncio.TimeoutError:
                    pass

    async def audit(self, limit: int) -> pb.ListAuditResponse:
        # A page size: larger asks are lowered to the limit, as list APIs usually do.
        entries = await self._io(self.store.audit, min(limit or 50, self.config.max_audit_entries))
        return pb.ListAuditResponse(entries=[
            pb.AuditEntry(id=e.id, at=e.at_ms / 1000, who=e.who, what=e.what, revision=e.rev,
                          detail_json=json.dumps(e.detail, sort_keys=True)) for e in entries])

    # ---- config experts ----------------------------------------------------------------------

    async def seed_when_reachable(self, uris: tuple[str, ...], timeout_s: float) -> builtins.list[str]:
        """`seed`, waiting for Redis with backoff (a registry may start before its Redis does)."""
        deadline = time.monotonic() + timeout_s
        for attempt in itertools.count():
            try:
                return await self.seed(uris)
            except StoreUnavailable as e:
                if time.monotonic() >= deadline:
                    raise
                delay = _REDIS_BACKOFF_S[min(attempt, len(_REDIS_BACKOFF_S) - 1)]
                log.warning("waiting for the registry's Redis (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def seed(self, uris: tuple[str, ...], *,
                   via_rollout: bool = False) -> builtins.list[str]:  # `list` here is the method below
        """Register the experts the app config names, serving at once (no replica runs yet), and
        give a fresh store its epoch. Versions already registered are left alone, so a restart
        changes nothing. `via_rollout`: each starts an all-at-once rollout instead (a fleet is
        running: serving must flip only once every replica holds the version)."""
        self._config_uris = tuple(uris)
        seeded = []
        for uri in uris:
            # The operator's own config: no allow-list and no quota (a full store must not keep
            # the registry from starting with the experts it already serves).
            stored = await asyncio.to_thread(functools.partial(self.artifacts.put, uri, enforce_quota=False))
            try:
                current = await self._io(self.store.expert, stored.name)
                if current.latest >= stored.version:
                    continue
                rev = current.rev
            except ExpertNotFound:
                rev = 0
            record = (ro.new_rollout(stored.name, 0, stored.version, ro.RolloutPolicy("all_at_once"))
                      if via_rollout else None)
            try:
                await self._io(self.store.push_version, stored.name, stored.version,
                               stored.manifest.model_dump(mode="json"), stored.uri, expected_rev=rev,
                               who="config", make_desired=not via_rollout, rollout=record)
                seeded.append(f"{stored.name}@{stored.version}")
            except RegistryError as e:  # another registry replica seeded it first
                log.info("not seeding %s@%d: %s", stored.name, stored.version, e)
        if not via_rollout:
            await self._io(self.store.init_epoch, uuid.uuid4().hex[:12], "registry")
        self._poke.set()
        return seeded
