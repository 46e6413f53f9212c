"""Invariant 7 through the real stack (gRPC, Ray Serve, redis-server): one request's early
end never changes or fails the requests that share its engine steps (issue #15, item 1).

Three greedy GenerateStream calls run while four others end early or ask for extreme
values: one cancelled by the client after three messages, one with `timeout_ms: 300`, one
whose client deadline is 0.4 s, and one at `temperature: 1e-45`. The three end normally with
the tokens each produces alone (token ids; see tests/unit/engine/test_faults.py for why
tokens, not bits), and the 1e-45 one with the greedy tokens of its prompt.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.pb import inference_pb2 as pb
from ccoe_common.pb import inference_pb2_grpc
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

N = 160  # tokens of each well-formed stream: they must outlive the 0.4 s deadline around them


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("collateral")
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "auth": {"mode": "token"},
        "registry": {"allowed_sources": [str(work)]},
        # Room for all seven requests in the same steps.
        "replica": {"engine": {"max_seq_len": 1024, "max_running": 8, "max_waiting": 8, "max_batched_tokens": 256}},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        yield st


@pytest.fixture(scope="module")
def stub(stack):
    channel = stack.inference_channel()
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


def request(prompt: str, n: int, expert: str | None = None, **kw) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(ignore_eos=True, temperature=kw.pop("temperature", 0.0))
    if expert is not None:
        kw["expert"] = pb.ExpertRef(name=expert)
    return pb.GenerateRequest(prompt=prompt, max_tokens=n, sampling=sampling, **kw)


WELL_FORMED = {
    "backbone": request("The patient presents with fever and", N),
    "math": request("Compute 12 + 7 and then", N, "math"),
    "sql": request("SELECT name FROM users WHERE", N, "sql"),
}
COLD = "Summarise the meeting notes:"  # the 1e-45 request's prompt


def tokens(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


class Outcome:
    """What one call ended with: its messages, or its status, and when."""

    def __init__(self):
        self.messages: list[pb.GenerateResponse] = []
        self.code: grpc.StatusCode = grpc.StatusCode.OK
        self.details = ""
        self.ended = 0.0


def run(outcomes: dict[str, Outcome], name: str, start: threading.Barrier, call) -> threading.Thread:
    outcome = outcomes[name] = Outcome()

    def body():
        start.wait()
        try:
            call(outcome)
        except grpc.RpcError as e:
            outcome.code, outcome.details = e.code(), e.details()
        outcome.ended = time.monotonic()

    thread = threading.Thread(target=body, name=name)
    thread.start()
    return thread


def test_early_ends_and_extreme_values_leave_the_other_streams_alone(stub):
    alone = {name: tokens(stub.GenerateStream(req, timeout=120)) for name, req in WELL_FORMED.items()}
    cold_greedy = tokens(stub.GenerateStream(request(COLD, 40), timeout=120))
    assert all(len(t) == N for t in alone.values())

    long = request("Compute", 1000)

    def stream(req, timeout=120.0):
        def call(outcome: Outcome) -> None:
            outcome.messages.extend(stub.GenerateStream(req, timeout=timeout))
        return call

    def cancel_after_three(outcome: Outcome) -> None:
        call = stub.GenerateStream(long, timeout=120)
        outcome.messages.extend(next(call) for _ in range(3))
        call.cancel()
        outcome.code = grpc.StatusCode.CANCELLED

    outcomes: dict[str, Outcome] = {}
    start = threading.Barrier(7)
    threads = [run(outcomes, name, start, stream(req)) for name, req in WELL_FORMED.items()]
    threads += [
        run(outcomes, "cancelled", start, cancel_after_three),
        run(outcomes, "timeout_ms", start, stream(request("Compute", 1000, timeout_ms=300))),
        run(outcomes, "client deadline", start, stream(long, timeout=0.4)),
        run(outcomes, "temperature 1e-45", start, stream(request(COLD, 40, temperature=1e-45))),
    ]
    for thread in threads:
        thread.join(180)
        assert not thread.is_alive(), f"{thread.name} never ended"

    for name in WELL_FORMED:
        got = outcomes[name]
        assert got.code == grpc.StatusCode.OK, f"{name}: {got.code} {got.details}"
        assert tokens(got.messages) == alone[name], name
        assert got.messages[-1].finish_reason == "length"
    assert len(outcomes["cancelled"].messages) == 3
    assert outcomes["timeout_ms"].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "0.3s deadline" in outcomes["timeout_ms"].details
    assert outcomes["client deadline"].code == grpc.StatusCode.DEADLINE_EXCEEDED
    cold = outcomes["temperature 1e-45"]
    assert cold.code == grpc.StatusCode.OK, cold.details
    assert tokens(cold.messages) == cold_greedy  # below 2^-126 a temperature is greedy
    # The early ends happened while the well-formed streams were still decoding.
    last_early = max(outcomes[n].ended for n in ("cancelled", "timeout_ms", "client deadline"))
    assert last_early < min(outcomes[n].ended for n in WELL_FORMED)
