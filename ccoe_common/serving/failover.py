"""A replica that dies under a request: what the caller sees, and when the router retries.

The replica client (services/handles.py for Ray) raises `ReplicaLost` when the process serving
a request is gone (killed, crashed, its node lost). The router core then runs the request
again on another replica, at most `router.replica_retries` times, as long as the caller has
been sent nothing of it yet: a stream before its first message, a unary call at any point
(its answer is sent whole at the end, so what the lost replica produced is dropped; the
caller is told by a `Restart` in the router's own event stream). Otherwise the call fails
`UNAVAILABLE` with `retry-after-ms`, never `INTERNAL`:

    ReplicaLost("replica ModelReplica#x7 went away during request r1 (ActorDiedError: ...)")
      .code, .retryable  ->  ("UNAVAILABLE", True)
"""

from __future__ import annotations

from dataclasses import dataclass

from ccoe_common.errors import CCoEError


class ReplicaLost(CCoEError):
    """The replica serving a request is gone; another replica may serve it."""

    code = "UNAVAILABLE"
    retryable = True

    def __init__(self, message: str, retry_after_s: float | None = None):
        self.retry_after_s = retry_after_s
        super().__init__(message)


@dataclass(frozen=True)
class Restart:
    """In the router's event stream for one request: everything it produced so far is void,
    the request runs again from the start (on another replica)."""

    reason: str
