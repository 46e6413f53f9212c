"""Expert kinds. A new kind is a new module here plus one line in KINDS."""

from __future__ import annotations

from ccoe_common.model.kinds.base import ExpertKind
from ccoe_common.model.kinds.ffn import FfnKind
from ccoe_common.model.kinds.trailing import TrailingKind

KINDS: dict[str, ExpertKind] = {k.name: k for k in (FfnKind(), TrailingKind())}


def get_kind(name: str) -> ExpertKind:
    """The kind called `name`; raises KeyError naming the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown expert kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None


__all__ = ["KINDS", "ExpertKind", "get_kind"]
