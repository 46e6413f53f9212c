"""The zoo's synthetic domains, by name."""

from __future__ import annotations

from ccoe_common.zoo.domains.arith import Arithmetic
from ccoe_common.zoo.domains.base import Domain, Problem, last_number
from ccoe_common.zoo.domains.sql import TextToSQL
from ccoe_common.zoo.domains.units import Units

DOMAINS: dict[str, type[Domain]] = {"arith": Arithmetic, "sql": TextToSQL, "units": Units}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]()


__all__ = ["DOMAINS", "Domain", "Problem", "get_domain", "last_number"]
