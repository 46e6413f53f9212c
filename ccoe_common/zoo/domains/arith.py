"""Two-number arithmetic word problems (GSM8K-like, tiny): the answer states the equation.

    "Mia has 34 apples and gets 27 more. How many apples does Mia have now?" -> "34 + 27 = 61"

Pre-training text holds bare equations ("34 + 27 = 61"), so the backbone can add but has never
seen a word problem answered.
"""

from __future__ import annotations

import random

from ccoe_common.zoo.domains.base import Domain, Problem

NAMES = ("Mia", "Tom", "Ana", "Ben", "Lea", "Sam", "Ivy", "Max", "Zoe", "Leo")
THINGS = ("apples", "coins", "books", "cards", "shells", "stamps", "pens", "marbles")


class Arithmetic(Domain):
    name = "arith"
    keywords = ("how many", "more", "left", "total", "gives away", "buys")
    description = "two-number addition and subtraction word problems"

    def problem(self, rng: random.Random) -> Problem:
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            verb = rng.choice(("gets", "buys", "finds"))
            text = f"{who} has {a} {what} and {verb} {b} more. How many {what} does {who} have now?"
            return Problem(self.name, text, f"{a} + {b} = {a + b}", str(a + b))
        a, b = max(a, b), min(a, b)
        verb = rng.choice(("gives away", "loses", "sells"))
        text = f"{who} has {a} {what} and {verb} {b}. How many {what} are left?"
        return Problem(self.name, text, f"{a} - {b} = {a - b}", str(a - b))

    def pretrain_line(self, rng: random.Random) -> str:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"{a} + {b} = {a + b}"
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
