"""Errors the engine reports for a request. Each carries the status a gRPC edge should map it
to (`code`), and whether retrying the same request later can succeed (`retryable`)."""

from __future__ import annotations


class EngineError(Exception):
    code = "INTERNAL"
    retryable = False

    def __reduce__(self):
        # Errors cross process boundaries (Ray pickles them): rebuild from the constructor's
        # own arguments, whatever a subclass's signature is.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type, args: tuple, state: dict) -> EngineError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidRequest(EngineError, ValueError):
    """A request field is out of range or malformed. `param` names it, e.g. "temperature"."""

    code = "INVALID_ARGUMENT"

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class ExpertUnavailable(EngineError, LookupError):
    """The requested expert (or version) is not resident here, or is draining after a pop."""

    code = "NOT_FOUND"


class ExpertNotReady(ExpertUnavailable):
    """The version is resident but still staged: its smoke test runs, and it serves once that
    passes (seconds), or is removed if it fails. Transient, so UNAVAILABLE and retryable."""

    code = "UNAVAILABLE"
    retryable = True


class Overloaded(EngineError):
    """The waiting queue is full. Retry after `retry_after_s` seconds, or on another replica."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(f"{message}; retry in {retry_after_s:.1f}s or on another replica")


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(EngineError):
    code = "CANCELLED"


class EngineStopped(EngineError):
    """The engine is shutting down; the request was not (or no longer) served."""

    code = "UNAVAILABLE"
    retryable = True
