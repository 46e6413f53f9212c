"""`ccoe train` as people run it: a real process, real files, a tiny backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from ccoe_common.model import CCoEModel
from tests.unit.training.conftest import write_records

CCOE = str(Path(sys.executable).parent / "ccoe")
FAST = ("--steps", "2", "--batch-size", "4", "--max-seq-len", "128", "--eval-every", "1")


def ccoe(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CCOE_DEVICE": "cpu", "CCOE_CACHE_DIR": str(cache)}
    proc = subprocess.run([CCOE, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("train-cli") / "add.jsonl", 60, bad_lines={7: "{oops"})


def test_train_new_expert_then_continue_it(qwen2_dir, data, tmp_path):
    out = json.loads(ccoe("train", "expert", "--backbone", str(qwen2_dir), "--name", "add", "--data", str(data),
                          "--placement", "GL:1", "--domain", "math", "--out", str(tmp_path / "v1"), *FAST,
                          "--max-bad-fraction", "0.05", "--json", cache=tmp_path).stdout)
    assert out["version"] == 1 and out["steps"] == 2 and out["start_eval_loss"] > out["best_eval_loss"]
    metrics = (tmp_path / "runs" / "add-v1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [1, 2]

    human = ccoe("train", "expert", "--backbone", str(qwen2_dir), "--from", str(tmp_path / "v1"), "--data", str(data),
                 "--out", str(tmp_path / "v2"), *FAST, "--max-bad-fraction", "0.05", cache=tmp_path)
    assert "wrote add@2" in human.stdout and "eval loss best" in human.stdout
    assert "line 7: invalid JSON" in human.stderr and "2/2" in human.stderr  # bad line reported, progress shown
    model = CCoEModel.from_pretrained(qwen2_dir)
    assert [str(model.push(str(tmp_path / v))) for v in ("v1", "v2")] == ["add@1", "add@2"]
    manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert manifest["training"]["started_from"].startswith("add@1") and manifest["domains"] == ["math"]


def test_too_many_bad_lines_refuse_to_start(qwen2_dir, data, tmp_path):
    proc = ccoe("train", "expert", "--backbone", str(qwen2_dir), "--name", "add", "--data", str(data),
                "--out", str(tmp_path / "x"), *FAST, cache=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "1 of 61 lines are bad (1.6%), over the allowed 1.0%: line 7: invalid JSON" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_sweep_reports_a_gain_per_size(qwen2_dir, data, tmp_path):
    out = json.loads(ccoe("train", "sweep", "--backbone", str(qwen2_dir), "--data", str(data), "--layers", "1,2",
                          "--budget", "0.5", *FAST, "--max-bad-fraction", "0.05", "--eval-fraction", "0.2", "--json",
                          cache=tmp_path).stdout)
    rows = out["rows"]
    assert [r["layers"] for r in rows] == [0, 1, 2]
    assert rows[0]["parameters"] == 0 and rows[0]["gain_per_million"] is None
    for prev, row in pairwise(rows):
        assert row["parameters"] > prev["parameters"]
        assert row["gain_per_million"] == pytest.approx(
            -(row["eval_loss"] - prev["eval_loss"]) / (row["parameters"] - prev["parameters"]) * 1e6)
    assert out["best_layers"] in (1, 2)
    over = ccoe("train", "sweep", "--backbone", str(qwen2_dir), "--data", str(data), "--layers", "4", *FAST,
                "--max-bad-fraction", "0.05", cache=tmp_path, check=False)
    assert over.returncode == 2 and "parameter_count expected <=" in over.stderr
