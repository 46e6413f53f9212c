"""`--checkpoint DIR` of the model benchmarks: written once, reused by either benchmark for the
same shape, dtype and device, refused for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccoe_common.bench.memory import SHAPES, synthetic_checkpoint
from ccoe_common.console import UserError


def test_written_once_reused_and_refused_when_it_differs(tmp_path: Path) -> None:
    path = tmp_path / "backbone"
    assert synthetic_checkpoint(path, SHAPES["tiny"], "qwen2", "bfloat16") == path
    weights = path / "model.safetensors"
    assert (path / "tokenizer.json").exists() and weights.exists()
    written = weights.stat().st_mtime_ns
    assert synthetic_checkpoint(path, SHAPES["tiny"], "qwen2", "bfloat16") == path
    assert weights.stat().st_mtime_ns == written, "reused, not written again"
    with pytest.raises(UserError, match="another shape, dtype or device"):
        synthetic_checkpoint(path, SHAPES["tiny"], "qwen2", "float32")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no benchmark checkpoint"):
        synthetic_checkpoint(tmp_path / "other", SHAPES["tiny"], "qwen2", "bfloat16")
