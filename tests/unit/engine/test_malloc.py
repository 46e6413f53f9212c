"""Tuning glibc's malloc so a step's activations reuse the pages of the step before."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from ccoe_common.engine import engine as engine_module
from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.model import CCoEModel

# Runs in a fresh interpreter, so malloc starts from glibc's defaults: a few MLP-shaped
# layers on a thread other than the main one (as the engine steps), page faults per pass.
_PROBE = """
import json, resource, sys, threading
import torch
import torch.nn.functional as F
from ccoe_common.engine.malloc import retain_freed_memory
tuned = retain_freed_memory() if sys.argv[1] == "tune" else None
torch.manual_seed(0)
w1, w2 = torch.randn(1024, 384).bfloat16(), torch.randn(1024, 384).bfloat16()
w3, x0 = torch.randn(384, 1024).bfloat16(), torch.randn(2048, 384).bfloat16()
def forward():
    x = x0
    for _ in range(4):
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        x = x + F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3)
out = {}
def run():
    for _ in range(2):
        forward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        forward()
    out["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
t = threading.Thread(target=run)
t.start()
t.join()
print(json.dumps({"tuned": tuned, "faults": out["faults"]}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tuned_malloc_stops_refaulting_activation_pages():
    default, tuned = _probe("default"), _probe("tune")
    assert tuned["tuned"] is True, "glibc (this machine's C library) should accept the settings"
    # Untuned, each pass maps thousands of fresh pages (~2 MiB tensors freed and re-made).
    assert default["faults"] > 1000, default
    assert tuned["faults"] < default["faults"] / 5, (default, tuned)


def test_engine_tunes_malloc_at_start_unless_told_not_to(deep_qwen2_dir, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(engine_module, "retain_freed_memory", lambda: calls.append(threading.current_thread().name))
    model = CCoEModel.from_pretrained(deep_qwen2_dir)
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2, max_batched_tokens=8, prefill_chunk=4)):
        assert calls == [threading.current_thread().name]
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2, max_batched_tokens=8, prefill_chunk=4,
                                    retain_freed_memory=False)):
        assert len(calls) == 1, "retain_freed_memory=False must leave malloc alone"
