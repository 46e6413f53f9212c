"""Per-principal request budgets: a token bucket each, refilled continuously.

    limiter = RateLimiter(RateLimit(requests_per_s=5, burst=10))
    limiter.take("helpdesk-app")   # raises RateLimited("... retry in 0.20s") when the bucket is empty
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from ccoe_common.auth.errors import RateLimited


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: float = Field(gt=0, le=1e6, description="Sustained calls per second per principal.")
    burst: int = Field(ge=1, le=1_000_000, description="Calls a principal may make at once after idling.")


class RateLimiter:
    """One bucket per principal name. Each router process keeps its own buckets, so with R
    routers a principal's budget is at most R times the configured rate."""

    MAX_PRINCIPALS = 100_000  # buckets are only made for authenticated names: bounded by the tokens file

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, principal: str) -> None:
        rate, burst = self.limit.requests_per_s, float(self.limit.burst)
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(principal, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[principal] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimited(f"principal {principal!r} is over its rate limit of {rate:g} requests/s "
                                  f"(burst {self.limit.burst}); retry in {wait:.2f}s", retry_after_s=wait)
            if len(self._buckets) >= self.MAX_PRINCIPALS and principal not in self._buckets:
                self._buckets.clear()  # a full table forgets idle budgets rather than growing
            self._buckets[principal] = (tokens - 1.0, now)
