"""Ray's own token authentication for the clusters the product starts itself.

Ray 2.60 reads RAY_AUTH_MODE once, when `ray` is imported, and its processes then need a token
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). So this must run before anything
imports ray: the local stack calls it on start, and the test suite at the top of conftest.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

log = logging.getLogger(__name__)


def enable_ray_token_auth() -> bool:
    """Turn Ray's token auth on for the Ray this process will start, with a random token for
    this process and its children; True if token auth is (or already was) on. An explicit
    RAY_AUTH_MODE is left as the caller chose it."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return mode == "token"
    if "ray" in sys.modules:
        log.warning("ray was imported before the local stack started, so Ray's auth mode is already fixed (off); "
                    "set RAY_AUTH_MODE=token before importing ray to turn Ray's own token auth on")
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return True
