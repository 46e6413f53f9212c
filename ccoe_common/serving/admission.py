"""Admission: how many engine requests one router lets through to the replicas at once.

Behind the router, Ray Serve queues a call without limit when every replica is at its
`max_ongoing_requests`; with 1,000 concurrent streams against a smaller fleet, accepted
requests waited up to 45 s for a first token and refusals came as late. The router therefore
counts what it has in flight against a bound derived from the replicas' capacity
(`AppConfig.admission_bound`) and refuses the rest at once, with retry advice:

    admission = Admission(limit=8, retry_after_s=0.5)
    with admission.hold(2):      # a call that fans out to two experts takes two places
        ...                      # stream from the replicas
    # a call while 8 are held: RouterOverloaded, RESOURCE_EXHAUSTED, retry_after_s=0.5

The counter lives on the router's event loop (one thread), so it needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ccoe_common.errors import CCoEError


class RouterOverloaded(CCoEError):
    """The router holds as many engine requests as the replicas can take; retry later."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Admission:
    def __init__(self, limit: int, retry_after_s: float):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.admitted = 0  # calls let through, since start
        self.refused = 0  # calls refused, since start

    @contextmanager
    def hold(self, places: int = 1) -> Iterator[None]:
        """Take `places` for the duration of the block, or raise RouterOverloaded at once."""
        if self.in_flight + places > self.limit:
            self.refused += 1
            raise RouterOverloaded(
                f"the router is at capacity: {self.in_flight} engine requests in flight, this call needs "
                f"{places} more, the bound is {self.limit} (router.max_in_flight, by default the replicas' "
                f"max_running + max_waiting); retry in {self.retry_after_s:g}s", self.retry_after_s)
        self.in_flight += places
        self.admitted += 1
        try:
            yield
        finally:
            self.in_flight -= places
