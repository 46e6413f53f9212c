"""Rule table validation and matching; route decisions."""

from __future__ import annotations

import pytest

from ccoe_common.errors import InvalidRequest, Unimplemented
from ccoe_common.routing.resolve import RouteQuery, decide
from ccoe_common.routing.rules import RuleTable, RuleTableError

TABLE = """
version: 3
default: {expert: general}
rules:
  - id: sql-finance
    priority: 20
    match: {regex: ['\\bSELECT\\b'], tenant: [finance]}
    experts: [sql, math]
  - id: math
    priority: 10
    match: {domain: [math]}
    experts: [math]
  - id: math-words
    priority: 10
    match: {keywords: [integral, "how many"]}
    experts: [math]
  - id: sql
    match: {regex: ['\\bSELECT\\b.*\\bFROM\\b']}
    experts: [sql]
"""
KNOWN = {"math", "sql", "general"}


@pytest.fixture(scope="module")
def table() -> RuleTable:
    return RuleTable.from_text(TABLE, KNOWN)


def test_priority_order_and_reasons(table):
    hit = table.match("SELECT a FROM t", metadata={"tenant": "finance"})
    assert (hit.rule_id, hit.experts) == ("sql-finance", ("sql", "math"))
    assert hit.reason == "tenant 'finance' in ['finance']; regex /\\bSELECT\\b/"
    assert table.match("SELECT a FROM t").rule_id == "sql"
    assert table.match("How many apples?", domain="math").rule_id == "math"  # file order breaks the tie
    assert table.match("How many apples?").reason == "keyword 'how many'"
    assert table.match("the integrals") is None  # keywords match whole words only
    assert table.match("nothing here") is None


def test_decisions_follow_explicit_rules_default(table):
    assert decide(RouteQuery("x", expert="law", version=2), table).experts == (("law", 2),)
    assert decide(RouteQuery("x", mode="RULES", expert="law", domain="math"), table).rule_id == "math"
    route = decide(RouteQuery("plain text"), table)
    assert (route.policy, route.experts) == ("default", (("general", None),))
    assert "no rule matched (table v3)" in route.reason
    assert decide(RouteQuery("SELECT 1 FROM t", metadata={"tenant": "finance"}), table).fans_out
    with pytest.raises(InvalidRequest, match="routing mode EXPERT needs expert.name"):
        decide(RouteQuery("x", mode="EXPERT"), table)
    with pytest.raises(Unimplemented):
        decide(RouteQuery("x", mode="PLAN"), table)


def test_backbone_mode_skips_the_expert_rules_and_default(table):
    # The table's default is an expert ('general') and a rule matches: BACKBONE still means none.
    route = decide(RouteQuery("How many apples?", mode="BACKBONE", expert="law", domain="math"), table)
    assert (route.policy, route.experts, route.reason) == ("explicit", (), "request asked for the bare backbone")


def test_backbone_default():
    table = RuleTable.from_text("rules: []")
    assert decide(RouteQuery("x"), table).experts == ()


@pytest.mark.parametrize(("text", "rule_id", "reason"), [
    ("rules: [{id: a, match: {domain: [x]}, experts: [nope]}]", "a", "unknown expert 'nope'; known experts"),
    ("rules: [{id: a, match: {regex: ['(']}, experts: [math]}]", "a", "regex '(' does not compile"),
    ("rules: [{id: a, match: {domain: [x]}, experts: [math]}, {id: a, match: {domain: [y]}, experts: [sql]}]",
     "a", "duplicate rule id"),
    ("rules: [{id: a, match: {domain: [x]}, experts: []}]", "a", "experts is empty"),
    ("rules: [{id: a, match: {}, experts: [math]}]", "a", "match has no condition"),
    ("rules: [{id: b, match: {domian: [x]}, experts: [math]}]", "b", "match.domian: Extra inputs"),
    ("rules: [{match: {domain: [x]}, experts: [math]}]", "#0", "id: Field required"),
    ("default: {expert: ghost}", "default", "unknown expert 'ghost'"),
    ("rules: [", "", "not valid YAML"),
    ("- just a list", "", "expected a mapping"),
])
def test_bad_tables_are_refused_with_rule_id_and_reason(text, rule_id, reason):
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_text(text, KNOWN)
    assert err.value.rule_id == rule_id and reason in str(err.value)


def test_json_works_too():
    t = RuleTable.from_text('{"rules": [{"id": "m", "match": {"domain": ["math"]}, "experts": ["math"]}]}', KNOWN)
    assert t.match("", domain="math").rule_id == "m"
    assert RuleTable.from_text(t.dumps(), KNOWN).to_dict() == t.to_dict()
