"""One error family for everything a caller can be told. Each error carries the gRPC status
a caller sees (`code`, a `grpc.StatusCode` name) and whether the same call may succeed later
(`retryable`, with `retry_after_s` as a hint), so the edge reads them instead of branching on
types:

    try:
        engine.submit(request, sink)
    except CCoEError as e:
        e.code, e.retryable   # ("NOT_FOUND", False) for
                              # ExpertNotFound("expert law is not served here; resident experts: ['math@1']")

The families derive from CCoEError in their own modules (EngineError in engine/errors.py,
ExpertError in experts/errors.py, RegistryError in registry/errors.py, RuleTableError in
routing/rules.py, ServingError in serving/events.py). The errors that several layers raise
live here: a malformed request field, an expert that is not here (or not yet), a mode that is
not served.
"""

from __future__ import annotations

from typing import Any


class CCoEError(Exception):
    """Base of every error CCoE Serve reports to a caller. Subclasses set `code` and
    `retryable` as class attributes; an instance may override them (ServingError does)."""

    code: str = "INTERNAL"
    retryable: bool = False
    retry_after_s: float | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (Ray pickles them): rebuild from the message and the
        # instance's fields, whatever a subclass's constructor takes, so type and fields survive.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type[CCoEError], args: tuple[Any, ...], state: dict[str, Any]) -> CCoEError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A bad value as an error message may show it: its repr, cut to `limit` characters with
    its full length said. A message that echoed a 170 KB prompt once overflowed gRPC's 8 KiB
    limit on trailing metadata, and the client saw `RESOURCE_EXHAUSTED: Stream removed`
    instead of the error, e.g. quote("abcdef", limit=3) -> "'abc'… (6 characters)"."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}… ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters as text)"


class InvalidRequest(CCoEError, ValueError):
    """A request field is out of range or malformed. `param` names it, e.g.
    InvalidRequest("temperature", "must be in [0, 10] (0 = greedy), got 11.0")."""

    code = "INVALID_ARGUMENT"

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class ExpertNotFound(CCoEError, LookupError):
    """The expert (or that version) is not here: not registered, not resident on this replica,
    popped or draining. The one name for it in every layer, e.g.
    ExpertNotFound("expert 'law' has no version 7; registered: [1, 2]")."""

    code = "NOT_FOUND"


class ExpertNotReady(ExpertNotFound):
    """The version is resident but still staged: its smoke test runs, and it serves once that
    passes (seconds), or is removed if it fails. Transient, so UNAVAILABLE and retryable; a
    subclass of ExpertNotFound so that code asking "is it here for me?" catches both."""

    code = "UNAVAILABLE"
    retryable = True


class Unimplemented(CCoEError):
    """The request asks for something this build does not serve yet, e.g. routing mode PLAN."""

    code = "UNIMPLEMENTED"
