"""`ccoe bench rules`: structure only, no timing thresholds."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

from ccoe_common.cli.main import main


def test_rules_bench_reports_both_engines_then_re2_alone_on_long_texts():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["bench", "rules", "--start", "10", "--python-limit-s", "0.001", "--json"])
    assert rc == 0
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    assert report["pattern"] == "^(a+)+$"
    rows = report["rows"]
    both = [r for r in rows if r["python_s"] is not None]
    assert both and [r["n"] for r in both] == list(range(10, 10 + len(both)))
    assert all(r["ratio"] == r["python_s"] / r["re2_s"] for r in both)
    assert all(r["python_s"] <= 0.001 for r in both[:-1])  # stopped right after the first over the limit
    assert [r["n"] for r in rows[len(both):]] == [1_000, 10_000, 100_000, 200_000]
    assert all(r["re2_s"] > 0 for r in rows)
