"""Rules that cannot hang the router: RE2 for regexes, one RE2 scan for a rule's keywords,
and size limits for tables that come from clients (SetRules)."""

from __future__ import annotations

import pytest
import re2

from ccoe_common.routing.rules import REGEX_ENGINE, RuleLimits, RuleTable, RuleTableError

REDOS = "^(a+)+$"


def one_rule(match: dict, **rule) -> dict:
    return {"rules": [{"id": "r", "match": match, "experts": ["math"], **rule}]}


def test_the_catastrophic_pattern_is_compiled_by_the_linear_time_engine():
    table = RuleTable.from_dict(one_rule({"regex": [REDOS]}))
    (compiled,) = table.regexes("r")
    assert type(compiled) is REGEX_ENGINE is type(re2.compile("a"))
    # 27 'a's and a 'b' froze Python's re for 6.8 s (doubling per 'a'); RE2 answers at once.
    assert table.match("a" * 27 + "b") is None
    assert table.match("a" * 28).rule_id == "r"


@pytest.mark.parametrize(("pattern", "feature"), [
    (r"(a)\1", r"invalid escape sequence: \1"),
    (r"foo(?=bar)", "invalid perl operator: (?="),
    (r"(?<!x)y", "invalid perl operator: (?<!"),
    (r"(?>a+)b", "invalid perl operator: (?>"),
    (r"a++", "bad repetition operator: ++"),
])
def test_python_only_features_are_refused_saying_what_re2_lacks(pattern, feature):
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_dict(one_rule({"regex": [pattern]}))
    message = str(err.value)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.rule_id == "r"
    assert feature in message and "no backreferences" in message and "lookarounds" in message


def test_a_pattern_that_compiles_nowhere_says_so():
    with pytest.raises(RuleTableError, match=r"regex '\[a' does not compile: missing \]"):
        RuleTable.from_dict(one_rule({"regex": ["[a"]}))


def test_regexes_are_case_insensitive_and_unicode_aware():
    table = RuleTable.from_dict(one_rule({"regex": [r"\bselect\b.*\bfrom\b", "größe"]}))
    assert table.match("SELECT a FROM t").reason == "regex /\\bselect\\b.*\\bfrom\\b/"
    assert table.match("die GRÖSSE") is None and table.match("die GRÖßE").rule_id == "r"


@pytest.mark.parametrize(("text", "hit"), [
    ("I write C++ daily", "c++"),
    ("how many apples", "how many"),   # the first keyword in file order wins at one position
    ("How many?", "how many"),
    ("an integral.", "integral"),
    ("Café au lait", "café"),
    ("(integral)", "integral"),
    ("integral\nnext line", "integral"),
])
def test_keywords_match_whole_words_case_insensitively(text, hit):
    table = RuleTable.from_dict(one_rule({"keywords": ["c++", "how many", "how", "integral", "café"]}))
    assert table.match(text).reason == f"keyword {hit!r}"


@pytest.mark.parametrize("text", ["integrals", "the_integral", "integral2", "Cafés", "café_", "xc++", "nothing"])
def test_keywords_do_not_match_inside_words(text):
    # Word characters are Python's \w for text: letters and digits of any script, and '_'.
    table = RuleTable.from_dict(one_rule({"keywords": ["integral", "café", "c++"]}))
    assert table.match(text) is None


def test_an_empty_keyword_is_refused():
    with pytest.raises(RuleTableError, match="empty string"):
        RuleTable.from_dict(one_rule({"keywords": ["math", ""]}))


LIMITS = RuleLimits(max_rules=3, max_values_per_condition=2, max_value_chars=8, max_regexes_per_rule=2,
                    max_regex_chars=10, max_depth=6)


@pytest.mark.parametrize(("table", "fragment"), [
    ({"rules": [{"id": f"r{i}", "match": {"domain": ["x"]}, "experts": ["math"]} for i in range(4)]},
     "has 4 rules; registry.rule_limits.max_rules is 3"),
    (one_rule({"keywords": ["a", "b", "c"]}), "match.keywords has 3 values; registry.rule_limits.max_values_per_"
                                              "condition is 2"),
    (one_rule({"tenant": ["a" * 9]}), "is longer than registry.rule_limits.max_value_chars (8 characters)"),
    (one_rule({"regex": ["a", "b", "c"]}), "match.regex has 3 patterns; registry.rule_limits.max_regexes_per_rule "
                                           "is 2"),
    (one_rule({"regex": ["a" * 11]}), "is longer than registry.rule_limits.max_regex_chars (10 characters)"),
])
def test_client_tables_obey_the_limits_and_name_them(table, fragment):
    RuleTable.from_dict(table)  # no limits: a file or a table the registry already accepted
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_dict(table, limits=LIMITS)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text", [
    "[" * 50_000 + "]" * 50_000,                         # JSON-style nesting
    "rules: " + "[" * 7 + "]" * 7,
    "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(40)),  # YAML block nesting
    '{"rules": [{"id": "r", "match": {"domain": [[["x"]]]}, "experts": ["math"]}]}',
])
def test_deep_nesting_is_refused_before_anything_recurses(text):
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_text(text, limits=LIMITS)
    assert "nests deeper than 6 levels" in str(err.value) or "maximum nesting depth" in str(err.value)
    assert len(str(err.value)) < 500


@pytest.mark.parametrize(("text", "fragment"), [
    ("a: &x [1, 2]\nb: *x", "uses the YAML alias *x"),
    ("rules: [{id: r, match: {domain: [x]}, experts: [math], description: 2001-12-14}]",
     "table.rules[0].description: date values are not allowed"),
    ("rules: [{id: r, match: {domain: [x]}, experts: [math], description: !!binary aGk=}]",
     "bytes values are not allowed"),
    ("{1: 2}", "key 1 is a int; keys must be strings"),
])
def test_yaml_that_json_cannot_hold_is_refused(text, fragment):
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_text(text)
    assert fragment in str(err.value)


def test_messages_quote_short_prefixes_of_huge_values():
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_dict({"rules": [{"id": "x" * 100_000, "match": {"domain": ["d"]}, "experts": ["math"]}]})
    assert len(str(err.value)) < 300 and "(100000 characters)" in str(err.value)
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_text("rules: [{id: r, match: {" + "k" * 100_000 + ": [x]}, experts: [math]}]")
    assert len(str(err.value)) < 300
    with pytest.raises(RuleTableError) as err:
        RuleTable.from_text("a: b: c" + "x" * 100_000)
    assert len(str(err.value)) < 500
