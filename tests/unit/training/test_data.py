"""Records, rendering and loss masking: the prompt is rendered as serving renders it and
carries no loss; bad lines are reported by number and too many refuse the file."""

from __future__ import annotations

import json

import pytest
import torch

from ccoe_common.engine.templates import render_alpaca, render_chat
from ccoe_common.model.synthetic import build_tokenizer
from ccoe_common.training.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    read_records,
    tokenize,
    tokenize_all,
)
from ccoe_common.training.trainer import _loss_sum
from tests.unit.training.conftest import write_records


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def test_alpaca_record_masks_the_prompt_and_ends_with_eos(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Add 2 and 3.", "input": "carefully", "output": "5"}) + "\n")
    ds = read_records(path, tok)
    (rec,) = ds.records
    assert rec.prompt == render_alpaca("Add 2 and 3.", "carefully")
    ex = tokenize(rec, tok, 512)
    prompt_ids = tok(rec.prompt, add_special_tokens=False).input_ids
    answer_ids = [*tok("5", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert ex.input_ids == prompt_ids + answer_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert ex.response_tokens == len(answer_ids)


def test_chat_record_uses_the_tokenizer_template(tmp_path, tok):
    msgs = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    (rec,) = read_records(path, tok).records
    assert rec.format == "chat" and rec.prompt == render_chat(tok, msgs[:1]) and rec.response == "5"


def test_prompt_tokens_get_no_loss():
    # Logits at positions that predict prompt tokens may be anything: the loss does not move.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 2]])
    logits = torch.randn(1, 5, 16)
    before = _loss_sum(logits, labels)
    logits[0, :2] = torch.randn(2, 16) * 100  # positions 0, 1 predict tokens 1, 2 (prompt)
    assert torch.equal(_loss_sum(logits, labels), before)
    logits[0, 2] += torch.randn(16)  # position 2 predicts token 3, a response token
    assert not torch.equal(_loss_sum(logits, labels), before)


def test_bad_lines_are_reported_with_numbers_and_reasons(tmp_path, tok):
    path = write_records(tmp_path / "d.jsonl", 100, bad_lines={
        3: "{not json", 10: json.dumps({"instruction": "x"}), 20: json.dumps([1, 2]),
    })
    ds = read_records(path, tok, max_bad_fraction=0.05)
    assert len(ds.records) == 100 and ds.total_lines == 103
    assert [(b.line, b.reason.split(" (")[0]) for b in ds.bad] == [
        (3, "invalid JSON"), (10, "missing 'output'"), (20, "expected a JSON object, got list")]


def test_non_utf8_and_empty_outputs_are_bad_lines(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(b"\n".join([good, b"\xff\xfe{}", json.dumps({"instruction": "a", "output": ""}).encode(), good]))
    ds = read_records(path, tok, max_bad_fraction=0.5)
    assert [b.line for b in ds.bad] == [2, 3]
    assert "not UTF-8" in ds.bad[0].reason and "'output' is empty" in ds.bad[1].reason


def test_too_many_bad_lines_refuse_the_file(tmp_path, tok):
    path = write_records(tmp_path / "d.jsonl", 20, bad_lines={1: "oops", 5: "{}"})
    with pytest.raises(DataError, match=r"2 of 22 lines are bad \(9.1%\), over the allowed 5.0%.*line 1: invalid JSON"):
        read_records(path, tok, max_bad_fraction=0.05)
    assert len(read_records(path, tok, max_bad_fraction=0.1).records) == 20


def test_prompts_longer_than_max_seq_len_are_dropped_not_silently_trained(tmp_path, tok):
    path = write_records(tmp_path / "d.jsonl", 3)
    ds = read_records(path, tok)
    examples, dropped = tokenize_all(ds.records, tok, max_seq_len=10)
    assert examples == [] and [d.line for d in dropped] == [1, 2, 3]


def test_collate_right_pads(tok):
    from ccoe_common.training.data import Example

    ids, labels, lens = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert lens.tolist() == [3, 1]
