"""The static decode path (model/static/decode.py) against the eager one: buckets, padding,
whole-slot attention and grouped expert MLPs give the eager path's logits (fp32, within a
stated tolerance) and its greedy tokens, also across a push that restacks the MLPs."""

from __future__ import annotations

import pytest
import torch

from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.model.kv_cache import KVCache
from ccoe_common.model.static.decode import StaticDecoder, bucket_for, bucket_sizes

MAX_SEQ = 40
# fp32 logits of two paths that sum in different orders: each dot product of n <= 128 terms
# is within n*u32 ~ 8e-6 of exact relative to its absolute terms, compounded over 4 layers
# and the LM head; 1e-4 of the logits' scale holds that with room, and a wrong row, slot,
# position or expert is off by far more (checked by the tests' own wrong-expert case).
REL_TOL = 1e-4


def _nudge(expert: LoadedExpert, seed: int, scale: float = 0.2) -> LoadedExpert:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype))
    return expert


@pytest.fixture()
def model(qwen2_dir, device) -> CCoEModel:
    """Four layers: math at 0 and 2, sql at 3, law (trailing) the last layer."""
    m = CCoEModel.from_pretrained(qwen2_dir, dtype=torch.float32, device=str(device), budget_fraction=0.5)
    m.push(_nudge(m.carve("math", placement=Placement(layers=(0, 2))), 1))
    m.push(_nudge(m.carve("sql", placement=Placement(layers=(3,))), 2))
    m.push(_nudge(m.carve("law", kind="trailing", placement=Placement(num_layers=1)), 3))
    return m


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert [bucket_for(r, bucket_sizes(12)) for r in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(13, bucket_sizes(12))


def test_static_steps_equal_eager_steps_in_a_mixed_batch(model, device):
    """Five rows over the backbone and two ffn experts with different layers (a bucket of 8:
    three padding rows), unordered slots, different lengths; four decode steps."""
    rows = [(None, 2, 5), ("math", 0, 9), ("sql", 4, 3), ("math", 1, 12), (None, 3, 7)]  # expert, slot, prompt
    keys = model.resolve([e for e, _, _ in rows])
    eager_cache = KVCache(model.config, 5, MAX_SEQ, torch.float32, device)
    static_cache = KVCache(model.config, 6, MAX_SEQ, torch.float32, device)
    static = StaticDecoder(model, static_cache, max_rows=5, graphs=device.type == "cuda")
    assert not static.accepts(model.resolve(["law"])), "trailing experts replace attention: eager path"
    gen = torch.Generator().manual_seed(5)
    last = []
    with torch.inference_mode():
        for (_, slot, n), key in zip(rows, keys, strict=True):
            ids = torch.randint(3, 300, (1, n), generator=gen).to(device)
            for cache in (eager_cache, static_cache):
                logits = model.forward(ids, [key], cache=cache, slots=torch.tensor([slot], device=device),
                                       logits_at=torch.tensor([n - 1], device=device))
            last.append(int(logits.argmax()))
        tokens, lengths = list(last), [n for _, _, n in rows]
        slots = [s for _, s, _ in rows]
        for _ in range(4):
            eager = model.forward(torch.tensor(tokens, device=device)[:, None], keys,
                                  positions=torch.tensor(lengths, device=device)[:, None], cache=eager_cache,
                                  slots=torch.tensor(slots, device=device),
                                  logits_at=torch.zeros(len(rows), dtype=torch.long, device=device))
            got = static.decode(tokens, lengths, slots, keys).clone()
            scale = eager.abs().max()
            assert (got - eager).abs().max() <= REL_TOL * scale
            assert got.argmax(-1).tolist() == eager.argmax(-1).tolist()
            tokens = eager.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
        # The same step with rows 1 and 2 on swapped experts gives other logits: the grouping
        # follows each row's expert, not its place in the batch.
        swapped = [keys[0], keys[2], keys[1], keys[3], keys[4]]
        other = static.decode(tokens, lengths, slots, swapped)
        reference = model.forward(torch.tensor(tokens, device=device)[:, None], keys,
                                  positions=torch.tensor(lengths, device=device)[:, None], cache=eager_cache,
                                  slots=torch.tensor(slots, device=device),
                                  logits_at=torch.zeros(len(rows), dtype=torch.long, device=device))
        assert (other[1] - reference[1]).abs().max() > 100 * REL_TOL * reference.abs().max()
    if device.type == "cuda":
        assert static.captures >= 1


def _requests() -> list[tuple[list[int], str | None, int]]:
    # law ends first: the steps after it have no trailing-expert row and run static.
    return [(list(range(3, 20)), "math", 8), ([7, 8, 9], None, 6), (list(range(50, 58)), "sql", 7),
            ([11, 12], "law", 3)]


def _serve(model: CCoEModel, static: bool, requests) -> list[list[int]]:
    config = EngineConfig(max_seq_len=64, max_running=6, max_batched_tokens=32, prefill_chunk=8,
                          static_decode=static)
    with Engine(model, config) as engine:
        import asyncio

        async def run():
            return await asyncio.gather(*(engine.complete(GenerationRequest(
                prompt_ids=p, expert=e, sampling=SamplingParams.create(max_new_tokens=n, ignore_eos=True)))
                for p, e, n in requests))

        results = asyncio.run(run())
        used = engine.static
    if static:
        assert used is not None
    return [r.token_ids for r in results]


def test_engine_greedy_tokens_equal_the_eager_engine(model, monkeypatch):
    """Mixed batches with a trailing expert (those steps go eager) and without; then a push
    and a pop between runs restack the MLPs (layer 0 is left with the backbone alone)."""
    calls = {"static": 0}
    original = StaticDecoder.decode

    def counting(self, *args, **kwargs):
        calls["static"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StaticDecoder, "decode", counting)
    requests = _requests()
    eager = _serve(model, False, requests)
    assert calls["static"] == 0
    assert _serve(model, True, requests) == eager
    assert calls["static"] > 0, "some decode steps had no trailing-expert row and took the static path"
    model.push(_nudge(model.carve("units", placement=Placement(layers=(1, 2))), 4))
    model.pop("math")
    changed = [r for r in requests if r[1] != "math"] + [([4, 5, 6], "units", 6)]
    assert _serve(model, True, changed) == _serve(model, False, changed)


def test_static_decode_and_compile_are_exclusive():
    with pytest.raises(ValueError, match="choose one"):
        EngineConfig(compile=True, static_decode=True)
