"""`ccoe bench rollout` as a person runs it, at a toy size: two replicas under load, two pushes.

Structure and correctness only (every request answered, one version per response); the
timing target is the benchmark's business, not this test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CCOE = str(Path(sys.executable).parent / "ccoe")
KEYS = ("pushes", "push_to_live_p50_s", "push_to_live_p99_s", "requests", "failed_requests",
        "mixed_version_responses")


def test_rollout_bench_two_replicas_two_pushes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CCOE_DEVICE": "cpu"}
    proc = subprocess.run(
        [CCOE, "bench", "rollout", "--shape", "tiny", "--replicas", "2", "--pushes", "2", "--clients", "2",
         "--gap-s", "0.5", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout is the JSON object and nothing else
    assert list(report)[:len(KEYS)] == list(KEYS)
    assert report["pushes"] == 2 and report["replicas"] == 2
    assert [p["version"] for p in report["push_times"]] == [2, 3]
    assert report["requests"] > 0
    assert report["failed_requests"] == 0, report["failures_by_code"]
    assert report["mixed_version_responses"] == 0
    assert 0 < report["push_to_live_p50_s"] <= report["push_to_live_p99_s"]
    assert "push 2/2" in proc.stderr  # progress goes to stderr
