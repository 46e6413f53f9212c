"""Console conventions shared by the `ccoe` command, the benchmarks and the demo zoo: one JSON
object for `--json`, aligned tables, progress lines, stdout kept clean for JSON, and user
errors that print as one line with exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def positive_int(text: str) -> int:
    """argparse type for counts: "16" -> 16; "0", "-2", "x" are refused with the value named."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None, separators=(",", ":"), default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # Numbers (and sizes like "3.9 MiB") align right so their digits line up; text aligns left.
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _looks_numeric(cell: str) -> bool:
    head = cell.split(" ")[0].replace(",", "").replace("%", "").replace("x", "").lstrip("-+")
    return head.replace(".", "", 1).isdigit()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """One-line progress on stderr ("[3/12] ccoe n=5 ... 41s"), silent when quiet."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.monotonic() - self.start
            print(f"[{self.done}/{self.total}] {label} ({elapsed:.0f}s)", file=sys.stderr, flush=True)


@contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Send everything written to file descriptor 1 to stderr meanwhile (libraries such as Ray
    print to stdout from other threads), so that a --json command's stdout is only its JSON."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
