"""Training data: JSONL records, rendered exactly as serving renders requests, with the loss on
response tokens only.

Two record shapes are accepted, one per line:

    {"instruction": "Add 2 and 3.", "input": "", "output": "5"}          # Alpaca
    {"messages": [{"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "5"}]}                  # chat

An Alpaca record becomes `render_alpaca(instruction, input)` + output + EOS; a chat record
becomes the tokenizer's chat template over every message but the last (with the assistant turn
opened) + the last message's content + EOS. Only the output/last-message tokens and the EOS
carry loss: the model learns to answer, not to repeat prompts (CCoE-25 Eq. 5 sums over the
target tokens y_t).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ccoe_common.engine.templates import TemplateError, render_alpaca, render_chat
from ccoe_common.errors import CCoEError

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)

RecordFormat = Literal["alpaca", "chat"]


class DataError(CCoEError, ValueError):
    """The data cannot be used as given (too many bad lines, empty file, ...)."""

    code = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Record:
    """One training example before tokenization: the prompt text and the response text."""

    prompt: str
    response: str
    line: int  # 1-based line number in its file, for error messages
    format: RecordFormat


@dataclass(frozen=True)
class BadLine:
    """A line that was skipped, e.g. BadLine(line=7, reason="missing 'output'")."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class Dataset:
    records: list[Record]
    bad: list[BadLine]
    total_lines: int  # non-blank lines read
    sha256: str  # of the file's bytes, recorded in the artifact's manifest

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total_lines if self.total_lines else 0.0


@dataclass(frozen=True)
class Example:
    """A tokenized record: input ids and labels of the same length (IGNORE_INDEX on the prompt)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def parse_record(obj: object, line: int, tokenizer=None) -> Record:
    """One JSON value -> Record; raises ValueError naming what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least two messages (a prompt and the answer)")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ValueError("the last message must be {'role': 'assistant', 'content': str} (it is the target)")
        if not last["content"]:
            raise ValueError("the last (assistant) message is empty: nothing to learn")
        if tokenizer is None:
            raise ValueError("chat records need the backbone's tokenizer")
        try:
            prompt = render_chat(tokenizer, messages[:-1])
        except TemplateError as e:
            raise ValueError(str(e)) from e
        return Record(prompt, last["content"], line, "chat")
    for key in ("instruction", "output"):
        if key not in obj:
            raise ValueError(f"missing {key!r} (an Alpaca record needs 'instruction' and 'output', or use 'messages')")
        if not isinstance(obj[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    input_text = obj.get("input", "")
    if not isinstance(input_text, str):
        raise ValueError(f"'input' must be a string, got {type(input_text).__name__}")
    if not obj["instruction"].strip():
        raise ValueError("'instruction' is empty")
    if not obj["output"]:
        raise ValueError("'output' is empty: nothing to learn")
    return Record(render_alpaca(obj["instruction"], input_text), obj["output"], line, "alpaca")


def read_records(path: str | Path, tokenizer=None, *, max_bad_fraction: float = 0.01) -> Dataset:
    """Read a JSONL file; skip bad lines, and refuse the file when too many are bad.

    max_bad_fraction=0.01 tolerates one bad line in a hundred; each bad line is reported with
    its number and reason so it can be fixed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist or is not a file")
    raw = path.read_bytes()
    records: list[Record] = []
    bad: list[BadLine] = []
    total = 0
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        total += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadLine(n, f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append(BadLine(n, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            records.append(parse_record(obj, n, tokenizer))
        except ValueError as e:
            bad.append(BadLine(n, str(e)))
    dataset = Dataset(records, bad, total, hashlib.sha256(raw).hexdigest())
    if not records:
        shown = "; ".join(map(str, bad[:5]))
        raise DataError(f"{path}: no usable records in {total} non-blank lines" + (f" ({shown})" if shown else ""))
    if dataset.bad_fraction > max_bad_fraction:
        shown = "; ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        raise DataError(
            f"{path}: {len(bad)} of {total} lines are bad ({dataset.bad_fraction:.1%}), over the allowed "
            f"{max_bad_fraction:.1%}: {shown}. Fix them or raise --max-bad-fraction"
        )
    return dataset


def tokenize(record: Record, tokenizer, max_seq_len: int) -> Example | None:
    """Prompt + response + EOS, truncated to max_seq_len; None when no response token survives.

    The prompt and the response are tokenized separately and concatenated, so the boundary
    between "no loss" and "loss" is exact (BPE merges never straddle it), and generation at
    serving time starts from exactly these prompt tokens.
    """
    prompt = tokenizer(record.prompt, add_special_tokens=False).input_ids
    response = tokenizer(record.response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    ids = (prompt + response)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_seq_len]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return Example(ids, labels)


def tokenize_all(records: Iterable[Record], tokenizer, max_seq_len: int) -> tuple[list[Example], list[BadLine]]:
    """Tokenized examples, plus the records dropped because their prompt fills max_seq_len."""
    examples: list[Example] = []
    dropped: list[BadLine] = []
    for r in records:
        ex = tokenize(r, tokenizer, max_seq_len)
        if ex is None:
            dropped.append(BadLine(r.line, f"prompt is longer than max_seq_len={max_seq_len} tokens"))
        else:
            examples.append(ex)
    return examples, dropped


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input_ids [B, T], labels [B, T] and lengths [B]."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    lens = torch.tensor([len(e.input_ids) for e in examples])
    return ids, labels, lens


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (UTF-8, no ASCII escaping)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
