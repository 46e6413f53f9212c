"""The typed events between replica and router: built from what the engine gives, carried
through Ray's pickling unchanged, and turned back into the caller's status by the router."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from ray import cloudpickle

from ccoe_common.engine.errors import Overloaded
from ccoe_common.engine.params import Timings, TokenDelta, Usage
from ccoe_common.errors import ExpertNotFound, ExpertNotReady
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.serving.events import DeltaEvent, ErrorEvent, ServingError
from ccoe_common.serving.router_core import status_of

LAST = TokenDelta(request_id="r1", token_ids=[17, 2], text="4", logprobs=[-0.25, -1.5], finish_reason="stop",
                  expert=ExpertKey("math", 2), usage=Usage(prompt_tokens=9, completion_tokens=2),
                  timings=Timings(queue_s=0.001, ttft_s=0.02, total_s=0.05))


def test_a_delta_event_keeps_every_field_of_the_engine_delta_but_the_request_id():
    event = DeltaEvent.from_delta(LAST)
    delta = dataclasses.asdict(LAST)
    del delta["request_id"]  # the router knows which request a stream belongs to
    assert dataclasses.asdict(event) == delta
    assert event.expert == ExpertKey("math", 2) and event.usage == Usage(9, 2)
    first = DeltaEvent.from_delta(TokenDelta(request_id="r1", token_ids=[5], text="", expert=ExpertKey("math", 2)))
    assert (first.finish_reason, first.usage, first.timings, first.logprobs) == (None, None, None, None)


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "ray-cloudpickle"])
@pytest.mark.parametrize("event", [
    DeltaEvent.from_delta(LAST),
    DeltaEvent(token_ids=[5], text="", expert=None),
    ErrorEvent.from_error(Overloaded("the waiting queue is full (256)", retry_after_s=2.5)),
    ErrorEvent.from_error(ExpertNotFound("expert law is not served here; resident experts: ['math@2']")),
], ids=["last-delta", "backbone-delta", "overloaded", "not-found"])
def test_events_cross_a_pickle_boundary_as_they_are(event, dumps):
    back = pickle.loads(dumps(event))
    assert type(back) is type(event) and back == event


def test_events_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DeltaEvent.from_delta(LAST).text = "5"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ErrorEvent("NOT_FOUND", "gone").code = "OK"  # type: ignore[misc]


@pytest.mark.parametrize("error", [
    Overloaded("the waiting queue is full (256)", retry_after_s=2.5),
    ExpertNotFound("expert law is not served here; resident experts: ['math@2']"),
    ExpertNotReady("expert math@2 is still being smoke-tested here (staged); retry in a few seconds"),
], ids=["overloaded", "not-found", "not-ready"])
def test_an_error_event_becomes_the_same_status_at_the_router(error):
    event = ErrorEvent.from_error(error)
    assert (event.code, event.message, event.retryable, event.retry_after_s) == (
        error.code, str(error), error.retryable, error.retry_after_s)
    raised = event.to_error()
    assert isinstance(raised, ServingError)
    status = status_of(raised)
    assert (status.code, str(status), status.retryable, status.retry_after_s) == (
        error.code, str(error), error.retryable, error.retry_after_s)
