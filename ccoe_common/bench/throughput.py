"""`ccoe bench throughput`: generation speed of CCoE vs the bare backbone, multi-LoRA and
separate models, measured side by side in one process.

Every system is built from one random-weight Qwen2-shaped checkpoint, in one dtype, with the
same torch thread count, and generates exactly the same number of tokens per request (greedy,
`ignore_eos` / `min_new_tokens`). Only generated tokens count.

Workload A, "sequential" (the papers' setup, CCoE-25 Fig. 3): requests one at a time,
cycling through the 5 domains for several rounds.

- `ccoe`: the engine, each request on its domain's expert;
- `backbone`: the same engine, bare backbone;
- `peft_lora`: one transformers model with 5 peft LoRA adapters, `set_adapter` then `generate`;
- `ensemble`: 5 separate full models (one engine each), each request on its domain's model.

Workload B, "batched": all requests of a batch spread over the 5 domains.

- `ccoe_mixed`: all submitted at once to the engine, one batch mixing the 5 experts;
- `backbone`: the same requests, all on the bare backbone;
- `hf_sequential`: transformers `generate`, one request at a time (on a subset of the batch:
  its rate per token does not depend on how many requests run);
- `ensemble`: 5 models one after another, each serving its domain's requests as one batch;
- `peft_lora`: one mixed-adapter batch, `generate(..., adapter_names=[...])`.

The machine is shared and noisy, so the systems' rounds are interleaved (the order rotates
every round) and each system's rate is the median of its per-round rates.

    ccoe bench throughput              # the 159M-parameter "150m" shape, bf16, ~4 minutes on 2 cores
    ccoe bench throughput --quick      # smaller workloads, < 5 minutes on 2 cores
    ccoe bench throughput --shape 0.5b # Qwen2-0.5B's shape: ~7 minutes, ~10 GB
    ccoe bench throughput --shape tiny --seq-rounds 1 --batch-requests 5 --json
    ccoe bench throughput --device cuda --shape 7b --json   # a GPU: Llama-2-7B's shape, static decode path

On `--device cuda` the engines take the static decode path (`EngineConfig.static_decode`:
bucketed batch sizes, grouped expert MLPs, CUDA graphs) unless `--decode-path eager`, and the
report adds `roofline`: batch-1 decode of the bare backbone against the card's copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccoe_common.bench.memory import (
    LORA_RANK,
    LORA_TARGETS,
    SHAPE_ARCH,
    _materialize,
    _quiet_transformers,
    clone_backbone,
    lora_model,
    synthetic_checkpoint,
)
from ccoe_common.bench.memory import SHAPES as MEMORY_SHAPES
from ccoe_common.console import Progress, UserError, add_json_flag, format_table, human_bytes, positive_int, print_json
from ccoe_common.engine.openmp import release_openmp_workers

NUM_DOMAINS = 5
SEQ_SYSTEMS = ("ccoe", "backbone", "peft_lora", "ensemble")
BATCH_SYSTEMS = ("ccoe_mixed", "backbone", "hf_sequential", "ensemble", "peft_lora")

# Transformers config overrides for `make_checkpoint`. "0.5b" is Qwen2-0.5B's shape
# (494M parameters, tied embeddings); its default expert is 5 GL-spread MLP layers (13.2%).
# The default is "150m" (the memory benchmark's shape, experts at 14.9%): ~4 minutes on
# 2 cores, where 0.5b takes ~7.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 4096, "rope_theta": 1000000.0},
    "150m": MEMORY_SHAPES["150m"],
    "tiny": MEMORY_SHAPES["tiny"],
    "7b": MEMORY_SHAPES["7b"],
}
DTYPES = ("bfloat16", "float32")
DEVICES = ("cpu", "cuda")
DECODE_PATHS = ("auto", "eager", "static")
NOISE_STD = 1e-3  # per-expert perturbation, so the 5 experts are truly different tensors


@dataclass(frozen=True)
class Workload:
    """Sizes of both workloads, e.g. 64 requests x (128 prompt + 64 new tokens) per batch."""

    seq_rounds: int  # workload A: rounds of 5 requests (one per domain) per system
    seq_prompt: int
    seq_new: int
    batch_rounds: int  # workload B: rounds of one batch per system
    batch_requests: int
    batch_prompt: int
    batch_new: int
    hf_requests: int  # requests hf_sequential runs per round (a subset of the batch)


FULL = Workload(seq_rounds=3, seq_prompt=32, seq_new=32, batch_rounds=2, batch_requests=64,
                batch_prompt=128, batch_new=64, hf_requests=4)
QUICK = Workload(seq_rounds=2, seq_prompt=16, seq_new=16, batch_rounds=2, batch_requests=20,
                 batch_prompt=32, batch_new=16, hf_requests=3)
DEFAULT_SHAPE = QUICK_SHAPE = "150m"


# ---- CLI ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ccoe bench throughput`."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help=f"backbone shape (default {DEFAULT_SHAPE}; 0.5b = Qwen2-0.5B's; tiny = a toy)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller workloads: same systems and keys, < 5 minutes on 2 cores")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="weights dtype of every system (bfloat16: AMX matmuls are faster on this CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every system (default: the CPU count)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where every system runs (cuda: the first GPU)")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                        help="keep the random-weight checkpoint in DIR and reuse it when DIR already holds one "
                             "(default: a temporary directory); `ccoe bench memory --checkpoint` takes the same")
    parser.add_argument("--decode-path", choices=DECODE_PATHS, default="auto",
                        help="the engines' decode step: static (EngineConfig.static_decode) or eager; "
                             "auto = static on cuda, eager on cpu")
    for f in dataclasses.fields(Workload):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=positive_int, default=None, metavar="N",
                            help=f"override the workload's {f.name}")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json_flag(parser)


def workload_from_args(args: argparse.Namespace, quick: Any = None, full: Any = None) -> Any:
    """The --quick or full workload (a dataclass), with every field given on the command line
    replacing its default. Shared by the benchmarks; defaults to this one's workloads."""
    base = (quick or QUICK) if args.quick else (full or FULL)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(base)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **overrides)


# ---- the systems ----------------------------------------------------------------------------


@dataclass
class Systems:
    """Everything measured, built once: engines and transformers models."""

    ccoe: Any  # Engine over the backbone with the 5 experts resident
    experts: list[Any]  # ExpertKey per domain
    ensemble: list[Any]  # one Engine per domain, each over its own full model
    peft: Any  # peft model with adapters d0..d4
    hf: Any  # plain transformers model
    facts: dict[str, Any]

    def stop(self) -> None:
        for engine in [self.ccoe, *self.ensemble]:
            engine.stop()


def _perturb(params: Sequence[Any], seed: int) -> None:
    import torch

    # Drawn where the weights are: a 7B expert's ~1e9 values take seconds on a GPU, a minute
    # on the CPU (the noise differs by device; only its size matters).
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device) * NOISE_STD).to(p.dtype))


def _unique_bytes(named: Sequence[tuple[str, Any]]) -> int:
    seen: set[int] = set()
    total = 0
    for _, p in named:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def build_systems(checkpoint: Path, dtype_name: str, wl: Workload, progress: Progress, device: str = "cpu",
                  static_decode: bool = False) -> Systems:
    import torch
    from transformers import AutoModelForCausalLM

    from ccoe_common.engine.engine import Engine, EngineConfig
    from ccoe_common.model import CCoEModel

    dtype = getattr(torch, dtype_name)
    max_seq_len = max(wl.seq_prompt + wl.seq_new, wl.batch_prompt + wl.batch_new) + 8
    per_domain = -(-wl.batch_requests // NUM_DOMAINS)

    def engine_config(max_running: int) -> EngineConfig:
        # Whole prompts in one chunk; up to 16 prompts (or 2048 tokens) per prefill step.
        chunk = max(wl.batch_prompt, wl.seq_prompt)
        return EngineConfig(max_seq_len=max_seq_len, max_running=max_running, prefill_chunk=chunk,
                            max_batched_tokens=max(max_running, min(2048, 16 * chunk) + max_running),
                            static_decode=static_decode)

    model = CCoEModel.from_pretrained(checkpoint, dtype=dtype, device=device)
    experts = []
    for d in range(NUM_DOMAINS):
        expert = model.carve(f"d{d}", domains=[f"domain{d}"])
        _perturb(expert.parameters(), seed=100 + d)
        experts.append(model.push(expert))
    ccoe = Engine(model, engine_config(wl.batch_requests)).start()
    progress.step(f"ccoe engine: backbone + {NUM_DOMAINS} experts at layers {list(model.get(experts[0]).layers)}")

    # The ensemble: model d is the backbone with expert d's weights written in, i.e. what a
    # full fine-tune per domain would give, as a separate copy of every weight (copied from
    # the loaded backbone, not loaded again: the same tensors, in a second instead of a
    # reload per model at 7B).
    ensemble = []
    for d in range(NUM_DOMAINS):
        full = clone_backbone(model)
        result = full.backbone.load_state_dict(
            {k: v.detach().clone() for k, v in model.get(experts[d]).state_dict().items()}, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"expert tensors not in the backbone: {result.unexpected_keys[:3]}")
        ensemble.append(Engine(full, engine_config(per_domain)).start())
    progress.step(f"ensemble: {NUM_DOMAINS} full models")

    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
        peft = lora_model(checkpoint, dtype, [f"d{d}" for d in range(NUM_DOMAINS)], device=device)
        placement = {} if device == "cpu" else {"device_map": device}
        hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, **placement)
        _materialize(hf)
    hf.eval()
    for m in (peft.get_base_model(), hf):
        head_on_rows(m)
    progress.step(f"peft: {NUM_DOMAINS} LoRA adapters (rank {LORA_RANK}); plain transformers model")

    report = model.memory_report()
    named = list(peft.named_parameters())
    adapter_bytes = [_unique_bytes([(n, p) for n, p in named if f".d{d}." in n and "lora_" in n])
                     for d in range(NUM_DOMAINS)]
    facts = {
        "backbone_bytes": report.backbone_bytes,
        "expert_bytes": [report.experts[str(k)] for k in experts],
        "expert_layers": list(model.get(experts[0]).layers),
        "expert_parameter_count": model.get(experts[0]).parameter_count,
        "parameter_count": model.info.parameter_count,
        "ensemble_bytes": [e.model.memory_report().backbone_bytes for e in ensemble],
        "peft_base_bytes": _unique_bytes([(n, p) for n, p in named if "lora_" not in n]),
        "adapter_bytes": adapter_bytes,
        "hf_bytes": _unique_bytes(list(hf.named_parameters())),
        "engine_config": ccoe.config.model_dump(),
        "ensemble_engine_config": ensemble[0].config.model_dump(),
    }
    return Systems(ccoe, experts, ensemble, peft, hf, facts)


def head_on_rows(model: Any) -> None:
    """Give a transformers model's LM head its input as 2-D rows, so the baselines do not pay
    for a slow torch path that the engines never take.

    At prefill, transformers slices the last position out of [B, T, D] as a strided [B, 1, D]
    view. torch 2.13's CPU matmul takes such a view down a batched path that copies the head's
    weight. Measured on 2 cores, bf16, with a 32,000 x 768 head: 110 ms at B=1 and 4.9 s at B=64,
    against 2-4 ms as rows. Applied, `peft_lora` in workload A went from 17.6-18.0 to 19.0-19.4
    tokens/s. The logits are the same; only the layout of the product changes.
    """
    import torch.nn.functional as F

    head = model.get_output_embeddings()

    def forward(x: Any) -> Any:
        return F.linear(x.reshape(-1, x.shape[-1]), head.weight, head.bias).view(*x.shape[:-1], -1)

    head.forward = forward


# ---- running requests -----------------------------------------------------------------------


def _engine_batch(engine: Any, prompts: Sequence[list[int]], experts: Sequence[Any], new_tokens: int) -> int:
    """Submit every request at once, wait for all; returns generated tokens."""
    from ccoe_common.engine.errors import EngineError
    from ccoe_common.engine.params import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    events: queue.SimpleQueue = queue.SimpleQueue()
    for ids, expert in zip(prompts, experts, strict=True):
        engine.submit(GenerationRequest(prompt_ids=ids, expert=None if expert is None else str(expert),
                                        sampling=sampling), events.put)
    tokens = finished = 0
    while finished < len(prompts):
        event = events.get()
        if isinstance(event, EngineError):
            raise event
        tokens += len(event.token_ids)
        finished += event.finish_reason is not None
    return tokens


def _hf_generate(model: Any, prompts: Sequence[list[int]], new_tokens: int,
                 adapter_names: list[str] | None = None) -> int:
    import torch

    ids = torch.tensor(list(prompts), device=model.device)  # equal-length prompts: no padding needed
    kwargs: dict[str, Any] = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    # The engines step on their own threads: this (main) thread's OpenMP workers would
    # slow them down while they run (engine/openmp.py), so it lets go of them, as an engine
    # does when it goes idle. Every system thus runs with the only worker pool in the process.
    release_openmp_workers()
    generated = out.shape[1] - ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"transformers generated {generated} tokens per row, expected {new_tokens}")
    return generated * ids.shape[0]


def seq_runner(s: Systems, system: str) -> Callable[[int, list[int], int], int]:
    """(domain, prompt, new_tokens) -> generated tokens, one request, for workload A."""
    if system == "ccoe":
        return lambda d, p, n: _engine_batch(s.ccoe, [p], [s.experts[d]], n)
    if system == "backbone":
        return lambda d, p, n: _engine_batch(s.ccoe, [p], [None], n)
    if system == "ensemble":
        return lambda d, p, n: _engine_batch(s.ensemble[d], [p], [None], n)
    if system == "peft_lora":
        def run(d: int, p: list[int], n: int) -> int:
            s.peft.set_adapter(f"d{d}")
            return _hf_generate(s.peft, [p], n)
        return run
    raise ValueError(f"unknown sequential system {system!r}")


def batch_runner(s: Systems, system: str) -> Callable[[list[int], list[list[int]], int], int]:
    """(domain per request, prompts, new_tokens) -> generated tokens, for workload B."""
    if system == "ccoe_mixed":
        return lambda ds, ps, n: _engine_batch(s.ccoe, ps, [s.experts[d] for d in ds], n)
    if system == "backbone":
        return lambda ds, ps, n: _engine_batch(s.ccoe, ps, [None] * len(ps), n)
    if system == "hf_sequential":
        return lambda ds, ps, n: sum(_hf_generate(s.hf, [p], n) for p in ps)
    if system == "ensemble":
        def run(ds: list[int], ps: list[list[int]], n: int) -> int:
            tokens = 0
            for d in range(NUM_DOMAINS):  # one model after another, each with one batch
                mine = [p for p, dd in zip(ps, ds, strict=True) if dd == d]
                if mine:
                    tokens += _engine_batch(s.ensemble[d], mine, [None] * len(mine), n)
            return tokens
        return run
    if system == "peft_lora":
        return lambda ds, ps, n: _hf_generate(s.peft, ps, n, [f"d{d}" for d in ds])
    raise ValueError(f"unknown batched system {system!r}")


def _timed(fn: Callable[..., int], *args: Any) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def _prompts(rng: Any, count: int, length: int, vocab: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(3, vocab, size=length)] for _ in range(count)]


# ---- the two workloads ----------------------------------------------------------------------


def run_sequential(s: Systems, wl: Workload, vocab: int, progress: Progress) -> dict[str, dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(1)
    runners = {name: seq_runner(s, name) for name in SEQ_SYSTEMS}
    warm = _prompts(rng, NUM_DOMAINS, wl.seq_prompt, vocab)
    for run in runners.values():  # every model/adapter once, so nothing is cold
        for d in range(NUM_DOMAINS):
            run(d, warm[d], 2)
    progress.step("workload A: warmed up every system on every domain")
    tokens = {n: [0] * wl.seq_rounds for n in SEQ_SYSTEMS}
    seconds = {n: [0.0] * wl.seq_rounds for n in SEQ_SYSTEMS}
    for r in range(wl.seq_rounds):
        prompts = _prompts(rng, NUM_DOMAINS, wl.seq_prompt, vocab)
        for d in range(NUM_DOMAINS):
            k = (r * NUM_DOMAINS + d) % len(SEQ_SYSTEMS)
            for name in SEQ_SYSTEMS[k:] + SEQ_SYSTEMS[:k]:  # rotate who goes first
                got, took = _timed(runners[name], d, prompts[d], wl.seq_new)
                if got != wl.seq_new:
                    raise RuntimeError(f"{name} generated {got} tokens, expected {wl.seq_new}")
                tokens[name][r] += got
                seconds[name][r] += took
        rates = {n: tokens[n][r] / seconds[n][r] for n in SEQ_SYSTEMS}
        progress.step(f"workload A round {r + 1}/{wl.seq_rounds}: "
                      + ", ".join(f"{n} {v:.1f}" for n, v in rates.items()) + " tokens/s")
    return _summarise(tokens, seconds)


def run_batched(s: Systems, wl: Workload, vocab: int, progress: Progress) -> dict[str, dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(2)
    runners = {name: batch_runner(s, name) for name in BATCH_SYSTEMS}
    domains = [i % NUM_DOMAINS for i in range(wl.batch_requests)]
    warm = _prompts(rng, NUM_DOMAINS, wl.batch_prompt, vocab)
    for run in runners.values():
        run(list(range(NUM_DOMAINS)), warm, 2)
    progress.step("workload B: warmed up every system")
    tokens = {n: [0] * wl.batch_rounds for n in BATCH_SYSTEMS}
    seconds = {n: [0.0] * wl.batch_rounds for n in BATCH_SYSTEMS}
    for r in range(wl.batch_rounds):
        prompts = _prompts(rng, wl.batch_requests, wl.batch_prompt, vocab)
        k = r % len(BATCH_SYSTEMS)
        for name in BATCH_SYSTEMS[k:] + BATCH_SYSTEMS[:k]:
            if name == "hf_sequential":  # a different subset every round
                pick = [(r * wl.hf_requests + j) % wl.batch_requests for j in range(wl.hf_requests)]
                args = ([domains[i] for i in pick], [prompts[i] for i in pick])
            else:
                args = (domains, prompts)
            got, took = _timed(runners[name], *args, wl.batch_new)
            expected = len(args[1]) * wl.batch_new
            if got != expected:
                raise RuntimeError(f"{name} generated {got} tokens, expected {expected}")
            tokens[name][r], seconds[name][r] = got, took
            progress.step(f"workload B round {r + 1}/{wl.batch_rounds}: {name} {got / took:.1f} tokens/s "
                          f"({took:.1f}s)")
    return _summarise(tokens, seconds)


def _summarise(tokens: dict[str, list[int]], seconds: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in tokens:
        rates = [t / s for t, s in zip(tokens[name], seconds[name], strict=True)]
        out[name] = {
            "tokens_per_s": statistics.median(rates),
            "round_tokens_per_s": [round(x, 3) for x in rates],
            "tokens": sum(tokens[name]),
            "seconds": round(sum(seconds[name]), 3),
        }
    return out


# ---- report ---------------------------------------------------------------------------------


def weight_bytes(facts: dict[str, Any], active: Sequence[int]) -> dict[str, dict[str, int]]:
    """Weight bytes one decode step reads, per system, given the domains active in it."""
    bb = facts["backbone_bytes"]
    distinct = sorted(set(active))
    many = {
        "ccoe_mixed": bb + sum(facts["expert_bytes"][d] for d in distinct),
        "backbone": bb,
        "hf_sequential": facts["hf_bytes"],
        "ensemble": sum(facts["ensemble_bytes"][d] for d in distinct),
        "peft_lora": facts["peft_base_bytes"] + sum(facts["adapter_bytes"][d] for d in distinct),
    }
    # One request: an expert replaces modules of the same shapes, so it reads what the backbone reads.
    one = {
        "ccoe": bb,
        "backbone": bb,
        "ensemble": facts["ensemble_bytes"][0],
        "peft_lora": facts["peft_base_bytes"] + facts["adapter_bytes"][0],
    }
    return {"sequential": one, "batched": many}


def ratios(seq: dict[str, float], bat: dict[str, float], bytes_b: dict[str, int]) -> list[dict[str, Any]]:
    mixing = (bat["ccoe_mixed"] / bat["backbone"]) * (bytes_b["ccoe_mixed"] / bytes_b["backbone"])
    rows = [
        ("A: ccoe / backbone", seq["ccoe"] / seq["backbone"], 0.95),
        ("A: ccoe / peft_lora", seq["ccoe"] / seq["peft_lora"], 2.0),
        ("A: ccoe / ensemble", seq["ccoe"] / seq["ensemble"], None),
        ("B: mixing efficiency", mixing, 0.90),
        ("B: ccoe_mixed / backbone", bat["ccoe_mixed"] / bat["backbone"], None),
        ("B: ccoe_mixed / ensemble", bat["ccoe_mixed"] / bat["ensemble"], 2.0),
        ("B: ccoe_mixed / hf_sequential", bat["ccoe_mixed"] / bat["hf_sequential"], 3.0),
        ("B: ccoe_mixed / peft_lora", bat["ccoe_mixed"] / bat["peft_lora"], None),
    ]
    return [{"name": n, "value": round(v, 4), "target": t, "passed": None if t is None else bool(v >= t)}
            for n, v, t in rows]


def copy_bandwidth(device: str, nbytes: int = 1 << 31) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read plus bytes written
    (the ceiling a decode step that streams its weights can reach): median of 10 copies."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()  # never zeros (METHOD.md)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:  # three warm-ups
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def roofline(s: Systems, wl: Workload, vocab: int, device: str, progress: Progress) -> dict[str, Any]:
    """Batch-1 decode of the bare backbone on the ccoe engine against the memory-bandwidth
    roofline: weight bytes a step reads / step time / measured copy bandwidth."""
    import numpy as np

    new = max(4 * wl.seq_new, 64)
    prompt = _prompts(np.random.default_rng(3), 1, 1, vocab)[0]  # one prompt token: the time is decode
    _engine_batch(s.ccoe, [prompt], [None], 8)
    rates = []
    for _ in range(3):
        got, took = _timed(_engine_batch, s.ccoe, [prompt], [None], new)
        rates.append(got / took)
    bandwidth = copy_bandwidth(device)
    rate = statistics.median(rates)
    # A step reads every weight once except the embedding table (one row), unless it is tied
    # to the LM head, which reads it whole.
    bb = s.ccoe.model.backbone
    emb = bb.embed_tokens.weight
    step_bytes = s.facts["backbone_bytes"] - (0 if bb.lm_head.weight is emb else emb.numel() * emb.element_size())
    progress.step(f"roofline: batch-1 decode {rate:.1f} tokens/s, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    return {
        "decode_tokens_per_s": round(rate, 2), "round_tokens_per_s": [round(r, 2) for r in rates],
        "new_tokens": new, "weight_bytes_per_step": step_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": round(bandwidth / step_bytes, 2),
        "fraction_of_roofline": round(rate * step_bytes / bandwidth, 4), "target": 0.6,
        "method": "one request, 1 prompt token, greedy; tokens/s over the whole request (3 runs, median); "
                  "bandwidth = 2 x bytes / time of a 2 GiB device-to-device copy (median of 10)",
    }


def collect(shape_name: str, dtype_name: str, threads: int, wl: Workload, progress: Progress,
            device: str = "cpu", decode_path: str = "auto", checkpoint_dir: Path | None = None) -> dict[str, Any]:
    import torch

    started = time.monotonic()
    torch.set_num_threads(threads)
    shape = SHAPES[shape_name]
    static = decode_path == "static" or (decode_path == "auto" and device == "cuda")
    with tempfile.TemporaryDirectory(prefix="ccoe-bench-throughput-") as tmp:
        checkpoint = synthetic_checkpoint(checkpoint_dir or Path(tmp) / "backbone", shape,
                                          SHAPE_ARCH.get(shape_name, "qwen2"), dtype_name, device)
        progress.step(f"wrote the {shape_name} checkpoint")
        systems = build_systems(checkpoint, dtype_name, wl, progress, device=device, static_decode=static)
    release_openmp_workers()  # the loads ran on this thread; see _hf_generate
    try:
        seq = run_sequential(systems, wl, shape["vocab_size"], progress)
        bat = run_batched(systems, wl, shape["vocab_size"], progress)
        roof = roofline(systems, wl, shape["vocab_size"], device, progress) if device == "cuda" else None
    finally:
        systems.stop()
    facts = systems.facts
    active = sorted({i % NUM_DOMAINS for i in range(wl.batch_requests)})
    wbytes = weight_bytes(facts, active)
    seq_rates = {n: v["tokens_per_s"] for n, v in seq.items()}
    bat_rates = {n: v["tokens_per_s"] for n, v in bat.items()}
    return {
        "shape": shape_name,
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(0)})",
        "decode_path": "static" if static else "eager",
        "model": {
            "model_type": SHAPE_ARCH.get(shape_name, "qwen2"), **shape, "dtype": dtype_name, "threads": threads,
            "parameter_count": facts["parameter_count"], "expert_kind": "ffn",
            "expert_layers": facts["expert_layers"], "expert_parameter_count": facts["expert_parameter_count"],
            "expert_fraction": facts["expert_parameter_count"] / facts["parameter_count"],
            "lora_rank": LORA_RANK, "lora_targets": list(LORA_TARGETS),
            "engine_config": facts["engine_config"], "ensemble_engine_config": facts["ensemble_engine_config"],
        },
        "workload": dataclasses.asdict(wl),
        "sequential": [{"system": n, **seq[n], "weight_bytes_per_step": wbytes["sequential"][n]} for n in SEQ_SYSTEMS],
        "batched": [{"system": n, **bat[n], "weight_bytes_per_step": wbytes["batched"][n]} for n in BATCH_SYSTEMS],
        "ratios": ratios(seq_rates, bat_rates, wbytes["batched"]),
        "roofline": roof,
        "method": "rounds interleaved with a rotating system order after a warm-up of every system; "
                  "tokens_per_s = median over rounds of generated tokens / wall seconds",
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def render(report: dict[str, Any]) -> str:
    m, wl = report["model"], report["workload"]
    head = (f"{m['model_type']} '{report['shape']}' backbone, {m['parameter_count'] / 1e6:.1f}M parameters, "
            f"{m['dtype']}, on {report.get('device', 'cpu')}, {report.get('decode_path', 'eager')} decode path, "
            f"torch threads {m['threads']}; {NUM_DOMAINS} experts: ffn at layers {m['expert_layers']} "
            f"({m['expert_fraction']:.1%} of the backbone each); LoRA rank {m['lora_rank']} on all linear layers")
    seq = format_table(
        ["system", "tokens/s", "rounds (tokens/s)", "weights/step"],
        [[r["system"], f"{r['tokens_per_s']:.2f}", " ".join(f"{x:.1f}" for x in r["round_tokens_per_s"]),
          human_bytes(r["weight_bytes_per_step"])] for r in report["sequential"]],
    )
    bat = format_table(
        ["system", "tokens/s", "rounds (tokens/s)", "weights/step"],
        [[r["system"], f"{r['tokens_per_s']:.2f}", " ".join(f"{x:.1f}" for x in r["round_tokens_per_s"]),
          human_bytes(r["weight_bytes_per_step"])] for r in report["batched"]],
    )
    checks = format_table(
        ["ratio", "measured", "target", "result"],
        [[r["name"], f"{r['value']:.3f}", "" if r["target"] is None else f">= {r['target']}",
          "" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")] for r in report["ratios"]],
    )
    roof = report.get("roofline")
    roof_line = "" if not roof else (
        f"\n\nbatch-1 decode (backbone): {roof['decode_tokens_per_s']:.1f} tokens/s x "
        f"{human_bytes(roof['weight_bytes_per_step'])} per step = {roof['fraction_of_roofline']:.1%} of the "
        f"copy bandwidth {roof['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (target >= 60%)")
    return (
        f"{head}\n\n"
        f"A. one request at a time, cycling {NUM_DOMAINS} domains: {wl['seq_rounds']} rounds x {NUM_DOMAINS} "
        f"requests x ({wl['seq_prompt']} prompt + {wl['seq_new']} new tokens) per system\n\n{seq}\n\n"
        f"B. {wl['batch_requests']} requests over {NUM_DOMAINS} domains, {wl['batch_prompt']} prompt + "
        f"{wl['batch_new']} new tokens, {wl['batch_rounds']} rounds; hf_sequential runs {wl['hf_requests']} of "
        f"the requests per round, one at a time; ensemble serves each domain's requests as one batch on its "
        f"own model, one model after another\n\n{bat}\n\n{checks}\n\n"
        f"{report['method']}; {report['elapsed_s']:.0f}s{roof_line}"
    )


def run(args: argparse.Namespace) -> int:
    """Handler of `ccoe bench throughput`."""
    wl = workload_from_args(args)
    shape = args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if wl.hf_requests > wl.batch_requests:
        raise UserError(f"--hf-requests {wl.hf_requests} exceeds --batch-requests {wl.batch_requests}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device")
    steps = 4 + 1 + wl.seq_rounds + 1 + wl.batch_rounds * len(BATCH_SYSTEMS) + (args.device == "cuda")
    progress = Progress(total=steps, quiet=args.quiet)
    report = collect(shape, args.dtype, threads, wl, progress, device=args.device, decode_path=args.decode_path,
                     checkpoint_dir=args.checkpoint)
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0
