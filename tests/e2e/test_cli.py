"""The `ccoe` command as people and scripts use it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccoe_common.model import CCoEModel
from ccoe_common.model.generate import greedy_generate

CCOE = str(Path(sys.executable).parent / "ccoe")


def ccoe(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CCOE_DEVICE": "cpu"}
    proc = subprocess.run([CCOE, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def math_artifact(deep_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "math"
    ccoe("expert", "carve", "--backbone", str(deep_qwen2_dir), "--name", "math", "--placement", "GL:2",
         "--domain", "math", "--out", str(out))
    return out


def test_generate_json_matches_library_greedy(deep_qwen2_dir):
    proc = ccoe("generate", "--backbone", str(deep_qwen2_dir), "--prompt", "Compute 12 + 7",
                "--max-new-tokens", "8", "--json")
    out = json.loads(proc.stdout)
    model = CCoEModel.from_pretrained(deep_qwen2_dir)
    prompt = model.tokenizer("Compute 12 + 7", add_special_tokens=False).input_ids
    expected = greedy_generate(model, prompt, 8).token_ids
    assert out["token_ids"] == expected
    assert out["text"] == model.tokenizer.decode(expected, skip_special_tokens=True)


def test_generate_with_an_expert_artifact(deep_qwen2_dir, math_artifact):
    base = json.loads(ccoe("generate", "--backbone", str(deep_qwen2_dir), "--prompt", "hello",
                           "--max-new-tokens", "6", "--json").stdout)
    # A freshly carved expert is an exact copy of the backbone: same tokens.
    on_expert = json.loads(ccoe("generate", "--backbone", str(deep_qwen2_dir), "--expert", str(math_artifact),
                                "--use", "math", "--prompt", "hello", "--max-new-tokens", "6", "--json").stdout)
    assert on_expert == base
    human = ccoe("generate", "--backbone", str(deep_qwen2_dir), "--expert", str(math_artifact), "--use", "math",
                 "--prompt", "hello", "--max-new-tokens", "6").stdout
    assert human.startswith("[math@1, 6 tokens, finish=length]")


def test_inspect_reports_ok_and_problems(deep_qwen2_dir, math_artifact, tmp_path):
    ok = json.loads(ccoe("expert", "inspect", str(math_artifact), "--backbone", str(deep_qwen2_dir), "--json").stdout)
    assert ok["ok"] is True and ok["manifest"]["layers"] == [0, 15]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((math_artifact / "manifest.json").read_text())
    (broken / "weights.safetensors").write_bytes(b"not the weights")
    proc = ccoe("expert", "inspect", str(broken), check=False)
    assert proc.returncode == 2
    assert "weights_sha256 expected" in proc.stderr and "Traceback" not in proc.stderr


def test_user_errors_are_one_line(deep_qwen2_dir, tmp_path):
    proc = ccoe("generate", "--backbone", str(tmp_path), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "is not a checkpoint directory" in proc.stderr
    proc = ccoe("generate", "--backbone", str(deep_qwen2_dir), "--use", "nope", "--prompt", "x", check=False)
    assert proc.returncode == 2 and "--use nope needs the expert's artifact" in proc.stderr
    proc = ccoe("expert", "carve", "--backbone", str(deep_qwen2_dir), "--name", "x", "--placement", "GL:16",
                "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "parameter_count expected <=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_core_demo_runs_and_checks_itself(tmp_path):
    proc = ccoe("demo", "core", "--workdir", str(tmp_path), "--json")
    report = json.loads(proc.stdout)
    assert report["backbone_unchanged"] is True
    assert report["push"]["resident"] == ["math@1", "sql@1"]
    assert report["pop"] == {"popped": ["sql@1"], "resident": ["math@1"]}
    assert report["mixed_batch_max_abs_diff"] < 1e-4
    for prompt, outs in report["generations"].items():
        assert outs["math"] != outs["backbone"] or outs["sql"] != outs["backbone"], prompt
    human = ccoe("demo", "core", "--workdir", str(tmp_path)).stdout  # second run reuses the cached backbone
    assert "backbone output unchanged by push/pop: True" in human


def test_stack_demo_over_grpc(tmp_path):
    """The README's main job (on the toy zoo): the zoo built, then local Ray + redis-server + the
    gRPC app, held-out problems routed by the rules, one over HTTP, a live push and pop through the registry."""
    proc = ccoe("demo", "--quick", "--workdir", str(tmp_path), "--per-domain", "2", "--json")
    report = json.loads(proc.stdout)
    before = [r for r in report["answers"] if r["stage"] == "before push"]
    after = [r for r in report["answers"] if r["stage"] == "after push"]
    assert [(r["domain"], r["experts"]) for r in before] == [
        ("arith", ["arith@1"]), ("arith", ["arith@1"]), ("sql", ["sql@1"]), ("sql", ["sql@1"]),
        ("units", []), ("units", []), ("generic", [])]  # units has no expert yet: the backbone answers
    assert [(r["domain"], r["experts"], r["rule_id"]) for r in after] == [("units", ["units@1"], "r-units")] * 2
    assert all(r["answer"] and r["question"] for r in report["answers"])
    assert report["stream_messages"] >= 1
    # The same question over the OpenAI-compatible HTTP API: same route, same greedy answer.
    assert report["http"]["model"] == "arith@1" and report["http"]["same_as_grpc"] is True
    assert report["push"] == {**report["push"], "pushed": "units@1", "routed_after_push": True, "popped": ["units@1"]}
    assert report["push"]["after_pop"].startswith("NOT_FOUND") and "units" in report["push"]["after_pop"]
    assert report["audit"][-4:] == ["rollout_assign", "rollout_done", "set_rules", "retire"]
    held_out = report["held_out_accuracy"]  # every test problem of the toy zoo, through the stack
    assert list(held_out) == ["arith", "sql", "units"] and all(0 <= a <= 1 for a in held_out.values())
    assert set(report["accuracy"]) == {"arith (before push)", "sql (before push)", "units (before push)",
                                       "generic (before push)", "units (after push)"}
    assert "building the demo zoo" in proc.stderr  # the first run builds it (later runs reuse it)
