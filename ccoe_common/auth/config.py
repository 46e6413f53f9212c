"""The `auth` section of the app config.

    auth: {mode: token, tokens_file: /etc/ccoe/tokens/tokens.yaml}
    auth: {mode: token}         # local stack only: it mints an admin and an inference token per run
    auth: {mode: none}          # explicit: anyone who reaches the port may call anything

The tokens file is a YAML list of `{name, sha256, roles, tenants?}`: only hashes on disk.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ccoe_common.auth.ratelimit import RateLimit

NO_AUTH_SECTION = ("the app config has no auth section: choose `auth: {mode: token, tokens_file: PATH}` (the local "
                   "stack also takes `auth: {mode: token}` and mints tokens for its run) or, explicitly, "
                   "`auth: {mode: none}`; see docs/security.md")


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["token", "none"] = Field(
        description="token: every call carries `authorization: Bearer <token>`; none: no authentication "
                    "(choose it explicitly, e.g. for a stack on loopback only).")
    tokens_file: str | None = Field(
        None, description="YAML list of {name, sha256, roles, tenants?} (mode token); on Kubernetes a file "
                          "mounted from a Secret.")
    session_tokens_file: str | None = Field(
        None, description="A second tokens file, written by the local stack (`ccoe serve`, `ccoe demo`) with the "
                          "tokens it mints for one run; read like tokens_file.")
    replica_token_file: str | None = Field(
        None, description="File holding the credential of the app's own routers and replicas (role replica); "
                          "default: the app mints one when it is built. On Kubernetes a file mounted from a "
                          "Secret, so that every pod of the release shares it.")
    rate_limit: RateLimit | None = Field(
        None, description="Token bucket per principal, e.g. {requests_per_s: 20, burst: 40}; none = unlimited. "
                          "Each router process keeps its own buckets.")

    @field_validator("tokens_file", "session_tokens_file", "replica_token_file")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        return None if v is None else os.path.expanduser(v)

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        # mode token with no file is valid here: the local stack adds its session file at start,
        # and the app refuses to start if there is still no file to read.
        if self.mode == "none" and (self.tokens_file or self.session_tokens_file or self.replica_token_file):
            raise ValueError("auth.mode none takes no tokens_file or replica_token_file; use mode token")
        return self
