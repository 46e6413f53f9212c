"""Picking the route of one request: explicit expert, then the rule table, then the default.

    decide(RouteQuery(text="∫ x dx", domain="math"), table) ->
        Route(policy="rules", rule_id="math", reason="domain 'math' in ['math']", experts=(("math", None),))

Versions stay None here ("newest"); the replica pins the concrete version when it accepts
the request, and the route trace reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ccoe_common.errors import InvalidRequest, Unimplemented
from ccoe_common.routing.rules import RuleTable

Mode = Literal["AUTO", "RULES", "EXPERT", "PLAN", "BACKBONE"]


@dataclass(frozen=True)
class RouteQuery:
    text: str
    mode: Mode = "AUTO"
    expert: str | None = None  # explicit name
    version: int | None = None
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    policy: Literal["explicit", "rules", "default"]
    rule_id: str
    reason: str
    experts: tuple[tuple[str, int | None], ...]  # empty = bare backbone

    @property
    def fans_out(self) -> bool:
        return len(self.experts) > 1


def decide(query: RouteQuery, table: RuleTable) -> Route:
    if query.mode == "PLAN":
        raise Unimplemented("routing mode PLAN (expert planning) is not served yet; use AUTO, RULES or EXPERT")
    if query.mode == "BACKBONE":
        return Route("explicit", "", "request asked for the bare backbone", ())
    if query.mode == "EXPERT" and not query.expert:
        raise InvalidRequest("expert", "routing mode EXPERT needs expert.name")
    if query.expert and query.mode in ("AUTO", "EXPERT"):
        return Route("explicit", "", f"request named expert {query.expert!r}", ((query.expert, query.version),))
    hit = table.match(query.text, query.domain, query.metadata)
    if hit is not None:
        return Route("rules", hit.rule_id, hit.reason, tuple((name, None) for name in hit.experts))
    default = table.default_expert
    reason = f"no rule matched (table v{table.version}); default route"
    return Route("default", "", reason, ((default, None),) if default else ())
