"""The rule table: CCoE-25's rule-based gating, as a validated file.

The table is the mapping matrix M (which queries go to which experts); the insertion
positions P come from each expert's manifest, so rules name experts only. Example
(YAML; JSON with the same shape works too):

    version: 1
    default: {expert: null}            # null = the bare backbone, or a name: {expert: general}
    rules:
      - id: math
        priority: 10                   # higher first; ties keep file order
        match:
          domain: [math]               # the request's domain tag is one of these
          keywords: [integral, "how many"]   # any of these words/phrases, case-insensitive
        experts: [math]
      - id: sql-and-math
        match: {regex: ['\\bSELECT\\b.*\\bSUM\\('], tenant: [finance]}
        experts: [sql, math]           # several experts: "consult several at once" (fan-out)

Within `match`, every condition given must hold (AND); within one condition, any listed
value may (OR). A rule with no condition never matches (refused at load: it would shadow
everything below it). Conditions: domain, tenant, app (request metadata), keywords, regex.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ccoe_common.errors import CCoEError
from ccoe_common.experts.reference import NAME_RE


class RuleTableError(CCoEError, ValueError):
    """A rule table that cannot be loaded. `rule_id` names the rule ("" for table-level problems)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, rule_id: str, reason: str):
        self.rule_id, self.reason = rule_id, reason
        super().__init__(f"rule {rule_id!r}: {reason}" if rule_id else f"rule table: {reason}")


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: tuple[str, ...] = Field((), description="Domain tags; the request's tag must be one of them.")
    tenant: tuple[str, ...] = Field((), description="Values of the request metadata 'tenant'.")
    app: tuple[str, ...] = Field((), description="Values of the request metadata 'app'.")
    keywords: tuple[str, ...] = Field(
        (), description="Words or phrases, matched case-insensitively on word boundaries.")
    regex: tuple[str, ...] = Field((), description="Python regular expressions searched in the request text.")

    def empty(self) -> bool:
        return not (self.domain or self.tenant or self.app or self.keywords or self.regex)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64, description="Unique id, shown in route traces.")
    priority: int = Field(0, description="Higher priorities are tried first; ties keep file order.")
    match: Match
    experts: tuple[str, ...] = Field(description="Expert names to route to; several = fan-out.")
    description: str = Field("", description="Why this rule exists, for people.")


class DefaultRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: str | None = Field(None, description="Expert for unmatched requests; null = the bare backbone.")


class RuleTableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(1, ge=1, description="Revision of this table (the registry bumps it).")
    default: DefaultRoute = Field(default_factory=DefaultRoute)
    rules: tuple[Rule, ...] = ()

    @field_validator("rules", mode="before")
    @classmethod
    def _rules_list(cls, v: Any) -> Any:
        return () if v is None else v


@dataclass(frozen=True)
class RuleMatch:
    """What fired and why. Example: rule_id="math", reason="domain 'math' in [math]"."""

    rule_id: str
    experts: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    keyword_res: tuple[tuple[str, re.Pattern[str]], ...]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]


class RuleTable:
    """A loaded, validated table. Immutable: a reload builds a new one and swaps it in."""

    def __init__(self, spec: RuleTableSpec, known_experts: set[str] | None = None):
        self.spec = spec
        seen: set[str] = set()
        compiled = []
        for rule in spec.rules:
            if rule.id in seen:
                raise RuleTableError(rule.id, "duplicate rule id; ids must be unique")
            seen.add(rule.id)
            if not rule.experts:
                raise RuleTableError(rule.id, "experts is empty; name at least one expert")
            if len(set(rule.experts)) != len(rule.experts):
                raise RuleTableError(rule.id, f"experts lists a name twice: {list(rule.experts)}")
            if rule.match.empty():
                raise RuleTableError(rule.id, "match has no condition, so it would match every request; "
                                              "use `default` for a catch-all")
            for name in rule.experts:
                _check_expert(rule.id, name, known_experts)
            regexes = []
            for pattern in rule.match.regex:
                try:
                    regexes.append((pattern, re.compile(pattern, re.IGNORECASE)))
                except re.error as e:
                    raise RuleTableError(rule.id, f"regex {pattern!r} does not compile: {e}") from e
            keywords = tuple(
                (k, re.compile(rf"(?<!\w){re.escape(k)}(?!\w)", re.IGNORECASE)) for k in rule.match.keywords if k
            )
            compiled.append(_Compiled(rule, keywords, tuple(regexes)))
        if spec.default.expert is not None:
            _check_expert("default", spec.default.expert, known_experts)
        # Stable sort: equal priorities keep their order in the file.
        self._rules = sorted(compiled, key=lambda c: -c.rule.priority)

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def default_expert(self) -> str | None:
        return self.spec.default.expert

    def match(self, text: str, domain: str = "", metadata: dict[str, str] | None = None) -> RuleMatch | None:
        """The first rule (by priority) whose conditions all hold, or None."""
        metadata = metadata or {}
        for c in self._rules:
            reasons = _conditions_hold(c, text, domain, metadata)
            if reasons is not None:
                return RuleMatch(c.rule.id, c.rule.experts, "; ".join(reasons))
        return None

    def to_dict(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, known_experts: set[str] | None = None) -> RuleTable:
        if not isinstance(data, dict):
            raise RuleTableError("", f"expected a mapping with version, default and rules; got {type(data).__name__}")
        try:
            spec = RuleTableSpec.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = list(err["loc"])
            rule_id = ""
            if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
                raw_rules = data.get("rules") or []
                raw = raw_rules[loc[1]] if loc[1] < len(raw_rules) else {}
                rule_id = str(raw.get("id", f"#{loc[1]}")) if isinstance(raw, dict) else f"#{loc[1]}"
                loc = loc[2:]
            where = ".".join(map(str, loc)) or "rule"
            raise RuleTableError(rule_id, f"{where}: {err['msg']}") from e
        return cls(spec, known_experts)

    @classmethod
    def from_text(cls, text: str, known_experts: set[str] | None = None) -> RuleTable:
        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as e:
            raise RuleTableError("", f"not valid YAML/JSON: {e}") from e
        return cls.from_dict(data, known_experts)

    @classmethod
    def from_file(cls, path: str | Path, known_experts: set[str] | None = None) -> RuleTable:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise RuleTableError("", f"cannot read {path}: {e.strerror}") from e
        return cls.from_text(text, known_experts)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _check_expert(rule_id: str, name: str, known: set[str] | None) -> None:
    if not NAME_RE.match(name):
        raise RuleTableError(rule_id, f"expert name {name!r} is not a valid expert name")
    if known is not None and name not in known:
        raise RuleTableError(rule_id, f"unknown expert {name!r}; known experts: {sorted(known) or 'none'}")


def _conditions_hold(c: _Compiled, text: str, domain: str, metadata: dict[str, str]) -> list[str] | None:
    m = c.rule.match
    reasons = []
    if m.domain:
        if domain not in m.domain:
            return None
        reasons.append(f"domain {domain!r} in {list(m.domain)}")
    for key, allowed in (("tenant", m.tenant), ("app", m.app)):
        if allowed:
            value = metadata.get(key, "")
            if value not in allowed:
                return None
            reasons.append(f"{key} {value!r} in {list(allowed)}")
    if c.keyword_res:
        hit = next((k for k, rx in c.keyword_res if rx.search(text)), None)
        if hit is None:
            return None
        reasons.append(f"keyword {hit!r}")
    if c.regexes:
        hit = next((p for p, rx in c.regexes if rx.search(text)), None)
        if hit is None:
            return None
        reasons.append(f"regex /{hit}/")
    return reasons
