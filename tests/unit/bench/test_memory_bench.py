"""`ccoe bench memory` end to end on the toy shape: real workers, real RSS measurements.

Only structure and orderings that hold by a wide margin are asserted (a second full model
costs ~11 MiB, an expert ~1.2 MiB, allocator noise is a few hundred KiB); no timings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from ccoe_common.bench.memory import parse_ns
from ccoe_common.cli.main import main


@pytest.fixture(scope="module")
def report() -> dict:
    # capsys is function-scoped and one benchmark run (~30 s) serves every test here, so
    # stdout is captured by hand.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "memory", "--shape", "tiny", "--ns", "1,2", "--json", "--quiet"])
    assert code == 0
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got {lines!r}"
    return json.loads(lines[0])


@pytest.mark.slow
def test_one_row_per_n_with_measured_bytes(report: dict) -> None:
    rows = report["rows"]
    assert [r["n"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("ccoe_bytes", "ensemble_bytes", "lora_bytes", "backbone_bytes"):
            assert isinstance(r[key], int) and r[key] > 0, (key, r)


@pytest.mark.slow
def test_orderings(report: dict) -> None:
    one, two = report["rows"]
    assert two["ensemble_bytes"] > one["ensemble_bytes"]
    assert two["ccoe_bytes"] < two["ensemble_bytes"]
    assert two["lora_bytes"] < two["ensemble_bytes"]
    # Each system holds at least one backbone's worth of weights.
    backbone_tensors = one["tensor_bytes"]["backbone"]
    for key in ("ccoe_bytes", "ensemble_bytes", "lora_bytes", "backbone_bytes"):
        assert one[key] > 0.8 * backbone_tensors, (key, one[key], backbone_tensors)


@pytest.mark.slow
def test_measured_ensemble_is_n_copies(report: dict) -> None:
    # Our loader copies weights; if it ever shared them (mmap), the ensemble baseline would
    # silently shrink and every ratio would be wrong.
    two = report["rows"][1]
    assert 1.7 < two["ensemble_bytes"] / two["backbone_bytes"] < 2.3


@pytest.mark.slow
def test_expert_fraction_within_budget(report: dict) -> None:
    shape = report["shape"]
    fraction = report["rows"][0]["expert_fraction"]
    assert 0 < fraction <= 0.15
    assert fraction == pytest.approx(shape["expert_parameter_count"] / shape["parameter_count"])


@pytest.mark.parametrize("text, expected", [("1,3,5,10", (1, 3, 5, 10)), ("5, 1,5", (1, 5))])
def test_parse_ns(text: str, expected: tuple[int, ...]) -> None:
    assert parse_ns(text) == expected


@pytest.mark.parametrize("text", ["0", "1,x", ",", "-2"])
def test_parse_ns_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ns(text)
