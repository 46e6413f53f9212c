"""The check every gRPC (and HTTP) call passes at the app's edge: who is calling, may they
call this method, as which tenant, and within their rate.

    guard = Guard.from_config(config.auth)
    principal = guard.check("ccoe.v1.Registry/PushExpert", {"authorization": "Bearer ccoe_..."})
    principal.name   # "ops-alice": what the audit log records, whatever the request claims

Health checks and reflection never reach it: they stay open for probes and tools.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from ccoe_common.auth.config import NO_AUTH_SECTION, AuthConfig
from ccoe_common.auth.errors import PermissionDenied, Unauthenticated
from ccoe_common.auth.ratelimit import RateLimiter
from ccoe_common.auth.tokens import ROLES, Principal, TokenTable

log = logging.getLogger(__name__)

INFERENCE = "ccoe.v1.Inference"
REGISTRY = "ccoe.v1.Registry"
# Every method of our services and the one role that may call it. Roles do not imply each other.
METHOD_ROLES: dict[str, str] = {
    f"{INFERENCE}/Generate": "inference",
    f"{INFERENCE}/GenerateStream": "inference",
    **{f"{REGISTRY}/{m}": "admin" for m in (
        "PushExpert", "UploadArtifact", "PopExpert", "ListExperts", "GetExpert", "GetRules", "SetRules",
        "StartRollout", "GetRollout", "Rollback", "ListAudit")},
    # The control plane's own calls: a replica following the desired state and reporting back.
    f"{REGISTRY}/WatchDesiredState": "replica",
    f"{REGISTRY}/ReportReplicaState": "replica",
}
ANONYMOUS = Principal("anonymous", frozenset(ROLES))  # auth mode none: everyone may do everything
REPLICA_PRINCIPAL = "ccoe-replica"
RELOAD_CHECK_S = 1.0  # how often a changed tokens file is noticed (rotation without a restart)
MAX_TOKEN_CHARS = 512


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None if there is none."""
    value = metadata.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated(f"the bearer token has {len(token)} characters; tokens are at most {MAX_TOKEN_CHARS}")
    return token


class Guard:
    def __init__(self, config: AuthConfig):
        self.config = config
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit is not None else None
        self._lock = threading.Lock()
        self._table: TokenTable | None = None
        self._stamp: tuple[tuple[float, int], ...] | None = None
        self._next_check = 0.0
        self._replica_token: str | None = None
        self._files = [f for f in (config.tokens_file, config.session_tokens_file) if f]
        if config.mode == "token":
            if not self._files:
                raise ValueError("auth.mode token needs auth.tokens_file, a YAML list of {name, sha256, roles}; "
                                 "mint tokens with `ccoe auth token` (only the local stack mints its own)")
            self._reload(force=True)  # a broken tokens file stops the app at start, not at the first call
            if config.replica_token_file:
                with open(config.replica_token_file, encoding="utf-8") as f:
                    self._replica_token = f.read().strip() or None

    @classmethod
    def from_config(cls, config: AuthConfig | None) -> Guard:
        if config is None:
            raise ValueError(NO_AUTH_SECTION)
        return cls(config)

    @property
    def enabled(self) -> bool:
        return self.config.mode == "token"

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_S
        stamps = []
        for path in self._files:
            st = os.stat(path)
            stamps.append((st.st_mtime, st.st_size))
        stamp = tuple(stamps)
        if stamp == self._stamp and not force:
            return
        try:
            table = TokenTable([e for path in self._files for e in TokenTable.from_file(path).entries])
        except Exception:
            if self._table is None:
                raise
            log.error("tokens file(s) %s changed but were refused; keeping the %d principals in force",
                      ", ".join(self._files), len(self._table.entries), exc_info=True)
            self._stamp = stamp
            return
        self._table, self._stamp = table, stamp
        log.info("tokens file(s) %s: %d principals", ", ".join(self._files), len(table.entries))

    def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("no credential: send `authorization: Bearer <token>` metadata "
                                  "(the ccoe command reads CCOE_TOKEN or --token-file)")
        with self._lock:
            try:
                self._reload()
            except OSError as e:
                log.error("tokens file unreadable (%s); keeping the principals in force", e)
            table = self._table
        principal = table.lookup(token) if table is not None else None
        if principal is None and self._replica_token is not None and hmac.compare_digest(
                token.encode(), self._replica_token.encode()):
            principal = Principal(REPLICA_PRINCIPAL, frozenset({"replica"}))
        if principal is None:
            raise Unauthenticated("the bearer token matches no principal; mint one with `ccoe auth token`")
        return principal

    def check(self, method: str, metadata: Mapping[str, str]) -> Principal:
        """The caller of `method` (a full name like "ccoe.v1.Registry/PushExpert"), or a refusal:
        Unauthenticated, PermissionDenied, or RateLimited."""
        role = METHOD_ROLES.get(method)
        if role is None:
            raise PermissionDenied(f"method {method!r} is not one this server authorizes")
        principal = self.authenticate(metadata)
        if role not in principal.roles:
            raise PermissionDenied(f"principal {principal.name!r} has role(s) {sorted(principal.roles)}; "
                                   f"{method} needs role {role!r}")
        if self.limiter is not None and self.enabled and role != "replica":
            self.limiter.take(principal.name)
        return principal

    def bind_tenant(self, principal: Principal, request_metadata: MutableMapping[str, str]) -> None:
        """Stamp the tenant the credential vouches for into a request's metadata map (what rules see)."""
        tenant = self.tenant_for(principal, request_metadata.get("tenant"))
        if tenant is not None:
            request_metadata["tenant"] = tenant

    def stamp_who(self, principal: Principal, request: Any) -> None:
        """The audit log's `who` is the authenticated principal, whatever the request claims. With
        auth off nobody is authenticated, and the log says so next to the claim."""
        if "who" not in request.DESCRIPTOR.fields_by_name:
            return
        if self.enabled:
            request.who = principal.name
        else:
            request.who = f"unauthenticated ({request.who[:64]})" if request.who else "unauthenticated"

    @staticmethod
    def tenant_for(principal: Principal, requested: str | None) -> str | None:
        """The tenant a request acts as: the one it names, if the credential allows it; else the
        credential's first tenant. A credential bound to no tenant lets the request name any."""
        if not principal.tenants:
            return requested or None
        if not requested:
            return principal.tenants[0]
        if requested not in principal.tenants:
            raise PermissionDenied(f"principal {principal.name!r} may act as tenant(s) {list(principal.tenants)}, "
                                   f"not {requested[:64]!r}")
        return requested
