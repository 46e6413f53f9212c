"""Bearer tokens and the principals they stand for.

The tokens file holds only SHA-256 hashes, so a leaked file grants nothing:

    - name: ops-alice
      sha256: 3c9a...e1            # lowercase hex SHA-256 of the token's UTF-8 bytes
      roles: [admin]
    - name: helpdesk-app
      sha256: 91b0...7f
      roles: [inference]
      tenants: [acme]              # may only send requests as tenant acme

Roles do not imply each other: a principal that needs to infer and to administer gets both.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ccoe_common.auth.errors import TokensFileError

Role = Literal["inference", "admin", "replica"]
ROLES: tuple[Role, ...] = ("inference", "admin", "replica")
TOKEN_PREFIX = "ccoe_"  # makes a leaked token easy to find with a secret scanner
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling, as vouched for by a credential, e.g.
    Principal("helpdesk-app", frozenset({"inference"}), ("acme",))."""

    name: str
    roles: frozenset[str]
    tenants: tuple[str, ...] = ()  # empty: any tenant


def token_hash(token: str) -> str:
    """The lowercase hex SHA-256 of the token's UTF-8 bytes: what the tokens file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mint_token() -> str:
    """A new random token, e.g. "ccoe_Yc3...": 256 bits from the OS's CSPRNG."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The principal's name, written to the audit log, e.g. 'ops-alice'.")
    sha256: str = Field(description="Lowercase hex SHA-256 of the token's UTF-8 bytes.")
    roles: tuple[Role, ...] = Field(min_length=1, description="Any of inference, admin, replica.")
    tenants: tuple[str, ...] = Field((), description="If set, the only tenants this token may act as; "
                                                     "the first is used when a request names none.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-128 characters of letters, digits and ._@:- starting with a letter or digit")
        return v

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("must be 64 lowercase hex digits (the SHA-256 of the token, not the token itself)")
        return v

    def line(self) -> str:
        """The entry as one YAML list item, to paste into a tokens file."""
        tenants = f", tenants: [{', '.join(self.tenants)}]" if self.tenants else ""
        return f"- {{name: {self.name}, sha256: {self.sha256}, roles: [{', '.join(self.roles)}]{tenants}}}"


class TokenTable:
    """The principals a server accepts, by token hash. Lookups compare every entry in
    constant time, so response timing does not tell how much of a hash matched."""

    def __init__(self, entries: list[TokenEntry]):
        names: set[str] = set()
        hashes: set[str] = set()
        for e in entries:
            if e.name in names:
                raise TokensFileError(f"tokens file: principal {e.name!r} appears twice; names must be unique")
            if e.sha256 in hashes:
                raise TokensFileError(f"tokens file: principal {e.name!r} has the same token hash as another; "
                                      "mint a separate token per principal")
            names.add(e.name)
            hashes.add(e.sha256)
        self.entries = tuple(entries)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TokensFileError(f"cannot read tokens file {path}: {e.strerror}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise TokensFileError(f"tokens file {path} is not valid YAML: {e}") from e
        if data is None:
            data = []
        if not isinstance(data, list):
            raise TokensFileError(f"tokens file {path} must be a YAML list of {{name, sha256, roles, tenants?}}, "
                                  f"got a {type(data).__name__}")
        entries = []
        for i, item in enumerate(data):
            try:
                entries.append(TokenEntry.model_validate(item))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(map(str, err["loc"])) or "entry"
                raise TokensFileError(f"tokens file {path}, entry {i}: {where}: {err['msg']}") from e
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        digest = token_hash(token).encode()
        found = None
        for e in self.entries:  # no early exit: every lookup costs the same
            if hmac.compare_digest(digest, e.sha256.encode()):
                found = e
        if found is None:
            return None
        return Principal(found.name, frozenset(found.roles), found.tenants)
