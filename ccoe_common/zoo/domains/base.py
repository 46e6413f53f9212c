"""A synthetic domain: problems with a checkable answer, and raw text for pre-training.

A domain makes three kinds of text from a seeded `random.Random`:
- `problem(rng)`: an instruction and its reference output (what an expert trains on and what
  evaluation asks), with the exact answer a checker compares;
- `pretrain_line(rng)`: the domain's knowledge as plain text, *not* in instruction form — the
  backbone learns the facts (sums, SQL, unit factors) but not how to answer the requests;
- `check(problem, text)`: is a generated answer right (exact match on the final answer, or, for
  SQL, the same rows when run in sqlite3).

A new domain is a new file in this package and one entry in `DOMAINS`.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """Example: Problem("arith", "Mia has 34 apples ... How many apples does Mia have now?", "34 + 27 = 61", "61")."""

    domain: str
    instruction: str
    output: str  # the reference response, as trained on
    answer: str  # what the checker compares

    def record(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": "", "output": self.output}


def last_number(text: str) -> str | None:
    """The final number in a text ("34 + 27 = 61" -> "61"), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


class Domain(ABC):
    name: str
    keywords: tuple[str, ...]  # words the rule table routes on
    description: str

    @abstractmethod
    def problem(self, rng: random.Random) -> Problem: ...

    @abstractmethod
    def pretrain_line(self, rng: random.Random) -> str: ...

    def check(self, problem: Problem, text: str) -> bool:
        """Default: the last number in the answer equals the reference answer."""
        return last_number(text) == problem.answer

    def problems(self, n: int, seed: int, exclude: set[str] | None = None, *, distinct: bool = True) -> list[Problem]:
        """n problems whose instruction is not in `exclude`; deterministic for a seed.

        distinct=True (test sets) also never repeats an instruction; training sets may repeat,
        as real instruction data does for common requests.
        """
        rng = random.Random(f"{self.name}:{seed}")
        seen = set(exclude or ())
        out: list[Problem] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"domain {self.name!r} cannot make {n} distinct problems (got {len(out)})")
            p = self.problem(rng)
            if p.instruction not in seen:
                if distinct:
                    seen.add(p.instruction)
                out.append(p)
        return out
