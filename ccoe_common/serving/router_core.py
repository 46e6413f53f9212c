"""The Router's logic, independent of Ray: decide the route, run it on replicas, stream back.

A route names zero experts (bare backbone), one, or several (a rule that "consults several
experts at once"). Several experts run concurrently as separate engine requests; their
deltas are interleaved in the stream, each tagged with its expert, and the unary response
carries every answer in `fanout`.

The replicas are reached through a `ReplicaClient`: Ray DeploymentHandles in production
(services/router), an in-process engine in tests and tools (`LocalReplicaClient`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Protocol

from ccoe_common.engine.params import GenerationRequest, Timings
from ccoe_common.errors import CCoEError, ExpertNotFound
from ccoe_common.experts.artifact import read_manifest
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.registry.fail_static import FailStatic, View
from ccoe_common.routing.resolve import Route, decide
from ccoe_common.routing.rules import RuleTable, RuleTableError
from ccoe_common.serving.admission import Admission
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.events import DeltaEvent, ErrorEvent, Event, ServingError
from ccoe_common.serving.failover import ReplicaLost, Restart
from ccoe_common.serving.grpc_convert import parse_request, route_trace, usage
from ccoe_common.telemetry import tracing
from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class ReplicaClient(Protocol):
    def stream(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncGenerator[Event, None]: ...


class LocalReplicaClient:
    """Calls a ReplicaRuntime in this process (tests, benchmarks, tools)."""

    def __init__(self, runtime):
        self.runtime = runtime

    def stream(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncGenerator[Event, None]:
        return self.runtime.stream(request, carrier)


def initial_rules(config: AppConfig, known: set[str]) -> RuleTable:
    """The configured rule table, validated against the expert names the config loads."""
    if config.rules_inline is not None:
        return RuleTable.from_dict(config.rules_inline, known)
    if config.rules is not None:
        return RuleTable.from_file(config.rules, known)
    return RuleTable.from_dict({}, known)


class RouterCore:
    def __init__(self, config: AppConfig, client: ReplicaClient):
        self.config = config
        self.client = client
        self.known_experts = {read_manifest(uri).name for uri in config.experts}
        self.table = initial_rules(config, self.known_experts)
        self._rules_mtime = self._mtime()
        self._next_check = 0.0
        # expert -> the version the fleet serves, from the registry's desired state; None until
        # a registry view arrives (then bare names are resolved by the replica itself).
        self.serving: dict[str, int] | None = None
        self.registry_rules_rev = 0
        self._view_changed = asyncio.Event()
        # Fetches the registry's current view (set by the Router deployment): a name this
        # router does not know yet may have finished rolling out a moment ago.
        self.refresh_view: Callable[[], Awaitable[None]] | None = None
        tracing.setup_tracing(config.telemetry)
        self.metrics = Metrics()
        self.admission = Admission(config.admission_bound, config.router.retry_after_s)
        self.replicas_lost = 0  # requests whose replica died under them, since start
        self.retried = 0  # of those, run again on another replica
        self.last_loss_at: float | None = None  # wall-clock time of the latest loss
        self.fail_static = FailStatic("router", self.metrics)  # a registry view that went backwards is held back

    def stats(self) -> dict[str, float | int | None]:
        """Admission and failover counters of this router, e.g. {"in_flight": 3, "limit": 8, ...}."""
        a = self.admission
        return {"in_flight": a.in_flight, "limit": a.limit, "admitted": a.admitted, "refused": a.refused,
                "replicas_lost": self.replicas_lost, "retried": self.retried, "last_loss_at": self.last_loss_at}

    # ---- rules ---------------------------------------------------------------------------

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.config.rules).st_mtime if self.config.rules else None
        except OSError:
            return None

    def maybe_reload_rules(self) -> None:
        """Pick up an edited rules file without a restart; a broken edit keeps the old table."""
        now = time.monotonic()
        if self.config.rules is None or now < self._next_check or self.registry_rules_rev:
            return  # a table set in the registry (`ccoe rules set`) takes precedence over the file
        self._next_check = now + self.config.router.rules_check_interval_s
        mtime = self._mtime()
        if mtime == self._rules_mtime:
            return
        self._rules_mtime = mtime
        try:
            self.set_rules(RuleTable.from_file(Path(self.config.rules), self.known_experts))
        except RuleTableError as e:
            log.error("rules file %s changed but was refused, keeping table v%d: %s",
                      self.config.rules, self.table.version, e)

    def apply_desired(self, serving: dict[str, int], rules_rev: int, rules: dict | None, *,
                      epoch: str = "", revision: int | None = None) -> bool:
        """Take the registry's view: serving versions, and its rule table once it has one
        (it then replaces the configured table; a table the registry accepted is valid).
        With a `revision`, a view that went backwards is held back (fail static): the router
        keeps what it routes on and this returns False."""
        if revision is not None and not self.fail_static.admit(View.of(epoch, revision, serving)):
            return False
        self.serving = dict(serving)
        if rules is not None and rules_rev != self.registry_rules_rev:
            try:
                self.set_rules(RuleTable.from_dict(rules))
                self.registry_rules_rev = rules_rev
            except RuleTableError as e:
                log.error("registry rule table r%d refused, keeping v%d: %s", rules_rev, self.table.version, e)
        self._view_changed.set()
        self._view_changed = asyncio.Event()
        return True

    def resolve(self, name: str, version: int | None) -> int | None:
        """The version a request for `name` runs on: the one asked for, else the serving one."""
        if version is not None or self.serving is None:
            return version
        if name not in self.serving:
            raise ExpertNotFound(f"expert {name!r} is not served: it is not registered, was popped, "
                                 f"or its first version is still rolling out; serving: "
                                 f"{sorted(self.serving) or 'none'}")
        return self.serving[name]

    def set_rules(self, table: RuleTable) -> None:
        self.table = table
        log.info("rule table v%d in force (%d rules)", table.version, len(table.spec.rules))

    # ---- requests ------------------------------------------------------------------------

    async def _plan_fresh(self, req: pb.GenerateRequest) -> tuple[Route, list[GenerationRequest], list[bool]]:
        try:
            return self._plan(req)
        except CCoEError as e:
            if e.code != "NOT_FOUND" or self.refresh_view is None:
                raise
        await self.refresh_view()
        return self._plan(req)

    def _plan(self, req: pb.GenerateRequest) -> tuple[Route, list[GenerationRequest], list[bool]]:
        self.maybe_reload_rules()
        with tracing.span("router.route") as s:
            query, base = parse_request(req, self.config.router)
            route = decide(query, self.table)
            s.set_attribute("route.policy", route.policy)
            s.set_attribute("route.rule_id", route.rule_id)
        if len(route.experts) > self.config.router.max_fanout:
            raise ServingError("FAILED_PRECONDITION", f"rule {route.rule_id!r} consults {len(route.experts)} experts; "
                                                      f"the limit is {self.config.router.max_fanout}")
        if not route.experts:
            return route, [base], [False]
        requests = []
        for name, asked in route.experts:
            version = self.resolve(name, asked)
            expert = name if version is None else ExpertKey(name, version)
            rid = base.request_id if len(route.experts) == 1 else f"{base.request_id}/{name}"
            requests.append(dataclasses.replace(base, expert=expert, request_id=rid))
        return route, requests, [asked is None and version is not None for _, asked in route.experts]

    async def _one(self, request: GenerationRequest, carrier: dict[str, str], pinned_by_router: bool,
                   restartable: bool = False) -> AsyncGenerator[Event | Restart, None]:
        """One request's events, run again where that is safe:
        - the router chose the version and the replica no longer holds it (a rollout finished a
          moment ago and this router's view lags): nothing has been produced yet, so wait
          briefly for the newer view and run it once more on that;
        - the replica died (ReplicaLost): run it again on another replica, at most
          router.replica_retries times, if the caller has been sent nothing of it; `restartable`
          (a unary call, answered whole at the end) also after output, voided by a Restart."""
        retries_left = self.config.router.replica_retries
        deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        newer_tried = False
        while True:
            stream = self.client.stream(request, carrier)
            retry: GenerationRequest | None = None
            lost: ReplicaLost | None = None
            produced = 0
            try:
                async for event in stream:
                    if (not newer_tried and pinned_by_router and isinstance(event, ErrorEvent)
                            and event.code == "NOT_FOUND"):
                        newer_tried = True
                        retry = await self._newer_version(request)
                        if retry is not None:
                            break
                    produced += isinstance(event, DeltaEvent)
                    yield event
            except ReplicaLost as e:
                lost = e
            finally:
                await stream.aclose()  # a caller that went away cancels the replica's request now
            if lost is not None:
                retry = self._after_loss(request, lost, produced, restartable, retries_left, deadline)
                retries_left -= 1
                if produced:
                    yield Restart(str(lost))
            if retry is None:
                return
            if lost is None:
                log.info("request %s: %s was retired meanwhile, running it on %s", request.request_id,
                         request.expert, retry.expert)
            request = retry

    def _after_loss(self, request: GenerationRequest, lost: ReplicaLost, produced: int, restartable: bool,
                    retries_left: int, deadline: float | None) -> GenerationRequest:
        """The request to run again after its replica died, or the UNAVAILABLE to raise."""
        self.replicas_lost += 1
        self.last_loss_at = time.time()
        remaining = None if deadline is None else deadline - time.monotonic()
        why = None
        if produced and not restartable:
            why = f"the caller already has {produced} of its messages"
        elif retries_left <= 0:
            why = f"it was run {self.config.router.replica_retries + 1} times (router.replica_retries)"
        elif remaining is not None and remaining <= 0:
            why = "its timeout_ms has passed"
        if why is not None:
            self.metrics.router_retry("replica_lost", "gave_up")
            raise ReplicaLost(f"{lost}; not run again because {why}; retry in "
                              f"{self.config.router.retry_after_s:g}s", self.config.router.retry_after_s) from lost
        self.metrics.router_retry("replica_lost", "retried")
        self.retried += 1
        log.warning("request %s: %s; running it again on another replica (%d retries left)",
                    request.request_id, lost, retries_left - 1)
        return request if remaining is None else dataclasses.replace(request, timeout_s=remaining)

    async def _newer_version(self, request: GenerationRequest, wait_s: float = 2.0) -> GenerationRequest | None:
        key = request.expert
        if not isinstance(key, ExpertKey) or self.serving is None:
            return None
        deadline = time.monotonic() + wait_s
        while self.serving.get(key.name) == key.version and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._view_changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        newer = self.serving.get(key.name)
        if newer is None or newer == key.version:
            return None
        return dataclasses.replace(request, expert=ExpertKey(key.name, newer))

    async def _merged(self, requests: list[GenerationRequest], pinned: list[bool] | None = None,
                      restartable: bool = False) -> AsyncGenerator[tuple[int, Event | Restart], None]:
        """Events of all requests as they come, tagged with the request's index. The call holds
        one admission place per request until it ends (RouterOverloaded when there are none)."""
        carrier = tracing.inject()
        pinned = pinned or [False] * len(requests)
        with self.admission.hold(len(requests)):
            if len(requests) == 1:
                stream = self._one(requests[0], carrier, pinned[0], restartable)
                try:
                    async for event in stream:
                        yield 0, event
                finally:
                    await stream.aclose()
                return
            queue: asyncio.Queue[tuple[int, Event | Restart | None]] = asyncio.Queue()

            async def pump(i: int, r: GenerationRequest) -> None:
                stream = self._one(r, carrier, pinned[i], restartable)
                try:
                    async for event in stream:
                        await queue.put((i, event))
                finally:
                    await stream.aclose()
                    await queue.put((i, None))

            tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
            try:
                open_streams = len(tasks)
                while open_streams:
                    i, got = await queue.get()
                    if got is None:
                        open_streams -= 1
                        continue
                    yield i, got
                for t in tasks:
                    t.result()  # surface a pump's exception, if any
            finally:
                for t in tasks:
                    t.cancel()

    async def generate_stream(self, req: pb.GenerateRequest,
                              metadata: dict[str, str]) -> AsyncIterator[pb.GenerateStreamResponse]:
        policy, code = "none", "CANCELLED"
        try:
            async for message in self._generate_stream(req, metadata):
                policy = message.route.policy or policy
                yield message
            code = "OK"
        except Exception as e:
            code = status_of(e).code
            raise
        finally:
            self.metrics.router_request(policy, code)

    async def generate(self, req: pb.GenerateRequest, metadata: dict[str, str]) -> pb.GenerateResponse:
        code, policy = "OK", "none"
        try:
            response = await self._generate(req, metadata)
            policy = response.route.policy
            return response
        except BaseException as e:
            code = status_of(e).code if isinstance(e, Exception) else "CANCELLED"
            raise
        finally:
            self.metrics.router_request(policy, code)

    async def _generate_stream(self, req: pb.GenerateRequest,
                               metadata: dict[str, str]) -> AsyncIterator[pb.GenerateStreamResponse]:
        start = time.monotonic()
        with tracing.span("router.GenerateStream", tracing.extract(metadata)):
            route, requests, pinned = await self._plan_fresh(req)
            names = [n for n, _ in route.experts] or [""]
            versions: dict[str, int] = {}
            first = True
            async with aclosing(self._merged(requests, pinned)) as events:
                async for i, event in events:
                    assert not isinstance(event, Restart), "a stream is never restarted after output"
                    if isinstance(event, ErrorEvent):
                        raise event.to_error()
                    if event.expert is not None:
                        versions[event.expert.name] = event.expert.version
                    msg = pb.GenerateStreamResponse(
                        request_id=requests[i].request_id, text=event.text, token_ids=event.token_ids,
                        logprobs=event.logprobs or [], finish_reason=event.finish_reason or "",
                        expert=pb.ExpertRef(name=names[i], version=versions.get(names[i], 0)) if names[i] else None,
                        usage=usage(event.usage),
                        timings=_timings(event.timings, start) if event.timings else None,
                    )
                    if first:
                        msg.route.CopyFrom(route_trace(route, versions))
                        first = False
                    yield msg

    async def _generate(self, req: pb.GenerateRequest, metadata: dict[str, str]) -> pb.GenerateResponse:
        start = time.monotonic()
        with tracing.span("router.Generate", tracing.extract(metadata)):
            route, requests, pinned = await self._plan_fresh(req)
            parts: list[dict] = [{"text": [], "ids": [], "lps": [], "last": None} for _ in requests]
            versions: dict[str, int] = {}
            # A unary answer is sent whole at the end, so a request whose replica died may start over.
            async with aclosing(self._merged(requests, pinned, restartable=True)) as events:
                async for i, event in events:
                    if isinstance(event, Restart):
                        parts[i] = {"text": [], "ids": [], "lps": [], "last": None}
                        continue
                    if isinstance(event, ErrorEvent):
                        raise event.to_error()
                    p = parts[i]
                    p["text"].append(event.text)
                    p["ids"].extend(event.token_ids)
                    p["lps"].extend(event.logprobs or [])
                    if event.expert is not None:
                        versions[event.expert.name] = event.expert.version
                    if event.finish_reason:
                        p["last"] = event
        first, last = parts[0], parts[0]["last"]
        response = pb.GenerateResponse(
            request_id=requests[0].request_id if len(requests) == 1 else requests[0].request_id.rsplit("/", 1)[0],
            text="".join(first["text"]), token_ids=first["ids"], finish_reason=last.finish_reason,
            usage=usage(last.usage), timings=_timings(last.timings, start), logprobs=first["lps"],
            route=route_trace(route, versions),
        )
        if route.fans_out:
            for (name, _), p in zip(route.experts, parts, strict=True):
                response.fanout.append(pb.FanoutResult(
                    expert=pb.ExpertRef(name=name, version=versions.get(name, 0)), text="".join(p["text"]),
                    token_ids=p["ids"], finish_reason=p["last"].finish_reason, usage=usage(p["last"].usage)))
        return response


def _timings(t: Timings, router_start: float) -> pb.Timings:
    # The replica measured from its own submission; TTFT is reported from the router's start.
    offset = max(0.0, (time.monotonic() - router_start) - t.total_s)
    return pb.Timings(queue_ms=t.queue_s * 1e3, ttft_ms=((t.ttft_s or t.total_s) + offset) * 1e3,
                      total_ms=(t.total_s + offset) * 1e3)


def status_of(error: BaseException) -> CCoEError:
    """What a caller should see for any exception: a CCoEError as it is (its `code`,
    `retryable` and message), anything else as INTERNAL naming the type, e.g.
    status_of(KeyError("x")) -> ServingError("INTERNAL", "internal error: KeyError: 'x'")."""
    cause = getattr(error, "cause", None)  # Ray's RayTaskError wraps what a deployment raised
    if isinstance(cause, BaseException) and cause is not error:
        return status_of(cause)
    if isinstance(error, CCoEError):
        return error
    return ServingError("INTERNAL", f"internal error: {type(error).__name__}: {error}")
