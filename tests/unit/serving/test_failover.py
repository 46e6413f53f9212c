"""The router core when a replica dies under a request, and its admission bound, in process.

Replicas here are scripted: each attempt of a request plays the next script, whose events may
end with the replica's death (ReplicaLost, what services/handles.py raises for Ray's
ActorDiedError). The same code behind real Ray and gRPC, with a replica actor really killed,
is tested in tests/integration/test_failover.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from ccoe_common.engine.params import GenerationRequest, Timings, Usage
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.serving.admission import Admission, RouterOverloaded
from ccoe_common.serving.config import AppConfig, ConfigError
from ccoe_common.serving.events import DeltaEvent, Event
from ccoe_common.serving.failover import ReplicaLost
from ccoe_common.serving.router_core import RouterCore

DIED = ReplicaLost("the replica serving request r went away (ActorDiedError: killed)")


def delta(token: int, last: bool = False) -> DeltaEvent:
    if not last:
        return DeltaEvent(token_ids=[token], text=f"<{token}>")
    return DeltaEvent(token_ids=[token], text=f"<{token}>", finish_reason="length",
                      usage=Usage(prompt_tokens=3, completion_tokens=2), timings=Timings(0.0, 0.01, 0.02))


class DyingReplicas:
    """Attempt k of any request plays scripts[k]: events, then ReplicaLost if the script says so."""

    def __init__(self, *scripts: tuple[list[Event], bool]):
        self.scripts = list(scripts)
        self.attempts: list[GenerationRequest] = []
        self.closed = 0

    async def stream(self, request: GenerationRequest, carrier: dict[str, str]):
        events, dies = self.scripts[min(len(self.attempts), len(self.scripts) - 1)]
        self.attempts.append(request)
        try:
            for event in events:
                await asyncio.sleep(0)
                yield event
            if dies:
                raise DIED
        finally:
            self.closed += 1


def config(**router) -> AppConfig:
    return AppConfig.load({"backbone": "/models/unused", "router": router, "auth": {"mode": "none"},
                           "replica": {"num_replicas": 2, "engine": {"max_running": 2, "max_waiting": 2}}})


def request(n: int = 2, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="Compute 2 + 2", max_tokens=n, sampling=pb.SamplingParams(ignore_eos=True), **kw)


async def stream_all(core: RouterCore, req: pb.GenerateRequest) -> list[pb.GenerateStreamResponse]:
    return [m async for m in core.generate_stream(req, {})]


def test_a_request_whose_replica_died_before_its_first_token_runs_again_elsewhere():
    replicas = DyingReplicas(([], True), ([delta(7), delta(8, last=True)], False))
    core = RouterCore(config(), replicas)
    got = asyncio.run(stream_all(core, request()))
    assert [list(m.token_ids) for m in got] == [[7], [8]] and got[-1].finish_reason == "length"
    assert len(replicas.attempts) == 2 and replicas.closed == 2
    assert (core.stats()["replicas_lost"], core.stats()["retried"]) == (1, 1)
    assert 'ccoe_router_retries_total{outcome="retried",reason="replica_lost"} 1.0' in core.metrics.render()


def test_a_stream_that_already_sent_tokens_fails_unavailable_with_retry_advice():
    replicas = DyingReplicas(([delta(7)], True), ([delta(9), delta(9, last=True)], False))
    core = RouterCore(config(retry_after_s=0.25), replicas)
    got: list[pb.GenerateStreamResponse] = []

    async def consume() -> None:
        async for m in core.generate_stream(request(), {}):
            got.append(m)

    with pytest.raises(ReplicaLost) as err:
        asyncio.run(consume())
    assert [list(m.token_ids) for m in got] == [[7]]  # what was sent stays sent; nothing is run twice
    assert (err.value.code, err.value.retryable, err.value.retry_after_s) == ("UNAVAILABLE", True, 0.25)
    assert "ActorDiedError" in str(err.value) and "already has 1 of its messages" in str(err.value)
    assert len(replicas.attempts) == 1
    assert re.search(r'ccoe_router_requests_total\{code="UNAVAILABLE",policy="\w+"\} 1\.0', core.metrics.render())


def test_a_unary_call_starts_over_and_answers_only_from_the_run_that_finished():
    replicas = DyingReplicas(([delta(7), delta(7)], True), ([delta(1), delta(2, last=True)], False))
    core = RouterCore(config(), replicas)
    response = asyncio.run(core.generate(request(), {}))
    assert (list(response.token_ids), response.text, response.usage.completion_tokens) == ([1, 2], "<1><2>", 2)
    assert len(replicas.attempts) == 2


def test_retries_are_bounded_then_unavailable():
    replicas = DyingReplicas(([], True))
    core = RouterCore(config(replica_retries=2), replicas)
    with pytest.raises(ReplicaLost, match=r"run 3 times \(router.replica_retries\)") as err:
        asyncio.run(core.generate(request(), {}))
    assert err.value.code == "UNAVAILABLE" and err.value.retry_after_s == 1.0
    assert len(replicas.attempts) == 3
    assert core.stats()["replicas_lost"] == 3 and core.stats()["retried"] == 2
    assert 'ccoe_router_retries_total{outcome="gave_up",reason="replica_lost"} 1.0' in core.metrics.render()


def test_a_retry_keeps_what_is_left_of_the_requests_timeout():
    replicas = DyingReplicas(([], True), ([delta(1), delta(2, last=True)], False))
    core = RouterCore(config(), replicas)
    asyncio.run(core.generate(request(timeout_ms=60_000), {}))
    first, second = (r.timeout_s for r in replicas.attempts)
    assert first == 60.0 and second is not None and 0 < second <= first


def test_every_fanned_out_request_is_retried_on_its_own():
    # Both requests of a two-expert call lose their first attempt; each runs again alone.
    core = RouterCore(config(), DyingReplicas(([], True), ([], True), ([delta(5), delta(6, last=True)], False)))
    requests = [GenerationRequest(prompt="x", request_id="r/a"), GenerationRequest(prompt="x", request_id="r/b")]

    async def run() -> list[tuple[int, list[int]]]:
        return [(i, e.token_ids) async for i, e in core._merged(requests) if isinstance(e, DeltaEvent)]

    got = asyncio.run(run())
    assert sorted(got) == [(0, [5]), (0, [6]), (1, [5]), (1, [6])]
    assert core.stats()["retried"] == 2


# ---- admission ----------------------------------------------------------------------------------


def test_admission_holds_places_and_refuses_at_once_beyond_its_bound():
    admission = Admission(limit=3, retry_after_s=0.5)
    with admission.hold(2):
        with admission.hold(1):
            assert admission.in_flight == 3
            with pytest.raises(RouterOverloaded, match=r"3 engine requests in flight, this call needs 1 more, "
                                                       r"the bound is 3 \(router.max_in_flight") as err:
                with admission.hold(1):
                    pass
            assert (err.value.code, err.value.retryable, err.value.retry_after_s) == ("RESOURCE_EXHAUSTED", True, 0.5)
        with pytest.raises(RouterOverloaded):
            with admission.hold(2):
                pass
    assert (admission.in_flight, admission.admitted, admission.refused) == (0, 2, 2)


def test_the_router_refuses_streams_and_unary_calls_over_its_bound_and_frees_places_when_they_end():
    gate = asyncio.Event()

    class Slow:
        async def stream(self, request: GenerationRequest, carrier: dict[str, str]):
            await gate.wait()
            yield delta(1, last=True)

    core = RouterCore(config(max_in_flight=4, retry_after_s=0.2), Slow())

    async def main() -> list[BaseException | list]:
        held = [asyncio.create_task(stream_all(core, request(1))) for _ in range(4)]
        while core.admission.in_flight < 4:
            await asyncio.sleep(0)
        refused = await asyncio.gather(stream_all(core, request(1)), core.generate(request(1), {}),
                                       return_exceptions=True)
        gate.set()
        await asyncio.gather(*held)
        after = await stream_all(core, request(1))  # the places are free again
        return [*refused, after]

    stream_refused, unary_refused, after = asyncio.run(main())
    for refusal in (stream_refused, unary_refused):
        assert isinstance(refusal, RouterOverloaded)
        assert (refusal.code, refusal.retry_after_s) == ("RESOURCE_EXHAUSTED", 0.2)
    assert isinstance(after, list) and after[0].finish_reason == "length"
    assert core.stats() | {"last_loss_at": None} == {"in_flight": 0, "limit": 4, "admitted": 5, "refused": 2,
                                                      "replicas_lost": 0, "retried": 0, "last_loss_at": None}


def test_the_bound_defaults_to_the_replicas_capacity_and_is_validated():
    assert config().admission_bound == 2 * (2 + 2)
    assert config(num_replicas=2).admission_bound == 4  # each router gets its share
    assert config(max_in_flight=5).admission_bound == 5
    small = AppConfig.load({"backbone": "/m", "replica": {"engine": {"max_running": 1, "max_waiting": 1}}})
    assert small.admission_bound == small.router.max_fanout  # a fanned-out call must fit
    with pytest.raises(ConfigError, match=r"^config: .*router.max_in_flight \(9\) x router.num_replicas \(1\) is "
                                          r"over the replicas' capacity of 8"):
        config(max_in_flight=9)
    with pytest.raises(ConfigError, match=r"router.max_in_flight \(3\) must be at least router.max_fanout \(4\)"):
        config(max_in_flight=3)
    with pytest.raises(ConfigError, match=r"^config field router.max_in_flight: Input should be greater than or "
                                          r"equal to 1 \(got 0\)"):
        config(max_in_flight=0)
