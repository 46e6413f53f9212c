"""The engine on real (tiny) models: correctness under batching, pinning, draining, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from ccoe_common.engine.engine import Engine, EngineConfig
from ccoe_common.engine.errors import Cancelled, DeadlineExceeded, Overloaded
from ccoe_common.engine.params import GenerationRequest, SamplingParams
from ccoe_common.engine.templates import render_alpaca, render_chat
from ccoe_common.errors import ExpertNotFound, ExpertNotReady, InvalidRequest
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model import CCoEModel, Placement
from ccoe_common.model import backbone as backbone_module
from ccoe_common.model.generate import greedy_generate
from tests.helpers import nudge


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams.create(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture()
def model(deep_qwen2_dir) -> CCoEModel:
    m = CCoEModel.from_pretrained(deep_qwen2_dir, budget_fraction=0.5)
    m.push(nudge(m.carve("math", placement=Placement(num_layers=3)), 1, scale=0.2))
    m.push(nudge(m.carve("sql", placement=Placement(strategy="FE", num_layers=2)), 2, scale=0.2))
    m.push(nudge(m.carve("law", kind="trailing", placement=Placement(num_layers=2)), 3, scale=0.2))
    return m


@pytest.fixture()
def engine(model):
    with Engine(model, EngineConfig(max_seq_len=96, max_running=6, max_batched_tokens=24, prefill_chunk=8)) as e:
        yield e


def solo(model: CCoEModel, prompt: list[int], n: int, expert=None) -> list[int]:
    return greedy_generate(model, prompt, n, expert=expert, stop_token_ids=[]).token_ids


@pytest.mark.parametrize("variant", ["qwen2-gqa-bias", "llama-gqa-nobias"])
def test_greedy_equals_transformers_generate(checkpoints, variant):
    path = checkpoints[variant]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = CCoEModel.from_pretrained(path)
    prompt = model.tokenizer("Convert 5 km to meters.", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2, max_batched_tokens=8, prefill_chunk=4)) as eng:
        got = eng.complete_sync(GenerationRequest(prompt_ids=prompt, sampling=greedy(20)), timeout=60)
    assert got.token_ids == expected and got.finish_reason == "length"


def test_requests_in_a_busy_mixed_batch_equal_their_solo_runs(model, engine):
    """Experts' requests arrive and leave mid-flight, with long prompts chunked."""
    cases = [
        (list(range(3, 40)), "math", 18),  # 37-token prompt: five chunks
        ([7, 8, 9], None, 6),
        (list(range(50, 62)), "law", 14),
        ([11, 12], "sql", 3),
        (list(range(100, 130)), "sql", 10),
        ([5, 6, 7, 8], "math", 20),
        ([9] * 20, None, 9),
        ([21, 22, 23], "law", 5),
    ]
    expected = [solo(model, p, n, e) for p, e, n in cases]

    async def run():
        tasks = []
        for i, (p, e, n) in enumerate(cases):
            tasks.append(asyncio.create_task(engine.complete(GenerationRequest(prompt_ids=p, expert=e,
                                                                               sampling=greedy(n)))))
            await asyncio.sleep(0.01 * (i % 3))  # staggered arrivals
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for (p, e, _), res, exp in zip(cases, results, expected, strict=True):
        assert res.token_ids == exp, (e, p[:3])
        assert res.expert == (None if e is None else model.get(e).key)
    assert engine.stats().running == 0 and engine.stats().free_slots == 6


def test_a_seeded_sampled_request_draws_the_same_alone_or_in_a_busy_batch(model, engine):
    """Sampling is batched across rows; a seeded request must not notice who shares its steps."""
    prompt = list(range(40, 52))
    params = SamplingParams.create(max_new_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    alone = engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math", sampling=params), timeout=60)
    company = [([5, 6, 7], None, SamplingParams.create(max_new_tokens=10, ignore_eos=True, temperature=1.2, seed=1)),
               ([8, 9], "sql", greedy(12)),
               (list(range(60, 70)), "law", SamplingParams.create(max_new_tokens=14, ignore_eos=True, temperature=0.7,
                                                                  top_k=5, seed=2, logprobs=True))]

    async def run():
        tasks = [asyncio.create_task(engine.complete(GenerationRequest(prompt_ids=p, expert=e, sampling=s)))
                 for p, e, s in company[:2]]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(engine.complete(GenerationRequest(prompt_ids=prompt, expert="math",
                                                                           sampling=params))))
        await asyncio.sleep(0.01)
        p, e, s = company[2]
        tasks.append(asyncio.create_task(engine.complete(GenerationRequest(prompt_ids=p, expert=e, sampling=s))))
        return await asyncio.gather(*tasks)

    busy = asyncio.run(run())[2]
    assert busy.token_ids == alone.token_ids
    other_seed = SamplingParams.create(max_new_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=40,
                                       seed=8)
    assert engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math", sampling=other_seed),
                                timeout=60).token_ids != alone.token_ids


def test_version_pinning_across_a_push(model, engine):
    prompt = [30, 31, 32, 33]
    v1_tokens = solo(model, prompt, 60, "math@1")
    v2 = nudge(model.carve("math", placement=Placement(num_layers=3), version=2), 9, scale=0.3)
    events: list = []
    first_tokens = threading.Event()

    def sink(ev):
        events.append(ev)
        if len(events) == 3:
            first_tokens.set()

    engine.submit(GenerationRequest(prompt_ids=prompt, expert="math", sampling=greedy(60)), sink)
    assert first_tokens.wait(30)
    assert engine.push(v2) == ExpertKey("math", 2)
    newer = engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math", sampling=greedy(12)), timeout=60)
    deadline = time.monotonic() + 60
    while not (events and getattr(events[-1], "finish_reason", None)) and time.monotonic() < deadline:
        time.sleep(0.01)
    long_tokens = [t for ev in events for t in ev.token_ids]
    assert long_tokens == v1_tokens and all(ev.expert == ExpertKey("math", 1) for ev in events)
    assert newer.expert == ExpertKey("math", 2)
    assert newer.token_ids == solo(model, prompt, 12, "math@2") != v1_tokens[:12]


def test_a_staged_version_serves_only_its_smoke_test_until_admitted(model, engine):
    prompt = [30, 31, 32, 33]
    v2 = nudge(model.carve("math", placement=Placement(num_layers=3), version=2), 9, scale=0.3)
    assert engine.push(v2, staged=True) == ExpertKey("math", 2)
    assert engine.stats().staged == ["math@2"]

    by_name = engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math", sampling=greedy(4)), timeout=60)
    assert by_name.expert == ExpertKey("math", 1)  # the newest *admitted* version
    with pytest.raises(ExpertNotReady, match=r"math@2 is still being smoke-tested here \(staged\); retry in a few "
                                             r"seconds; live versions: \[1\]") as refused:
        engine.submit(GenerationRequest(prompt_ids=prompt, expert="math@2", sampling=greedy(2)), lambda ev: None)
    assert (refused.value.code, refused.value.retryable) == ("UNAVAILABLE", True)  # transient, unlike a missing version
    trial = engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math@2", sampling=greedy(8),
                                                   allow_staged=True), timeout=60)
    assert trial.expert == ExpertKey("math", 2) and trial.token_ids == solo(model, prompt, 8, "math@2")

    engine.admit(ExpertKey("math", 2))
    assert engine.stats().staged == []
    after = engine.complete_sync(GenerationRequest(prompt_ids=prompt, expert="math", sampling=greedy(4)), timeout=60)
    assert after.expert == ExpertKey("math", 2)
    with pytest.raises(ExpertNotFound, match=r"math@2 is not staged here \(already admitted\)"):
        engine.admit(ExpertKey("math", 2))


def test_a_staged_version_that_is_popped_is_freed(model, engine):
    v2 = nudge(model.carve("math", placement=Placement(num_layers=3), version=2), 9, scale=0.3)
    engine.push(v2, staged=True)
    assert engine.pop("math", 2, wait=10) == [ExpertKey("math", 2)]
    assert ExpertKey("math", 2) not in model.resident()
    assert engine.stats().staged == [] and engine.stats().draining == []
    with pytest.raises(ExpertNotFound, match=r"math@2 is not staged here \(not resident\)"):
        engine.admit(ExpertKey("math", 2))


def test_pop_drains_then_frees(model, engine):
    prompt = [40, 41, 42]
    expected = solo(model, prompt, 50, "sql")
    started = threading.Event()
    done = threading.Event()
    events: list = []

    def sink(ev):
        events.append(ev)
        started.set()
        if getattr(ev, "finish_reason", None):
            done.set()

    engine.submit(GenerationRequest(prompt_ids=prompt, expert="sql", sampling=greedy(50)), sink)
    assert started.wait(30)
    assert engine.pop("sql") == [ExpertKey("sql", 1)]
    with pytest.raises(ExpertNotFound, match="sql@1 is being removed"):
        engine.submit(GenerationRequest(prompt_ids=prompt, expert="sql@1", sampling=greedy(2)), lambda ev: None)
    with pytest.raises(ExpertNotFound, match="expert sql is not served here"):
        engine.submit(GenerationRequest(prompt_ids=prompt, expert="sql", sampling=greedy(2)), lambda ev: None)
    assert done.wait(60)
    assert [t for ev in events for t in ev.token_ids] == expected  # finished normally, on the draining version
    deadline = time.monotonic() + 10
    while ExpertKey("sql", 1) in model.resident() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ExpertKey("sql", 1) not in model.resident() and engine.stats().draining == []


def test_pop_of_an_idle_expert_frees_at_once_and_can_export(model, engine, tmp_path):
    keys = engine.pop("law", export_to=str(tmp_path / "law"), wait=5)
    assert keys == [ExpertKey("law", 1)] and ExpertKey("law", 1) not in model.resident()
    assert engine.push(str(tmp_path / "law")) == ExpertKey("law", 1)


def test_cancel_by_leaving_the_stream_frees_the_slot(engine):
    async def run():
        got = []
        async for delta in engine.generate(GenerationRequest(prompt_ids=[5, 6], sampling=greedy(80))):
            got.append(delta)
            if len(got) == 2:
                break
        return got

    assert len(asyncio.run(run())) == 2
    deadline = time.monotonic() + 10
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().free_slots == 6


def test_cancel_by_id_ends_the_request_with_cancelled(engine):
    req = GenerationRequest(prompt_ids=[5, 6], sampling=greedy(80))
    errors = []
    first = threading.Event()

    def sink(ev):
        if isinstance(ev, Exception):
            errors.append(ev)
        first.set()

    engine.submit(req, sink)
    assert first.wait(30)
    assert engine.cancel(req.request_id)
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(errors[0], Cancelled) and errors[0].code == "CANCELLED"
    assert engine.stats().free_slots == 6 and not engine.cancel(req.request_id)


def test_cancelling_a_running_request_leaves_the_rest_of_its_step_alone(model, engine):
    """Invariant 7: the other rows of the step the cancel lands in finish with their own tokens."""
    prompt = [30, 31, 32]
    expected = solo(model, prompt, 40, "math")
    doomed: list = []
    other: list = []
    decoding, finished = threading.Event(), threading.Event()

    def doomed_sink(ev):
        doomed.append(ev)
        if len(doomed) == 2:
            decoding.set()

    def other_sink(ev):
        other.append(ev)
        if isinstance(ev, Exception) or ev.finish_reason:
            finished.set()

    engine.submit(GenerationRequest(request_id="doomed", prompt_ids=[40, 41], sampling=greedy(90)), doomed_sink)
    engine.submit(GenerationRequest(request_id="other", prompt_ids=prompt, expert="math", sampling=greedy(40)),
                  other_sink)
    assert decoding.wait(30)
    assert engine.cancel("doomed")
    assert finished.wait(60)
    assert not any(isinstance(ev, Exception) for ev in other), other[-1]
    assert [t for ev in other for t in ev.token_ids] == expected and other[-1].finish_reason == "length"
    assert isinstance(doomed[-1], Cancelled), "the cancelled request ends once, with Cancelled"
    assert sum(isinstance(ev, Exception) for ev in doomed) == 1


def test_deadline_ends_a_long_request_and_frees_its_slot(engine):
    with pytest.raises(DeadlineExceeded, match="exceeded its 0.2s deadline"):
        engine.complete_sync(GenerationRequest(prompt_ids=[5, 6], sampling=greedy(90), timeout_s=0.2), timeout=60)
    assert engine.stats().free_slots == 6
    # and the engine still serves
    done = engine.complete_sync(GenerationRequest(prompt_ids=[5], sampling=greedy(2)), timeout=60)
    assert done.usage.completion_tokens == 2


def test_overload_is_retryable_and_nothing_queued_is_lost(model):
    with Engine(model, EngineConfig(max_seq_len=96, max_running=1, max_batched_tokens=8, max_waiting=1)) as eng:
        sinks: list[list] = [[], []]
        eng.submit(GenerationRequest(prompt_ids=[5], sampling=greedy(40)), sinks[0].append)
        deadline = time.monotonic() + 30
        while not sinks[0] and time.monotonic() < deadline:  # first one admitted: the queue is empty again
            time.sleep(0.001)
        eng.submit(GenerationRequest(prompt_ids=[6], sampling=greedy(5)), sinks[1].append)
        with pytest.raises(Overloaded) as err:
            eng.submit(GenerationRequest(prompt_ids=[7], expert="math", sampling=greedy(5)), lambda ev: None)
        assert err.value.retryable and err.value.code == "RESOURCE_EXHAUSTED" and "retry in 1.0s" in str(err.value)
        assert "all 1 sequence slots are busy" in str(err.value)
        assert eng.residency.in_use(ExpertKey("math", 1)) == 0, "a refused request holds no version"
        deadline = time.monotonic() + 60
        while not all(s and getattr(s[-1], "finish_reason", None) for s in sinks) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [sum(len(ev.token_ids) for ev in s) for s in sinks] == [40, 5]


@pytest.mark.parametrize(("request_kwargs", "param", "fragment"), [
    ({"prompt_ids": list(range(3, 99))}, "prompt", "has 96 tokens; this engine's max_seq_len is 96"),
    ({"prompt_ids": [5, 100000]}, "prompt_ids", "token ids must be in [0, 384), got [100000]"),
    ({"prompt": "x", "prompt_ids": [5]}, "prompt", "exactly one of prompt, messages, prompt_ids"),
    ({"prompt": ""}, "prompt", "is empty"),
    ({"messages": [{"role": "user"}], "template": "chat"}, "messages", "messages[0] must be"),
    ({"prompt": "x", "timeout_s": -1}, "timeout_s", "must be > 0"),
])
def test_invalid_requests_name_the_field(engine, request_kwargs, param, fragment):
    with pytest.raises(InvalidRequest) as err:
        engine.submit(GenerationRequest(**request_kwargs), lambda ev: None)
    assert err.value.param == param and fragment in str(err.value)
    assert engine.stats().waiting == 0


def test_unknown_expert_is_not_found(engine):
    with pytest.raises(ExpertNotFound, match=r"expert medical is not served here; resident experts: \['law@1', "):
        engine.submit(GenerationRequest(prompt="x", expert="medical"), lambda ev: None)


def test_templates_render_as_training_does(model):
    engine = Engine(model, EngineConfig(max_seq_len=256, max_running=2, max_batched_tokens=64)).start()
    tok = model.tokenizer
    chat = [{"role": "user", "content": "Compute 12 + 7"}]
    res = engine.complete_sync(GenerationRequest(messages=chat, template="chat", sampling=greedy(4)), timeout=60)
    assert res.usage.prompt_tokens == len(tok(render_chat(tok, chat), add_special_tokens=False).input_ids)
    res = engine.complete_sync(GenerationRequest(prompt="Compute 12 + 7", template="alpaca", sampling=greedy(4)),
                               timeout=60)
    prompt_ids = tok(render_alpaca("Compute 12 + 7")).input_ids
    assert res.usage.prompt_tokens == len(prompt_ids)
    assert res.token_ids == solo(model, prompt_ids, 4)
    engine.stop()


def test_stop_string_cuts_text_and_streaming_concatenates(model, engine):
    free = engine.complete_sync(GenerationRequest(prompt="The court held", sampling=greedy(24)), timeout=60)
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = engine.complete_sync(GenerationRequest(prompt="The court held", sampling=greedy(24, stop=[stop])), timeout=60)
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]

    async def deltas():
        return [d async for d in engine.generate(GenerationRequest(prompt="The court held", sampling=greedy(24)))]

    ds = asyncio.run(deltas())
    assert "".join(d.text for d in ds) == free.text and [t for d in ds for t in d.token_ids] == free.token_ids
    assert ds[-1].finish_reason == "length" and all(d.finish_reason is None for d in ds[:-1])


def test_eos_stops_unless_ignored(model, engine):
    free = solo(model, [5, 6, 7], 12)
    eos = free[4]
    model_eos = engine.eos_ids
    engine.eos_ids = frozenset({eos})
    try:
        res = engine.complete_sync(GenerationRequest(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=12)),
                                   timeout=60)
        assert res.finish_reason == "stop" and res.token_ids == free[: free.index(eos) + 1]
        res = engine.complete_sync(GenerationRequest(prompt_ids=[5, 6, 7], sampling=greedy(12)), timeout=60)
        assert res.token_ids == free
    finally:
        engine.eos_ids = model_eos


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams.create(temperature=0.9, top_p=0.95, top_k=40, seed=11, max_new_tokens=16,
                                   ignore_eos=True, logprobs=True)
    alone = engine.complete_sync(GenerationRequest(prompt_ids=[5, 6], expert="math", sampling=params), timeout=60)

    async def crowded():
        reqs = [GenerationRequest(prompt_ids=[5, 6], expert="math", sampling=params)] + [
            GenerationRequest(prompt_ids=[9, 9, 9], expert=e, sampling=greedy(10)) for e in ("law", None, "sql")]
        return await asyncio.gather(*(engine.complete(r) for r in reqs))

    assert asyncio.run(crowded())[0].token_ids == alone.token_ids
    assert len(alone.logprobs) == 16 and all(lp <= 0 for lp in alone.logprobs)


def test_bfloat16_engine_matches_bfloat16_reference(deep_qwen2_dir):
    model = CCoEModel.from_pretrained(deep_qwen2_dir, dtype=torch.bfloat16)
    with Engine(model, EngineConfig(max_seq_len=64, max_running=2, max_batched_tokens=8, prefill_chunk=4)) as eng:
        got = eng.complete_sync(GenerationRequest(prompt_ids=[5, 6, 7, 8, 9], sampling=greedy(10)), timeout=60)
    assert got.token_ids == solo(model, [5, 6, 7, 8, 9], 10)


def test_compiled_layers_give_the_eager_tokens(model):
    """EngineConfig(compile=True): the same greedy tokens as eager, for rows on the bare
    backbone and on experts (whose mixed layers stay eager), alone and batched."""
    cases = [([5, 6, 7, 8, 9], None, 8), (list(range(20, 33)), "math", 8), ([40, 41, 42], "law", 6),
             ([7, 7, 7, 7], None, 5)]
    expected = [solo(model, p, n, e) for p, e, n in cases]
    config = EngineConfig(max_seq_len=64, max_running=4, max_batched_tokens=32, prefill_chunk=16, compile=True)
    with Engine(model, config) as eng:
        assert model.backbone._layer_fn is not backbone_module._run_layer
        alone = eng.complete_sync(GenerationRequest(prompt_ids=cases[0][0], sampling=greedy(cases[0][2])),
                                  timeout=600)

        async def run():
            return await asyncio.gather(*(eng.complete(GenerationRequest(prompt_ids=p, expert=e, sampling=greedy(n)))
                                          for p, e, n in cases))

        batched = asyncio.run(run())
    assert alone.token_ids == expected[0]
    for (p, e, _), res, exp in zip(cases, batched, expected, strict=True):
        assert res.token_ids == exp, (e, p[:3])
