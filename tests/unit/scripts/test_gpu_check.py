"""scripts/gpu-check.sh --dry-run: the device check's steps on the CPU at a toy shape (no
install): the import path without the service stack, the static-path tests, both benchmarks
through `python -m ccoe_common.bench`, the summary, and every file it leaves in $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# What the device tool can bring back: at most 8 files, named in letters, digits, '.', '_', '-'.
EXPECTED = {"env.json", "tests.xml", "throughput.json", "memory.json", "summary.json", "gpu-check.log"}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500)
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{log[-3000:]}"
    assert {p.name for p in out.iterdir()} == EXPECTED
    for step in ("imports", "tests", "throughput", "memory", "summary"):
        assert f"{step}: ok" in log

    env_info = json.loads((out / "env.json").read_text())
    assert env_info["service_stack_imported"] == []
    assert env_info["grouped_kernel_bf16"] in ("grouped_mm", "masked")

    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("tests", "0")) >= 3 and suite.get("failures") == "0" and suite.get("errors") == "0"

    throughput = json.loads((out / "throughput.json").read_text())
    assert throughput["decode_path"] == "static" and throughput["device"] == "cpu"
    assert throughput["model"]["engine_config"]["static_decode"] is True
    assert throughput["roofline"] is None  # only measured on cuda

    memory = json.loads((out / "memory.json").read_text())
    assert [(r["n"], r.get("computed", False)) for r in memory["rows"]] == [(1, False), (2, True)]
    two = memory["rows"][1]
    assert two["ensemble_bytes"] == 2 * memory["rows"][0]["ensemble_bytes"]
    assert two["backbone_bytes"] < two["ccoe_bytes"] < two["ensemble_bytes"]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"env", "throughput", "memory"}
    assert summary["throughput"]["ratios"]["B: mixing efficiency"][1] == 0.9


def test_unknown_argument_and_missing_out_are_refused(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "gpu-check.sh")
    bad = subprocess.run(["bash", script, "--fast"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    no_out = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert no_out.returncode == 2 and "set OUT" in no_out.stderr
