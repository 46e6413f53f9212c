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

Matching never hangs the router (invariant 9). Regular expressions run on RE2, whose matching
time is linear in the text whatever the pattern: Python's `re` backtracks, and `^(a+)+$`
against 27 `a`s and a `b` froze a router for 6.8 s, doubling with each extra `a`. RE2 has no
backreferences and no lookarounds; a pattern using them is refused at load, saying so. RE2's
`\\b`, `\\w` and `\\d` are ASCII; case-insensitivity is Unicode. A table set through the
registry also obeys `RuleLimits` (rules, values and regexes per rule, lengths, nesting depth),
so one request costs at most rules x (regexes + 1) linear scans of its text (`ccoe bench rules`
measures it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ccoe_common.errors import CCoEError, quote
from ccoe_common.experts.reference import NAME_RE

# libyaml's parser when PyYAML was built with it (its wheels are): the pure-Python scanner
# takes time quadratic in the nesting depth (1.4 s for 1,000 nested '[', 14.5 s for 4,000),
# while libyaml is linear and stops at 1,000 levels by itself.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RE2_MAX_MEM = 8 << 20  # per pattern; a pattern RE2 cannot compile within it is refused
# Python's \w for str is [\p{L}\p{N}_] (str.isalnum() or "_"); keywords keep that boundary.
_NOT_WORD = r"[^\pL\pN_]"


def _re2_options(capture: bool) -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.never_capture = not capture
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False  # a refused pattern is reported to the caller, not to stderr
    return options


_REGEX_OPTIONS = _re2_options(capture=False)
_KEYWORD_OPTIONS = _re2_options(capture=True)
REGEX_ENGINE: type = type(re2.compile("", _REGEX_OPTIONS))
"""The type every rule regex is compiled to (RE2's); tests check it."""


class RuleTableError(CCoEError, ValueError):
    """A rule table that cannot be loaded. `rule_id` names the rule ("" for table-level problems)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, rule_id: str, reason: str):
        self.rule_id, self.reason = rule_id, reason
        super().__init__(f"rule {quote(rule_id)}: {reason}" if rule_id else f"rule table: {reason}")


class RuleLimits(BaseModel):
    """How big a rule table set through the registry may be; each refusal names the limit,
    e.g. "rule 'sql': regex 'SELECT …' (600 characters) is longer than
    registry.rule_limits.max_regex_chars (512 characters)"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rules: int = Field(256, ge=1, le=10_000, description="Most rules in one table.")
    max_values_per_condition: int = Field(64, ge=1, le=10_000,
                                          description="Most values in one domain, tenant, app or keywords list.")
    max_value_chars: int = Field(128, ge=1, le=4096, description="Longest domain, tenant, app value or keyword.")
    max_regexes_per_rule: int = Field(16, ge=1, le=1000, description="Most regular expressions in one rule.")
    max_regex_chars: int = Field(512, ge=1, le=65536, description="Longest regular expression.")
    max_depth: int = Field(8, ge=4, le=64, description="Deepest nesting of the table document (a normal table "
                                                        "has 5 levels: table, rules, rule, match, list).")


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: tuple[str, ...] = Field((), description="Domain tags; the request's tag must be one of them.")
    tenant: tuple[str, ...] = Field((), description="Values of the request metadata 'tenant'.")
    app: tuple[str, ...] = Field((), description="Values of the request metadata 'app'.")
    keywords: tuple[str, ...] = Field(
        (), description="Words or phrases, matched case-insensitively on word boundaries.")
    regex: tuple[str, ...] = Field((), description="RE2 regular expressions searched in the request text "
                                                    "(case-insensitive; no backreferences or lookarounds).")

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
    keywords: tuple[str, ...]  # non-empty keywords, in file order: group i+1 of keyword_re is keywords[i]
    keyword_re: Any  # RE2, all keywords of the rule in one pattern; None without keywords
    regexes: tuple[tuple[str, Any], ...]  # (pattern as written, RE2)


def _compile_regex(rule_id: str, pattern: str) -> Any:
    try:
        return re2.compile(pattern, _REGEX_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError):
            raise RuleTableError(rule_id, f"regex {quote(pattern)} does not compile: {reason}") from e
        raise RuleTableError(rule_id, f"regex {quote(pattern)} is refused: {reason}. Rules run on RE2, which "
                                      "matches in time linear in the text; it has no backreferences (\\1), "
                                      "lookarounds ((?=…), (?!…), (?<=…), (?<!…)), atomic groups or possessive "
                                      "quantifiers: rewrite the pattern without them") from e


def _compile_keywords(rule_id: str, keywords: tuple[str, ...]) -> Any:
    """One RE2 pattern for all of a rule's keywords: a scan of the text per rule, not per keyword.
    Each keyword is a literal between non-word characters (or the text's ends), the boundary
    Python's `(?<!\\w)keyword(?!\\w)` draws, and is its own group so a match names it; at one
    position the first keyword in file order wins."""
    if not keywords:
        return None
    alternatives = "|".join(f"({re2.escape(k)})" for k in keywords)
    try:
        return re2.compile(f"(?:^|{_NOT_WORD})(?:{alternatives})(?:{_NOT_WORD}|$)", _KEYWORD_OPTIONS)
    except re2.error as e:
        raise RuleTableError(rule_id, f"keywords do not fit in one pattern of {_RE2_MAX_MEM >> 20} MiB; "
                                      "use fewer or shorter keywords") from e


def _check_limits(spec: RuleTableSpec, limits: RuleLimits) -> None:
    where = "registry.rule_limits"
    if len(spec.rules) > limits.max_rules:
        raise RuleTableError("", f"has {len(spec.rules)} rules; {where}.max_rules is {limits.max_rules}")
    for rule in spec.rules:
        m = rule.match
        for name, values in (("domain", m.domain), ("tenant", m.tenant), ("app", m.app), ("keywords", m.keywords)):
            if len(values) > limits.max_values_per_condition:
                raise RuleTableError(rule.id, f"match.{name} has {len(values)} values; "
                                              f"{where}.max_values_per_condition is {limits.max_values_per_condition}")
            for value in values:
                if len(value) > limits.max_value_chars:
                    raise RuleTableError(rule.id, f"match.{name} value {quote(value, 32)} is longer than "
                                                  f"{where}.max_value_chars ({limits.max_value_chars} characters)")
        if len(m.regex) > limits.max_regexes_per_rule:
            raise RuleTableError(rule.id, f"match.regex has {len(m.regex)} patterns; "
                                          f"{where}.max_regexes_per_rule is {limits.max_regexes_per_rule}")
        for pattern in m.regex:
            if len(pattern) > limits.max_regex_chars:
                raise RuleTableError(rule.id, f"regex {quote(pattern, 32)} is longer than "
                                              f"{where}.max_regex_chars ({limits.max_regex_chars} characters)")


class RuleTable:
    """A loaded, validated table. Immutable: a reload builds a new one and swaps it in.
    `limits` applies to tables from clients (SetRules); files and tables the registry already
    accepted are loaded without them."""

    def __init__(self, spec: RuleTableSpec, known_experts: set[str] | None = None,
                 limits: RuleLimits | None = None):
        self.spec = spec
        if limits is not None:
            _check_limits(spec, limits)
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
            if "" in rule.match.keywords:
                raise RuleTableError(rule.id, "match.keywords holds an empty string, which would match every text")
            regexes = tuple((pattern, _compile_regex(rule.id, pattern)) for pattern in rule.match.regex)
            keywords = rule.match.keywords
            compiled.append(_Compiled(rule, keywords, _compile_keywords(rule.id, keywords), regexes))
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

    def regexes(self, rule_id: str) -> tuple[Any, ...]:
        """The compiled regular expressions of one rule (each a REGEX_ENGINE)."""
        return next(tuple(rx for _, rx in c.regexes) for c in self._rules if c.rule.id == rule_id)

    def match(self, text: str, domain: str = "", metadata: dict[str, str] | None = None) -> RuleMatch | None:
        """The first rule (by priority) whose conditions all hold, or None."""
        metadata = metadata or {}
        # RE2 works on UTF-8; encoding once here, not in every search, saves a copy of the
        # text per pattern (the wrapper encodes a str on each call).
        data = text.encode("utf-8", "surrogatepass")
        for c in self._rules:
            reasons = _conditions_hold(c, data, domain, metadata)
            if reasons is not None:
                return RuleMatch(c.rule.id, c.rule.experts, "; ".join(reasons))
        return None

    def to_dict(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, known_experts: set[str] | None = None,
                  limits: RuleLimits | None = None) -> RuleTable:
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
            if len(where) > 100:  # a key of the table's own (an unknown field) can be any length
                where = where[:100] + "…"
            raise RuleTableError(rule_id, f"{where}: {err['msg']}") from e
        return cls(spec, known_experts, limits)

    @classmethod
    def from_text(cls, text: str, known_experts: set[str] | None = None,
                  limits: RuleLimits | None = None) -> RuleTable:
        data = load_table_text(text, (limits or RuleLimits()).max_depth)
        return cls.from_dict(data, known_experts, limits)

    @classmethod
    def from_file(cls, path: str | Path, known_experts: set[str] | None = None) -> RuleTable:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise RuleTableError("", f"cannot read {path}: {e.strerror}") from e
        return cls.from_text(text, known_experts)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_table_text(text: str, max_depth: int) -> Any:
    """A table's YAML or JSON text as plain data (dicts, lists, strings, numbers, booleans,
    None). Refused with RuleTableError before anything is built: nesting deeper than
    `max_depth` (a thousand nested '[' made the composer raise RecursionError, an INTERNAL),
    YAML aliases (a few lines of them expand into gigabytes once the table is copied or
    serialised), and values JSON cannot hold (timestamps, binary)."""
    if not text.strip():
        return {}
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise RuleTableError("", f"uses the YAML alias *{event.anchor}; write the value out (aliases are "
                                         "refused: they multiply a table's size)")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise RuleTableError("", f"nests deeper than {max_depth} levels (registry.rule_limits.max_depth); "
                                             "a table needs 5: table, rules, rule, match, list")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: CSafeLoader or SafeLoader
    except yaml.YAMLError as e:
        raise RuleTableError("", f"not valid YAML/JSON: {_short_yaml_error(e)}") from e
    _check_plain(data, "table")
    return data


def _short_yaml_error(error: yaml.YAMLError) -> str:
    # PyYAML's messages quote the offending line; a table's line can be megabytes long.
    return quote(" ".join(str(error).split()), 300)


def _check_plain(data: Any, where: str) -> None:
    """Only what JSON can hold, so the registry can store the table as JSON."""
    stack = [(data, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise RuleTableError("", f"{at}: key {quote(k)} is a {type(k).__name__}; keys must be strings")
                stack.append((v, f"{at}.{k}"))
        elif isinstance(value, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))
        elif not (value is None or isinstance(value, (str, int, float, bool))):
            raise RuleTableError("", f"{at}: {type(value).__name__} values are not allowed (quote it to make it a "
                                     "string)")


def _check_expert(rule_id: str, name: str, known: set[str] | None) -> None:
    if not NAME_RE.match(name):
        raise RuleTableError(rule_id, f"expert name {name!r} is not a valid expert name")
    if known is not None and name not in known:
        raise RuleTableError(rule_id, f"unknown expert {name!r}; known experts: {sorted(known) or 'none'}")


def _conditions_hold(c: _Compiled, text: bytes, domain: str, metadata: dict[str, str]) -> list[str] | None:
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
    if c.keyword_re is not None:
        found = c.keyword_re.search(text)
        if found is None:
            return None
        hit = next(k for k, g in zip(c.keywords, found.groups(), strict=True) if g is not None)
        reasons.append(f"keyword {hit!r}")
    if c.regexes:
        matched = next((p for p, rx in c.regexes if rx.search(text)), None)
        if matched is None:
            return None
        hit = matched
        reasons.append(f"regex /{hit}/")
    return reasons
