"""How callers name experts: by name and version, and where an artifact lives."""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


@dataclass(frozen=True, order=True)
class ExpertKey:
    """A resident expert version, e.g. ExpertKey("math", 2). Printed as "math@2"."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> tuple[str, int | None]:
        """"math@2" -> ("math", 2); "math" -> ("math", None) meaning the newest version."""
        name, sep, version = text.partition("@")
        if not sep:
            return name, None
        try:
            return name, int(version)
        except ValueError:
            raise ValueError(f"expert reference {text!r}: version after '@' must be an integer") from None


@dataclass(frozen=True)
class ExpertRef:
    """An expert version and the artifact URI it was (or will be) loaded from."""

    key: ExpertKey
    uri: str
