"""`ccoe bench rules`: the time one rule regex takes to match, RE2 (what rule tables run on)
against Python's `re` (what they ran on), side by side.

The pattern is the one that froze a router: `^(a+)+$` against n `a`s and a `b`. Python's
backtracking tries every way to split the `a`s among the groups, so each extra `a` doubles its
time; RE2 simulates all of them at once, so its time grows with n only linearly. RE2 runs
through the router's own code (`RuleTable.match`); Python's `re` runs the pattern as the old
tables compiled it. Python's `re` stops once one match took more than `--python-limit-s`
(default 1 s: the next would take about 2); RE2 goes on to long texts.

    ccoe bench rules          # table: n, RE2 µs, Python re ms, ratio
    ccoe bench rules --json   # one JSON object
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ccoe_common.console import add_json_flag, format_table, print_json
from ccoe_common.routing.rules import RuleTable

PATTERN = "^(a+)+$"
LONG_TEXTS = (1_000, 10_000, 100_000, 200_000)  # 200,000 characters: the router's default prompt limit


@dataclass(frozen=True)
class Row:
    n: int  # the text is n 'a's and a 'b' (n + 1 characters); it never matches
    re2_s: float  # median seconds per match, RE2 through RuleTable.match
    python_s: float | None  # seconds for one match with Python's re; None once it was stopped
    ratio: float | None  # python_s / re2_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", type=int, default=16, help="first n (default 16)")
    parser.add_argument("--python-limit-s", type=float, default=1.0,
                        help="stop Python's re after a match took longer than this (default 1.0)")
    add_json_flag(parser)


def _re2_seconds(match: Callable[[str], object], text: str, budget_s: float = 0.05) -> float:
    """Median of a few timings, each repeating the match enough to take ~budget_s / 5."""
    samples, repeat = [], 1
    while True:
        start = time.perf_counter()
        for _ in range(repeat):
            match(text)
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s / 5 or repeat >= 1 << 16:
            break
        repeat *= 4
    samples.append(elapsed / repeat)
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(repeat):
            match(text)
        samples.append((time.perf_counter() - start) / repeat)
    return statistics.median(samples)


def measure(start: int = 16, python_limit_s: float = 1.0) -> list[Row]:
    table = RuleTable.from_dict({"rules": [{"id": "redos", "match": {"regex": [PATTERN]}, "experts": ["x"]}]})
    backtracking = re.compile(PATTERN, re.IGNORECASE)  # how rule tables compiled it before RE2
    rows: list[Row] = []
    n, python_running = start, True
    while python_running:
        text = "a" * n + "b"
        if table.match(text) is not None:
            raise RuntimeError(f"{PATTERN!r} matched {n} 'a's and a 'b'; the benchmark measures a failing match")
        re2_s = _re2_seconds(table.match, text)
        t0 = time.perf_counter()
        backtracking.search(text)
        python_s = time.perf_counter() - t0
        rows.append(Row(n, re2_s, python_s, python_s / re2_s))
        python_running = python_s <= python_limit_s
        n += 1
    for n in LONG_TEXTS:
        if n > rows[-1].n:
            rows.append(Row(n, _re2_seconds(table.match, "a" * n + "b"), None, None))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = measure(args.start, args.python_limit_s)
    if args.json:
        print_json({"pattern": PATTERN, "text": "n 'a's then 'b'", "python_limit_s": args.python_limit_s,
                    "rows": [asdict(r) for r in rows]})
        return 0
    print(f"pattern {PATTERN!r} against n 'a's and a 'b' (no match); Python's re stopped after "
          f"{args.python_limit_s:g} s")
    print(format_table(("n", "RE2 µs", "Python re ms", "Python / RE2"), [
        (r.n, f"{r.re2_s * 1e6:.1f}", "-" if r.python_s is None else f"{r.python_s * 1e3:.1f}",
         "-" if r.ratio is None else f"{r.ratio:,.0f}x") for r in rows]))
    return 0
