"""The zoo's pieces end to end at toy scale: the full-size build is not run in tests."""

from __future__ import annotations

import json

import pytest
import torch

from ccoe_common.model import CCoEModel
from ccoe_common.zoo.build import build_zoo, is_built
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import get_domain
from ccoe_common.zoo.pretrain import pack, zoo_tokenizer
from ccoe_common.zoo.reproduce import reproduce

TINY = ZooConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2, num_kv_heads=1,
                 pretrain_steps=2, pretrain_batch_size=2, pretrain_seq_len=32, train_problems=16, eval_problems=4,
                 test_problems=4, expert_steps=2, expert_steps_by_domain={"arith": 3}, expert_batch_size=2)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zoo")
    return workdir, build_zoo(workdir, TINY, quiet=True, workers=2)  # experts trained in 2 worker processes


def test_tokenizer_splits_digits_and_keeps_prompts_short():
    domains = [get_domain(n) for n in ("arith", "sql", "units")]
    tok = zoo_tokenizer(domains, ZooConfig(vocab_size=600))
    assert tok.tokenize("1234") == ["1", "2", "3", "4"]
    assert tok.decode(tok("34 + 27 = 61").input_ids) == "34 + 27 = 61"
    examples = pack(["a b c"] * 50, tok, 16)
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in examples)


def test_build_writes_a_loadable_backbone_experts_and_rules(tiny_zoo):
    workdir, zoo = tiny_zoo
    model = CCoEModel.from_pretrained(zoo["backbone"]["path"])  # a normal transformers checkpoint
    assert (workdir / "backbone" / "tokenizer.json").exists()
    for name, e in zoo["experts"].items():
        key = model.push(e["uri"])
        assert str(key) == f"{name}@1" and model.get(name).domains == [name]
        manifest = json.loads((workdir / "experts" / name / "v1" / "manifest.json").read_text())
        assert manifest["training"]["steps"] == (3 if name == "arith" else 2)  # per-domain steps
    rules = json.loads((workdir / "rules.json").read_text())
    assert [r["expert"] for r in rules["rules"]] == ["sql", "arith", "units"]
    assert is_built(workdir, TINY) and not is_built(workdir, TINY.model_copy(update={"seed": 1}))


def test_build_is_reused_deterministic_and_parallel_changes_nothing(tiny_zoo, tmp_path):
    workdir, zoo = tiny_zoo
    assert build_zoo(workdir, TINY, quiet=True) == zoo  # cached: nothing rebuilt
    again = build_zoo(tmp_path, TINY, quiet=True, workers=1)  # in process, one after another
    assert again["backbone"]["fingerprint"] == zoo["backbone"]["fingerprint"]
    for name in zoo["experts"]:
        a = (workdir / "experts" / name / "v1" / "weights.safetensors").read_bytes()
        assert a == (tmp_path / "experts" / name / "v1" / "weights.safetensors").read_bytes()


def test_reproduce_reports_every_column_and_isolation(tiny_zoo):
    workdir, _ = tiny_zoo
    torch.manual_seed(0)
    report = reproduce(workdir, TINY, quiet=True)
    assert set(report["domains"]) == {"arith", "sql", "units"}
    for accs in report["domains"].values():
        assert {"backbone", "expert", "mix", "sequential", "served", "mixed_batch"} <= set(accs)
        assert all(0.0 <= v <= 1.0 for v in accs.values())
    iso = report["isolation"]
    assert iso["after_push_identical"] and iso["after_train_and_push_identical"] and iso["answers_identical"]
    # served = pushed through the registry onto the real gRPC stack, routed by the rules there
    assert report["routing_accuracy"] == {"arith": 1.0, "sql": 1.0, "units": 1.0}
    assert report["served_equals_expert"] == {"arith": True, "sql": True, "units": True}
    for accs in report["domains"].values():
        assert accs["served"] == accs["expert"]
    assert "registry" in report["note"]


def test_demo_zoo_serves_checked_answers_over_grpc(tiny_zoo, capsys):
    import argparse

    from ccoe_common.cli.demo_zoo import run_zoo

    workdir, _ = tiny_zoo
    args = argparse.Namespace(workdir=str(workdir), threads=1, json=True, per_domain=2)
    assert run_zoo(args) == 0
    out = capsys.readouterr().out  # in-process, Ray's log thread may print here too
    rows = json.JSONDecoder().raw_decode(out, out.index('{"answers"'))[0]["answers"]
    assert [r["domain"] for r in rows] == ["arith", "arith", "sql", "sql", "units", "units"]
    for r in rows:  # routed by the rule table set in the registry, to the domain's own expert
        assert r["experts"] == [f"{r['domain']}@1"] and r["rule_id"] == f"r-{r['domain']}"
        assert isinstance(r["correct"], bool) and r["question"]


def test_progress_reads_the_last_complete_metrics_line(tmp_path):
    from ccoe_common.zoo.build import _last_metrics

    path = tmp_path / "metrics.jsonl"
    assert _last_metrics(path) is None
    path.write_text('{"step": 10, "loss": 1.5}\n{"step": 20, "loss": 1.2}\n{"step": 3')  # writer mid-line
    assert _last_metrics(path) == {"step": 20, "loss": 1.2}


def test_a_failing_worker_names_its_expert(tmp_path):
    from ccoe_common.zoo.build import train_experts

    data = {d: {"train": tmp_path / "none.jsonl", "eval": tmp_path / "none.jsonl"} for d in TINY.domains}
    with pytest.raises(RuntimeError, match=r"training the \w+ expert failed: .*backbone"):
        train_experts(tmp_path, TINY, data, workers=2, quiet=True, say=print)  # no backbone in tmp_path
