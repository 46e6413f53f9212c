"""The one error family: every error a caller can see carries its status and retry hint,
survives Ray's process boundary with its type and fields, and the gRPC edge reads its code."""

from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle

from ccoe_common.engine.errors import Cancelled, DeadlineExceeded, EngineError, EngineStopped, Overloaded
from ccoe_common.engine.templates import TemplateError
from ccoe_common.errors import CCoEError, ExpertNotFound, ExpertNotReady, InvalidRequest, Unimplemented
from ccoe_common.experts.errors import ChecksumMismatch, ExpertError, ExpertVersionExists
from ccoe_common.model.config import BackboneConfigError
from ccoe_common.model.placement import PlacementError
from ccoe_common.registry.artifact_store import ArtifactConflict
from ccoe_common.registry.errors import (
    ArtifactRefused,
    BadRequest,
    NoReplicaToValidate,
    NothingToRollBack,
    RegistryError,
    RevisionConflict,
    RolloutInProgress,
    StaleVersion,
    StoreUnavailable,
)
from ccoe_common.routing.rules import RuleTableError
from ccoe_common.serving.config import ConfigError
from ccoe_common.serving.events import ServingError
from ccoe_common.serving.router_core import status_of
from ccoe_common.training.data import DataError

# (error, its gRPC status, whether a retry may help): one or more of every family.
FAMILY = [
    (InvalidRequest("temperature", "must be in [0, 10] (0 = greedy), got 11.0"), "INVALID_ARGUMENT", False),
    (ExpertNotFound("expert law is not served here; resident experts: ['math@1']"), "NOT_FOUND", False),
    (ExpertNotReady("expert math@2 is still being smoke-tested here (staged)"), "UNAVAILABLE", True),
    (Unimplemented("routing mode PLAN (expert planning) is not served yet"), "UNIMPLEMENTED", False),
    (EngineError("internal error while generating: RuntimeError: boom"), "INTERNAL", False),
    (Overloaded("the waiting queue is full (256)", retry_after_s=2.5), "RESOURCE_EXHAUSTED", True),
    (DeadlineExceeded("request r1 took longer than 2.0s"), "DEADLINE_EXCEEDED", False),
    (Cancelled("request r1 was cancelled"), "CANCELLED", False),
    (EngineStopped("the engine is not running"), "UNAVAILABLE", True),
    (TemplateError("messages must not be empty"), "INVALID_ARGUMENT", False),
    (ChecksumMismatch("expert artifact 'file:///a/math'", "weights_sha256", "ab12", "9f00", "the file is corrupt"),
     "INVALID_ARGUMENT", False),
    (ExpertVersionExists("expert law@1 is already resident; push version 2 or pop it first"), "ALREADY_EXISTS", False),
    (PlacementError("an expert of 13 layers does not fit a backbone of 12 layers"), "INVALID_ARGUMENT", False),
    (BackboneConfigError("config.json hidden_act is 'gelu'; only 'silu' is supported"), "FAILED_PRECONDITION", False),
    (RevisionConflict("expert 'math'", 3, 5), "ABORTED", True),
    (StaleVersion("expert 'math': version 2 is not newer than the registered 3"), "FAILED_PRECONDITION", False),
    (RolloutInProgress("expert 'math' is rolling out version 3"), "FAILED_PRECONDITION", False),
    (NothingToRollBack("expert 'math' has had no rollout to roll back"), "FAILED_PRECONDITION", False),
    (ArtifactRefused("file:///a/math does not fit this fleet's backbone"), "INVALID_ARGUMENT", False),
    (BadRequest("replica_id: a report must name its replica"), "INVALID_ARGUMENT", False),
    (StoreUnavailable("the registry's Redis is unreachable"), "UNAVAILABLE", True),
    (NoReplicaToValidate("no model replica answered within 120s"), "UNAVAILABLE", True),
    (ArtifactConflict("'file:///store/math/2' already holds math@2 with other weights"), "ALREADY_EXISTS", False),
    (RuleTableError("sql", "experts is empty; name at least one expert"), "INVALID_ARGUMENT", False),
    (ConfigError("config field replica.num_replicas: must be >= 1"), "INVALID_ARGUMENT", False),
    (DataError("train.jsonl: no usable records in 3 non-blank lines"), "INVALID_ARGUMENT", False),
    (ServingError("FAILED_PRECONDITION", "rule 'legal' consults 5 experts; the limit is 4"), "FAILED_PRECONDITION",
     False),
]
IDS = [type(e).__name__ for e, _, _ in FAMILY]


@pytest.mark.parametrize(("error", "code", "retryable"), FAMILY, ids=IDS)
def test_every_family_carries_its_status_and_retry_hint(error, code, retryable):
    assert isinstance(error, CCoEError)
    assert (error.code, error.retryable) == (code, retryable)


def test_the_retry_hint_and_the_families_that_callers_catch_by_type():
    assert Overloaded("queue full", retry_after_s=2.5).retry_after_s == 2.5
    assert ExpertNotFound("x").retry_after_s is None
    assert isinstance(ExpertNotReady("x"), ExpertNotFound)  # "is it here for me?" catches both
    # The standard bases stay, so code that catches ValueError/LookupError still does.
    assert isinstance(InvalidRequest("p", "m"), ValueError) and isinstance(ExpertNotFound("x"), LookupError)
    for family in (EngineError, ExpertError, RegistryError, RuleTableError, ServingError):
        assert issubclass(family, CCoEError)


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "ray-cloudpickle"])
@pytest.mark.parametrize(("error", "code", "retryable"), FAMILY, ids=IDS)
def test_pickling_keeps_type_message_and_fields(error, code, retryable, dumps):
    back = pickle.loads(dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)
    assert (back.code, back.retryable, back.retry_after_s) == (code, retryable, error.retry_after_s)


def test_pickling_keeps_the_fields_a_constructor_took():
    sha = pickle.loads(pickle.dumps(ChecksumMismatch("artifact 'a'", "weights_sha256", "ab12", "9f00", "corrupt")))
    assert (sha.subject, sha.field, sha.expected, sha.found, sha.hint) == (
        "artifact 'a'", "weights_sha256", "ab12", "9f00", "corrupt")
    conflict = pickle.loads(pickle.dumps(RevisionConflict("the rule table", 3, 5)))
    assert (conflict.what, conflict.expected, conflict.current) == ("the rule table", 3, 5)
    assert pickle.loads(pickle.dumps(InvalidRequest("top_p", "must be in (0, 1]"))).param == "top_p"
    assert pickle.loads(pickle.dumps(Overloaded("queue full", retry_after_s=2.5))).retry_after_s == 2.5


@pytest.mark.parametrize(("error", "code", "retryable"), FAMILY, ids=IDS)
def test_status_of_reads_the_code_of_every_family(error, code, retryable):
    status = status_of(error)
    assert (status.code, status.retryable, str(status)) == (code, retryable, str(error))


def test_status_of_reads_the_code_not_the_type():
    class DataLoss(CCoEError):  # a family status_of has never heard of
        code = "DATA_LOSS"
        retryable = True

    status = status_of(DataLoss("chunk 3 of weights.safetensors was lost"))
    assert (status.code, status.retryable) == ("DATA_LOSS", True)


def test_status_of_unwraps_what_a_deployment_raised_and_calls_the_rest_internal():
    class RayTaskErrorLike(Exception):  # Ray hands the caller the deployment's error as .cause
        def __init__(self, cause: BaseException):
            super().__init__(str(cause))
            self.cause = cause

    assert status_of(RayTaskErrorLike(RevisionConflict("expert 'math'", 3, 5))).code == "ABORTED"
    status = status_of(KeyError("x"))
    assert (status.code, status.retryable, str(status)) == ("INTERNAL", False, "internal error: KeyError: 'x'")
