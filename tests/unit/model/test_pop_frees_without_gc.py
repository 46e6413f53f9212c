"""Popping an expert frees its tensors by reference counting alone, so `pop` needs no
`gc.collect()` (a full collection stalls a serving process's engine for its whole duration)."""

from __future__ import annotations

import gc
import weakref

import torch

from ccoe_common.model import CCoEModel, Placement


def test_pop_frees_the_expert_without_a_garbage_collection(deep_qwen2_dir):
    model = CCoEModel.from_pretrained(deep_qwen2_dir)
    before = model.memory_report()
    model.push(model.carve("tmp", placement=Placement(num_layers=2)))
    refs = [weakref.ref(p) for p in model.get("tmp").parameters()]
    with torch.no_grad():  # used once, so forward caches would show up too
        model.forward(torch.tensor([[1, 2, 3]]), model.resolve(["tmp"]))
    gc.disable()
    try:
        model.pop("tmp")
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert refs and alive == 0, f"{alive} of {len(refs)} tensors of a popped expert wait for the garbage collector"
    assert model.memory_report() == before
