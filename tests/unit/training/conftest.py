"""Small instruction files and a loaded tiny model shared by the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ccoe_common.model import CCoEModel


def write_records(path: Path, n: int, seed: int = 0, bad_lines: dict[int, str] | None = None) -> Path:
    """n Alpaca records ("Add a and b." -> "a+b"); bad_lines maps a 1-based line number to raw text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        lines.append(json.dumps({"instruction": f"Add {a} and {b}.", "output": str(a + b)}))
    for line_no, text in sorted((bad_lines or {}).items()):
        lines.insert(line_no - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def model(qwen2_dir) -> CCoEModel:
    return CCoEModel.from_pretrained(qwen2_dir)


@pytest.fixture(scope="session")
def records_file(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "add.jsonl", 40)
