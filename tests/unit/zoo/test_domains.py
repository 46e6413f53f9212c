"""Synthetic domains: deterministic generators, checkers that accept right answers and reject
wrong ones (the SQL checker runs sqlite3 for real), and a rule table that routes them."""

from __future__ import annotations

import json

import pytest

from ccoe_common.zoo.build import write_domain_data
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import DOMAINS, Problem, get_domain, last_number
from ccoe_common.zoo.domains.sql import connect, run_sql
from ccoe_common.zoo.rules import read_rules, write_rules


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_generators_are_deterministic_and_references_pass_their_checker(name):
    d = get_domain(name)
    a, b = d.problems(50, seed=3), d.problems(50, seed=3)
    assert a == b and a != d.problems(50, seed=4)
    assert len({p.instruction for p in a}) == 50
    assert all(d.check(p, p.output) for p in a)
    assert d.pretrain_line(__import__("random").Random(0))


def test_arithmetic_answers_are_right_and_checked_on_the_final_number():
    d = get_domain("arith")
    for p in d.problems(100, seed=0):
        a, op, b, _, result = p.output.split()
        assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert not d.check(p, f"{a} {op} {b} = {int(result) + 1}")
    assert last_number("so 34 + 27 = 61") == "61" and last_number("no idea") is None


def test_unit_conversions_are_right():
    d = get_domain("units")
    factors = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000, ("l", "ml"): 1000,
               ("min", "s"): 60, ("h", "min"): 60}
    for p in d.problems(100, seed=0):
        x, src, _, y, dst = p.output.split()
        f = factors.get((src, dst)) or 1 / factors[(dst, src)]
        assert int(x) * f == int(y)
        assert not d.check(p, f"{x} {src} = {int(y) * 10} {dst}")


def test_sql_checker_runs_the_queries_in_sqlite():
    d = get_domain("sql")
    p = next(p for p in d.problems(200, seed=0) if p.instruction.endswith("department.") and "names" in p.instruction)
    dept = p.answer.split("'")[1]
    # Different text, same rows: right. Other rows, broken SQL, or a write: wrong.
    assert d.check(p, f"SELECT name FROM employees WHERE '{dept}' = dept")
    assert not d.check(p, "SELECT name FROM employees;")
    assert not d.check(p, f"SELECT name FROM employes WHERE dept = '{dept}';")
    assert not d.check(p, "DELETE FROM employees;")
    assert not d.check(p, f"SELECT name FROM employees WHERE dept = '{dept}'; DROP TABLE employees;")
    assert run_sql(connect(), "SELECT COUNT(*) FROM employees") == [(26,)]
    # ORDER BY questions must come back in the right order.
    db = connect()
    ordered = next(p for p in d.problems(300, seed=0)
                   if "ORDER BY" in p.answer and len(set(run_sql(db, p.answer))) > 1)
    assert not d.check(ordered, ordered.answer.replace("ORDER BY age", "ORDER BY age DESC"))


def test_test_problems_never_appear_in_training_data(tmp_path):
    config = ZooConfig(train_problems=300, eval_problems=20, test_problems=50)
    paths = write_domain_data(tmp_path, config)
    for name, files in paths.items():
        read = {k: [json.loads(line) for line in v.read_text().splitlines()] for k, v in files.items()}
        test = {r["instruction"] for r in read["test"]}
        assert len(test) == 50 and len(read["train"]) == 300
        assert not test & {r["instruction"] for r in read["train"] + read["eval"]}
        d = get_domain(name)
        assert all(d.check(Problem(name, r["instruction"], r["output"], r["answer"]), r["output"])
                   for r in read["test"])


def test_rule_table_routes_every_domain_to_its_expert(tmp_path):
    domains = {n: get_domain(n) for n in DOMAINS}
    path = write_rules(tmp_path / "rules.json", domains)
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 1 and {"id", "domain", "keywords", "expert"} <= set(raw["rules"][0])
    table = read_rules(path)
    for name, d in domains.items():
        for p in d.problems(100, seed=9):
            assert table.route(p.instruction)[0] == name, p.instruction
    assert table.route("What color is the sky?") == (None, None)
