"""Text-to-SQL over one fixed table, checked by running both queries in sqlite3.

    "List the names of employees in the sales department."
        -> "SELECT name FROM employees WHERE dept = 'sales';"

A prediction is right when it returns the same rows as the reference query on the demo
database (the same multiset; the same order when the reference has ORDER BY). SQL that does
not run is wrong. Pre-training text holds queries without questions and rows as sentences.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from functools import lru_cache

from ccoe_common.zoo.domains.base import Domain, Problem

DEPTS = ("sales", "research", "support", "finance", "legal")
CITIES = ("paris", "tokyo", "lima", "oslo", "cairo", "delhi")
FIRST = ("ada", "bob", "cy", "dee", "eli", "fay", "gus", "hal", "ida", "jo", "kai", "lu", "mo", "ned", "oz",
         "pia", "quin", "ray", "sue", "ty", "uma", "vic", "wes", "xia", "yan", "zed")
SCHEMA = "CREATE TABLE employees (name TEXT, dept TEXT, city TEXT, age INTEGER, salary INTEGER)"


@lru_cache(maxsize=1)
def employee_rows() -> tuple[tuple[str, str, str, int, int], ...]:
    """The demo table: one row per first name, fixed by seed."""
    rng = random.Random("employees")
    return tuple((n, rng.choice(DEPTS), rng.choice(CITIES), rng.randint(22, 64), rng.randint(30, 150) * 1000)
                 for n in FIRST)


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute(SCHEMA)
    db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", employee_rows())
    return db


def run_sql(db: sqlite3.Connection, sql: str) -> list[tuple] | None:
    """Rows of a query, or None when it is not a single read-only statement that runs."""
    statement = sql.strip().rstrip(";")
    if not statement.lower().startswith("select") or ";" in statement:
        return None
    try:
        return db.execute(statement).fetchall()
    except sqlite3.Error:
        return None


class TextToSQL(Domain):
    name = "sql"
    keywords = ("employees", "department", "salary", "list the", "select")
    description = f"text-to-SQL over `{SCHEMA}`, checked by running the SQL in sqlite3"

    def __init__(self) -> None:
        self._db = connect()

    def problem(self, rng: random.Random) -> Problem:
        dept, city, n = rng.choice(DEPTS), rng.choice(CITIES), rng.randint(25, 60)
        col = rng.choice(("name", "age", "salary", "city"))
        salary = rng.randint(4, 14) * 10000
        kind = rng.randrange(9)
        if kind == 0:
            q, sql = (f"List the names of employees in the {dept} department.",
                      f"SELECT name FROM employees WHERE dept = '{dept}';")
        elif kind == 1:
            q, sql = f"How many employees work in {city}?", f"SELECT COUNT(*) FROM employees WHERE city = '{city}';"
        elif kind == 2:
            q, sql = f"Show the {col} of employees older than {n}.", f"SELECT {col} FROM employees WHERE age > {n};"
        elif kind == 3:
            agg = rng.choice(("average", "highest", "lowest"))
            fn = {"average": "AVG", "highest": "MAX", "lowest": "MIN"}[agg]
            q, sql = (f"What is the {agg} salary in the {dept} department?",
                      f"SELECT {fn}(salary) FROM employees WHERE dept = '{dept}';")
        elif kind == 4:
            q, sql = (f"List the {col} of employees in {city} ordered by age.",
                      f"SELECT {col} FROM employees WHERE city = '{city}' ORDER BY age;")
        elif kind == 5:
            q, sql = (f"How many employees in the {dept} department are younger than {n}?",
                      f"SELECT COUNT(*) FROM employees WHERE dept = '{dept}' AND age < {n};")
        elif kind == 6:
            q, sql = (f"List the names of employees in {city} earning more than {salary}.",
                      f"SELECT name FROM employees WHERE city = '{city}' AND salary > {salary};")
        elif kind == 7:
            q, sql = (f"How many employees in {city} are older than {n}?",
                      f"SELECT COUNT(*) FROM employees WHERE city = '{city}' AND age > {n};")
        else:
            q, sql = (f"List the names of employees in the {dept} department in {city}.",
                      f"SELECT name FROM employees WHERE dept = '{dept}' AND city = '{city}';")
        return Problem(self.name, q, sql, sql)

    def check(self, problem: Problem, text: str) -> bool:
        want = run_sql(self._db, problem.answer)
        got = run_sql(self._db, text.strip().split("\n")[0])
        if want is None or got is None:
            return False
        if "order by" in problem.answer.lower():
            return got == want
        return Counter(got) == Counter(want)

    def pretrain_line(self, rng: random.Random) -> str:
        if rng.random() < 0.4:
            name, dept, city, age, salary = rng.choice(employee_rows())
            return f"{name} works in {dept} in {city}, is {age} years old and earns {salary}."
        return self.problem(rng).output
