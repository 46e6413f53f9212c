"""The ops CLI against a real stack (Ray Serve, redis-server, gRPC): `ccoe expert push|pop|list|show`,
`ccoe rollout status|start|rollback`, `ccoe rules get|set`, `ccoe audit`, each run as a process.

One stack serves the module (~20 s to start), with two model replicas so that a canary rollout
has a canary and a rest. The tests run in file order and build on each other: law@1 is pushed
first, law@2 later, and everything is popped at the end; the audit log checks the whole story.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from ccoe_common.experts.artifact import read_artifact, write_artifact
from ccoe_common.model.demo_assets import demo_backbone, demo_experts
from ccoe_common.ports import free_port
from ccoe_common.serving.config import AppConfig
from ccoe_common.serving.local_stack import LocalStack

CCOE = str(Path(sys.executable).parent / "ccoe")
RULES = """
version: 3
rules:
  - id: law-domain
    match: {domain: [law]}
    experts: [law]
  - id: math-words
    match: {keywords: [compute]}
    experts: [math]
"""


def ccoe(*args: str, expect: int = 0, token: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CCOE_DEVICE": "cpu"}
    env.pop("CCOE_TOKEN", None)
    if token is not None:
        env["CCOE_TOKEN"] = token
    proc = subprocess.run([CCOE, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("ops")
    uris = demo_experts(work)
    config = AppConfig.load({
        "backbone": str(demo_backbone(work)),
        "experts": [uris["math"], uris["sql"]],
        "replica": {"num_replicas": 2},
        "auth": {"mode": "token"},
        # Versions are pushed from, and exported to, each test's tmp_path.
        "registry": {"artifact_store": str(work / "store"),
                     "allowed_sources": [str(tmp_path_factory.getbasetemp())],
                     "allowed_export_prefixes": [str(tmp_path_factory.getbasetemp())]},
    })
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as st:
        st.law_uri = uris["law"]
        yield st


def ops(stack, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    return ccoe(*args, "--registry", stack.address, expect=expect, token=stack.admin_token)


def ops_json(stack, *args: str) -> dict:
    return json.loads(ops(stack, *args, "--json").stdout)


def ops_reads(stack, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Commands that change nothing, run side by side: each process spends ~2 s importing."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda c: ops(stack, *c), commands))


def test_unreachable_registry_is_one_line_and_exit_1():
    proc = ccoe("expert", "list", "--registry", f"127.0.0.1:{free_port()}", expect=1)
    assert "error: UNAVAILABLE:" in proc.stderr and "--registry" in proc.stderr


@pytest.mark.parametrize("token, status", [(None, "UNAUTHENTICATED"), ("ccoe_not-a-token", "UNAUTHENTICATED"),
                                           ("inference", "PERMISSION_DENIED")])
def test_a_missing_or_refused_token_is_one_line_and_exit_2(stack, token, status):
    token = stack.inference_token if token == "inference" else token
    proc = ccoe("expert", "list", "--registry", stack.address, expect=2, token=token)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ccoe expert: error: {status}:"), proc.stderr


def test_the_token_can_come_from_a_file(stack, tmp_path):
    path = tmp_path / "token"
    path.write_text(stack.admin_token + "\n")
    listed = json.loads(ccoe("expert", "list", "--registry", stack.address, "--token-file", str(path), "--json",
                             token="ccoe_wrong").stdout)  # the file wins over CCOE_TOKEN
    assert {e["name"] for e in listed["experts"]} >= {"math", "sql"}
    proc = ccoe("expert", "list", "--registry", stack.address, "--token-file", str(tmp_path / "nope"), expect=2)
    assert "--token-file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_push_uploads_with_a_progress_bar_and_waits_until_live(stack):
    proc = ops(stack, "expert", "push", stack.law_uri, "--upload", "--json")
    out = json.loads(proc.stdout)
    assert (out["expert"], out["version"]) == ("law", 1)
    assert out["rollout"]["state"] == "done" and out["rollout"]["to_version"] == 1
    assert out["seconds_to_live"] > 0 and out["uploaded"]["bytes"] > 0
    assert out["stored_uri"].endswith("/law/v1")
    assert "uploading law@1" in proc.stderr and "100%" in proc.stderr
    assert "replicas ready" in proc.stderr  # the per-change rollout lines


def test_list_and_show_reflect_the_push(stack):
    listed, shown, table, human_show = ops_reads(
        stack, ("expert", "list", "--json"), ("expert", "show", "law", "--json"), ("expert", "list"),
        ("expert", "show", "law"))
    listed = {e["name"]: e for e in json.loads(listed.stdout)["experts"]}
    assert set(listed) == {"law", "math", "sql"}
    law = listed["law"]
    assert law["serving"] == 1 and law["latest"] == 1
    assert len(law["versions"][0]["loaded_on"]) == 2 and law["rollout"]["state"] == "done"
    version = json.loads(shown.stdout)["versions"][0]
    assert (version["version"], version["state"]) == (1, "active")
    assert version["manifest"]["kind"] == "ffn" and version["manifest"]["parameter_count"] > 0
    assert "law" in table.stdout and "v1:active" in table.stdout and "registry revision" in table.stdout
    assert "law: serving v1, latest v1" in human_show.stdout
    proc = ops(stack, "expert", "show", "nosuch", expect=2)
    assert "error: NOT_FOUND:" in proc.stderr and "nosuch" in proc.stderr


def test_rollout_status_and_nothing_to_roll_back(stack):
    status, human = ops_reads(stack, ("rollout", "status", "law", "--json"), ("rollout", "status", "law"))
    status = json.loads(status.stdout)
    assert (status["state"], status["from_version"], status["to_version"]) == ("done", 0, 1)
    assert {r["state"] for r in status["replicas"]} == {"ready"} and len(status["replicas"]) == 2
    assert "done in" in human.stdout
    proc = ops(stack, "rollout", "rollback", "law", expect=2)
    assert "error: FAILED_PRECONDITION:" in proc.stderr and "law" in proc.stderr


def test_rules_set_then_get(stack, tmp_path):
    before = ops_json(stack, "rules", "get")["revision"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    set_ = ops_json(stack, "rules", "set", str(rules))
    assert set_["revision"] > before
    got, human = ops_reads(stack, ("rules", "get", "--json"), ("rules", "get"))
    assert json.loads(got.stdout) == {"revision": set_["revision"], "table": yaml.safe_load(RULES)}
    human = human.stdout
    assert human.startswith(f"# rules revision {set_['revision']}\n")
    assert yaml.safe_load(human) == yaml.safe_load(RULES)  # the output can be edited and set again

    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.replace("experts: [math]", "experts: [astrology]"))
    with ThreadPoolExecutor(2) as pool:  # both are refused, so neither changes anything
        stale, unknown = pool.map(lambda a: ops(stack, "rules", "set", *a, expect=2),
                                  [(str(rules), "--expected-revision", str(before)), (str(bad),)])
    assert "error: ABORTED:" in stale.stderr
    assert "error: INVALID_ARGUMENT:" in unknown.stderr and "astrology" in unknown.stderr


def test_corrupted_upload_is_refused(stack, tmp_path):
    copy = tmp_path / "law-corrupt"
    shutil.copytree(stack.law_uri, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = ops(stack, "expert", "push", str(copy), "--upload", expect=2)
    assert "error: INVALID_ARGUMENT:" in proc.stderr and "weights_sha256" in proc.stderr


def test_canary_rollout_of_a_new_version_then_roll_back(stack, tmp_path):
    v1 = read_artifact(stack.law_uri)
    m = v1.manifest
    v2 = tmp_path / "law-v2"
    write_artifact(str(v2), {k: t + 0.01 for k, t in v1.tensors.items()}, name="law", version=2, kind=m.kind,
                   layers=m.layers, base_model=m.base_model, domains=m.domains)

    registered = ops_json(stack, "expert", "push", str(v2), "--register-only")
    assert (registered["version"], registered["rollout"]) == (2, None)
    assert ops_json(stack, "expert", "show", "law")["serving"] == 1

    proc = ops(stack, "rollout", "start", "law", "2", "--strategy", "canary", "--json")
    started = json.loads(proc.stdout)
    assert (started["state"], started["from_version"], started["to_version"]) == ("done", 1, 2)
    assert started["policy"]["strategy"] == "canary"
    assert "canary" in proc.stderr  # the progress lines passed through the canary state

    back = ops_json(stack, "rollout", "rollback", "law", "--reason", "worse answers")
    assert (back["from_version"], back["to_version"]) == (2, 1)
    watched = ops_json(stack, "rollout", "status", "law", "--watch", "--timeout", "60")
    assert (watched["id"], watched["state"]) == (back["id"], "done")
    shown = ops_json(stack, "expert", "show", "law")
    assert shown["serving"] == 1
    assert {v["version"]: v["state"] for v in shown["versions"]} == {1: "active", 2: "rolled_back"}


def test_pop_waits_until_drained(stack, tmp_path):
    out = ops_json(stack, "expert", "pop", "law", "--wait", "30", "--export-to", str(tmp_path / "archive"))
    assert sorted(out["retired"]) == ["law@1", "law@2"] and out["drained"] is True
    assert read_artifact(str(tmp_path / "archive")).manifest.version == 2
    shown = ops_json(stack, "expert", "show", "law")
    assert shown["serving"] == 0
    assert {v["state"] for v in shown["versions"]} == {"retired"}
    assert all(not v["loaded_on"] for v in shown["versions"])


def test_audit_tells_the_story_in_order(stack):
    entries = ops_json(stack, "audit", "--limit", "200")["entries"]
    story = [e["what"] for e in entries if e["what"] in ("push", "set_rules", "rollout_start", "rollback", "retire")
             and e["detail"].get("expert", "law") == "law"]
    assert story == ["push", "set_rules", "push", "rollout_start", "rollback", "retire"]
    law_push = next(e for e in entries if e["what"] == "push" and e["detail"]["expert"] == "law")
    # The authenticated principal (the stack's minted admin token), whatever --who or $USER say.
    assert law_push["who"] == "local-admin" and law_push["time"] and law_push["detail"]["version"] == 1
    assert [e["revision"] for e in entries] == sorted(e["revision"] for e in entries)
    table = ops(stack, "audit").stdout
    assert "retire" in table and "set_rules" in table and "who" in table.splitlines()[0]
