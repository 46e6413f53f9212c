"""`ccoe bench memory`: resident memory of CCoE vs n separate models vs n LoRA adapters.

For each n, three systems that each serve n domains are built from one random-weight
Qwen2-shaped checkpoint (bf16):

- CCoE: one frozen backbone plus n experts, each at the full 15% parameter budget, pushed
  from expert artifacts on disk (the path a server takes);
- ensemble: n separate full models ("multi-domain model ensemble");
- LoRA: one transformers model with n peft LoRA adapters (rank 16 on q, k, v, o, gate, up,
  down), adapters in the model's dtype.

Bytes are measured, not computed: every (system, n) cell runs in a fresh Python process that
reads its own resident set size (VmRSS) before and after building the system, after a garbage
collection and a glibc `malloc_trim(0)` both times. The bare backbone is measured the same way.
Parameter bytes summed from the tensors are reported next to the measurement as a cross-check.

    ccoe bench memory                      # the ~159M-parameter shape, n = 1, 3, 5, 10
    ccoe bench memory --shape tiny --ns 1,2 --json
    ccoe bench memory --device cuda --shape 7b --ns 5 --computed-ns 10 --json

With `--device cuda` every system is built on the GPU and a cell's bytes are the growth of
`torch.cuda.memory_allocated()` instead of VmRSS. `--computed-ns` adds rows computed from the
measured parts of the largest measured n (backbone, per-expert, per-model and per-adapter
bytes), for n whose ensemble would not fit on the device; they are marked `"computed": true`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ccoe_common.model.synthetic import Arch

from ccoe_common.console import Progress, UserError, add_json_flag, format_table, human_bytes, positive_int, print_json

SYSTEMS = ("backbone", "ccoe", "ensemble", "lora")

# Transformers config overrides for `make_checkpoint`. "150m" has 22 layers rather than 24:
# 24 gives 171M parameters and only 5 MLP layers (13.8%) under the 15% budget, 22 gives 159M
# and the same 5 MLP layers at 14.9%, i.e. experts really at the full budget.
SHAPES: dict[str, dict[str, Any]] = {
    "150m": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 22,
             "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 2048},
    # A few layers, ~12 MB in bf16: big enough that RSS deltas are well above allocator noise
    # (a few hundred KiB), small enough that a run takes seconds. Six layers so that one MLP
    # fits the 15% budget next to the embedding.
    "tiny": {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 512},
    # Llama-2-7B's shape (6.74B parameters, 13.5 GB in bf16), the papers' 7B backbone; for a GPU:
    # experts at the 15% budget are 7 MLP layers (14.0%).
    "7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
           "max_position_embeddings": 4096},
}
# The architecture each shape is saved as (default qwen2).
SHAPE_ARCH: dict[str, Arch] = {"7b": "llama"}
DEVICES = ("cpu", "cuda")
# Built by every worker before its baseline so lazy imports and one-time initialisation of the
# code path under test land in the baseline, not in the measured delta.
WARMUP_SHAPE: dict[str, Any] = {"tie_word_embeddings": True}
WARMUP_N = 2  # two, so peft's add_adapter and a second CCoE push are exercised too

LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_NS = (1, 3, 5, 10)

_RESULT_MARK = "CCOE_MEMORY_RESULT "
_WORKER_TIMEOUT_S = 3600


# ---- CLI ------------------------------------------------------------------------------------


def parse_ns(text: str) -> tuple[int, ...]:
    """"1,3,5,10" -> (1, 3, 5, 10): sorted, deduplicated, each >= 1."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.add(positive_int(part))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"n in {text!r}: {e}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"no n values in {text!r}; give e.g. 1,3,5,10")
    return tuple(sorted(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ccoe bench memory`."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="150m",
                        help="backbone shape: 150m (~159M parameters, minutes) or tiny (a toy, seconds)")
    parser.add_argument("--ns", type=parse_ns, default=DEFAULT_NS, metavar="N,N,...",
                        help="numbers of domains to measure (default 1,3,5,10)")
    parser.add_argument("--computed-ns", type=parse_ns, default=(), metavar="N,N,...",
                        help="numbers of domains to compute from the measured parts instead (e.g. 10 at 7B, whose "
                             "ensemble does not fit one GPU)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the systems are built; cuda measures torch.cuda.memory_allocated()")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                        help="keep the random-weight checkpoint in DIR and reuse it when DIR already holds one "
                             "(default: a temporary directory); `ccoe bench throughput --checkpoint` takes the same")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json_flag(parser)


# ---- measuring (runs inside the worker process) --------------------------------------------


def _libc_malloc_trim() -> Callable[[], None]:
    # glibc keeps freed heap pages; without a trim, memory freed while loading (temporary
    # copies, file buffers) would still count as resident. Other libcs: nothing to trim.
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return lambda: None

    def malloc_trim() -> None:
        trim(0)

    return malloc_trim


_malloc_trim = _libc_malloc_trim()


@dataclass(frozen=True)
class Resident:
    """Resident memory of this process, e.g. rss=1_234_567_168 (= anon + file + shmem)."""

    rss: int
    anon: int
    file: int


def read_resident(device: str = "cpu") -> Resident:
    """Collect garbage, return freed heap to the OS, then read VmRSS/RssAnon/RssFile; on
    cuda, the bytes torch has allocated on the device (rss; anon and file are 0)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return Resident(torch.cuda.memory_allocated(), 0, 0)
    _malloc_trim()
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024  # reported in kB
    except FileNotFoundError:
        raise UserError("ccoe bench memory reads /proc/self/status and needs Linux") from None
    return Resident(fields["VmRSS"], fields.get("RssAnon", 0), fields.get("RssFile", 0))


def _unique_param_bytes(modules: Sequence[Any]) -> int:
    # Tied weights (embedding = LM head) are one tensor; count each storage once.
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def _materialize(model: Any) -> None:
    """Give every parameter memory of its own, as our loader does.

    transformers memory-maps safetensors and, when no dtype conversion is needed, leaves the
    weights as views of the file mapping: pages then become resident only when read, and
    count as reclaimable page cache. Copying them makes the LoRA backbone cost what the
    CCoE and ensemble backbones cost (private, always resident), so the comparison is like
    for like. named_parameters() yields a tied weight once, so ties survive.
    """
    import torch

    with torch.no_grad():
        for _, p in model.named_parameters():
            p.data = p.data.clone()


def lora_model(checkpoint: Path, dtype: Any, adapter_names: Sequence[str], device: str = "cpu") -> Any:
    """The multi-LoRA baseline: a transformers model (weights materialised) with one peft
    adapter per name, rank LORA_RANK on LORA_TARGETS, adapters kept in the model's dtype."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # device_map only off the CPU: the CPU figures keep transformers' plain loading path.
    placement = {} if device == "cpu" else {"device_map": device}
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, **placement)
    _materialize(base)
    config = LoraConfig(r=LORA_RANK, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    # autocast_adapter_dtype=False keeps adapters in bf16 like the backbone and the CCoE
    # experts; peft's default upcasts them to fp32 for training, which a server would not.
    model = get_peft_model(base, config, adapter_name=adapter_names[0], autocast_adapter_dtype=False)
    for name in adapter_names[1:]:
        model.add_adapter(name, config, autocast_adapter_dtype=False)
    return model.eval()


def clone_backbone(model: Any) -> Any:
    """A CCoEModel with its own deep copy of `model`'s backbone (no experts): what loading the
    checkpoint again gives, without reading and hashing it again."""
    import copy

    from ccoe_common.model import CCoEModel
    from ccoe_common.model.backbone import Backbone
    from ccoe_common.model.layers import stack_projections

    backbone = cast("Backbone", stack_projections(copy.deepcopy(model.backbone)))  # a deep copy unstacks q/k/v
    return CCoEModel(backbone, model.info, model.tokenizer, model.budget_fraction)


def _load(checkpoint: Path, device: str) -> Any:
    """The CCoEModel of `checkpoint` in bf16, without its tokenizer: a cell measures weights."""
    import torch

    from ccoe_common.model import CCoEModel
    from ccoe_common.model.checkpoint import load_backbone

    backbone, info = load_backbone(checkpoint, dtype=torch.bfloat16, device=device)
    return CCoEModel(backbone, info)


def build_system(system: str, n: int, checkpoint: Path, expert_uris: Sequence[str],
                 device: str = "cpu") -> tuple[Any, int]:
    """Build `system` serving n domains; returns the object to keep alive and its tensor bytes."""
    import torch

    dtype = torch.bfloat16
    if system == "backbone":
        model = _load(checkpoint, device)
        return model, model.memory_report().total_bytes
    if system == "ccoe":
        if len(expert_uris) < n:
            raise ValueError(f"ccoe n={n} needs {n} expert artifacts, got {len(expert_uris)}")
        model = _load(checkpoint, device)
        for uri in expert_uris[:n]:
            model.push(uri)
        return model, model.memory_report().total_bytes
    if system == "ensemble":
        first = _load(checkpoint, device)
        models = [first, *(clone_backbone(first) for _ in range(n - 1))]
        return models, sum(m.memory_report().total_bytes for m in models)
    if system == "lora":
        model = lora_model(checkpoint, dtype, [f"a{i}" for i in range(n)], device=device)
        return model, _unique_param_bytes([model])
    raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")


def measure(system: str, n: int, checkpoint: Path, expert_uris: Sequence[str],
            warmup_checkpoint: Path, warmup_uris: Sequence[str], device: str = "cpu") -> dict[str, Any]:
    """The worker's job: warm up, baseline, build, measure; identical for every system."""
    import peft  # noqa: F401  every worker imports the same modules before its baseline
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import ccoe_common.model  # noqa: F401

    warm, _ = build_system(system, min(n, WARMUP_N), warmup_checkpoint, warmup_uris, device)
    del warm
    before = read_resident(device)
    held, tensor_bytes = build_system(system, n, checkpoint, expert_uris, device)
    after = read_resident(device)
    del held
    return {
        "system": system,
        "n": n,
        "bytes": after.rss - before.rss,
        "anon_bytes": after.anon - before.anon,
        "file_bytes": after.file - before.file,
        "tensor_bytes": tensor_bytes,
        "baseline_rss": before.rss,
    }


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ccoe_common.bench.memory",
                                description="one measurement cell of `ccoe bench memory` (internal)")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--warmup-checkpoint", type=Path, required=True)
    p.add_argument("--experts", default="", help="comma-separated expert artifact URIs")
    p.add_argument("--warmup-experts", default="")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    a = p.parse_args(argv)
    result = measure(a.system, a.n, a.checkpoint, [u for u in a.experts.split(",") if u],
                     a.warmup_checkpoint, [u for u in a.warmup_experts.split(",") if u], a.device)
    # Marked, so a library printing to stdout cannot be mistaken for the result.
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---- orchestration (runs in the `ccoe` process) --------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Files every worker reads, and facts about the shape measured in the parent."""

    checkpoint: Path
    expert_uris: list[str]
    warmup_checkpoint: Path
    warmup_uris: list[str]
    parameter_count: int
    expert_parameter_count: int
    expert_layers: list[int]
    budget_params: int


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # make_checkpoint's "Writing model shards" bar would interleave with our progress lines.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_experts(checkpoint: Path, out: Path, count: int, device: str = "cpu") -> tuple[list[str], Any, Any]:
    """Carve `count` experts (default placement: as many GL-spread MLP layers as the budget
    allows) and write them as artifacts; returns their URIs, the last expert and the model."""
    import torch

    from ccoe_common.model import CCoEModel

    model = CCoEModel.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device)
    uris: list[str] = []
    expert = None
    for i in range(count):
        expert = model.carve(f"expert{i}")
        uri = (out / f"expert{i}").as_uri()
        expert.to_artifact(uri, model.info)
        uris.append(uri)
    return uris, expert, model


_CHECKPOINT_MARK = "ccoe-bench-checkpoint.json"


def synthetic_checkpoint(path: Path, shape: dict[str, Any], arch: Arch, dtype_name: str, device: str = "cpu") -> Path:
    """The benchmarks' random-weight checkpoint (seed 0, with a tokenizer) at `path`: written
    there, or reused when `path` holds one that either benchmark wrote for the same shape,
    architecture, dtype and device (which decide its weights)."""
    import torch

    from ccoe_common.model.synthetic import make_checkpoint

    mark = {"shape": shape, "arch": arch, "dtype": dtype_name, "device": device}
    marker = path / _CHECKPOINT_MARK
    if marker.exists():
        if json.loads(marker.read_text()) == json.loads(json.dumps(mark)):
            return path
        raise UserError(f"checkpoint directory {path} holds a benchmark checkpoint of another shape, dtype or "
                        "device; give an empty or new directory")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"checkpoint directory {path} is not empty and holds no benchmark checkpoint")
    with _quiet_transformers():
        make_checkpoint(path, arch, dtype=getattr(torch, dtype_name), device=device, **shape)
    marker.write_text(json.dumps(mark))  # last: a run cut short leaves no marker, and is not reused
    return path


def prepare(root: Path, shape: dict[str, Any], n_max: int, arch: Arch = "qwen2", device: str = "cpu",
            checkpoint_dir: Path | None = None) -> Prepared:
    """Write the benchmark checkpoint (or reuse checkpoint_dir's), n_max expert artifacts and
    the warm-up files under root."""
    import torch

    from ccoe_common.model.synthetic import make_checkpoint

    checkpoint = synthetic_checkpoint(checkpoint_dir or root / "backbone", shape, arch, "bfloat16", device)
    with _quiet_transformers():
        warmup = make_checkpoint(root / "warmup", "qwen2", seed=1, dtype=torch.bfloat16, with_tokenizer=False,
                                 **WARMUP_SHAPE)
    uris, expert, model = _write_experts(checkpoint, root / "experts", n_max, device)
    warmup_uris, _, _ = _write_experts(warmup, root / "warmup-experts", WARMUP_N)
    return Prepared(
        checkpoint=checkpoint, expert_uris=uris, warmup_checkpoint=warmup, warmup_uris=warmup_uris,
        parameter_count=model.info.parameter_count, expert_parameter_count=expert.parameter_count,
        expert_layers=list(expert.layers), budget_params=model.budget_params,
    )


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    # The worker must import this very copy of the package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_worker(system: str, n: int, prep: Prepared, device: str = "cpu") -> dict[str, Any]:
    """Measure one (system, n) cell in a fresh interpreter, so nothing leaks between cells."""
    cmd = [
        sys.executable, "-m", "ccoe_common.bench.memory",
        "--system", system, "--n", str(n), "--device", device,
        "--checkpoint", str(prep.checkpoint), "--warmup-checkpoint", str(prep.warmup_checkpoint),
        "--experts", ",".join(prep.expert_uris), "--warmup-experts", ",".join(prep.warmup_uris),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), timeout=_WORKER_TIMEOUT_S)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"memory worker for {system} n={n} failed ({why}):\n{tail}")
    return json.loads(lines[-1][len(_RESULT_MARK):])


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return None


def _check_fits(prep: Prepared, n_max: int, device: str = "cpu") -> None:
    # The largest cell is the n_max ensemble; fail with numbers rather than an OOM kill.
    need = int(n_max * prep.parameter_count * 2 * 1.05 if device == "cuda" else
               n_max * prep.parameter_count * 2 * 1.25)  # bf16, plus load-time slack
    if device == "cuda":
        import torch

        available: int | None = torch.cuda.mem_get_info()[0]
    else:
        available = _mem_available()
    if available is not None and need > available:
        raise UserError(f"--ns up to {n_max} needs about {human_bytes(need)} for the ensemble, "
                        f"only {human_bytes(available)} is available on {device}; use smaller --ns (and "
                        "--computed-ns for the rest) or --shape tiny")


def collect(shape_name: str, ns: Sequence[int], progress: Progress, device: str = "cpu",
            computed_ns: Sequence[int] = (), checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Run every cell and assemble the report (the object `--json` prints)."""
    started = time.monotonic()
    shape = SHAPES[shape_name]
    arch = SHAPE_ARCH.get(shape_name, "qwen2")
    with tempfile.TemporaryDirectory(prefix="ccoe-bench-memory-") as tmp:
        prep = prepare(Path(tmp), shape, max(ns), arch, device, checkpoint_dir)
        progress.step(f"wrote {shape_name} checkpoint ({prep.parameter_count:,} parameters) "
                      f"and {max(ns)} expert artifacts")
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()  # the parent's loads: hand the memory back before the workers run
        _check_fits(prep, max(ns), device)
        backbone = run_worker("backbone", 1, prep, device)
        progress.step(f"backbone: {human_bytes(backbone['bytes'])}")
        fraction = prep.expert_parameter_count / prep.parameter_count
        rows: list[dict[str, Any]] = []
        for n in ns:
            cells: dict[str, dict[str, Any]] = {}
            for system in ("ccoe", "ensemble", "lora"):
                cells[system] = run_worker(system, n, prep, device)
                progress.step(f"{system} n={n}: {human_bytes(cells[system]['bytes'])}")
            ens = cells["ensemble"]["bytes"]
            rows.append({
                "n": n,
                "ccoe_bytes": cells["ccoe"]["bytes"],
                "ensemble_bytes": ens,
                "lora_bytes": cells["lora"]["bytes"],
                "backbone_bytes": backbone["bytes"],
                "expert_fraction": fraction,
                "ccoe_over_ensemble": cells["ccoe"]["bytes"] / ens,
                "lora_over_ensemble": cells["lora"]["bytes"] / ens,
                "limit": (1 + fraction * n) / n,
                "ensemble_over_n_backbones": ens / (n * backbone["bytes"]),
                # Cross-checks: parameter bytes summed from the tensors, and the part of each
                # delta that is file-backed (should be ~0: all weights are private copies).
                "tensor_bytes": {s: c["tensor_bytes"] for s, c in [("backbone", backbone), *cells.items()]},
                "file_backed_bytes": {s: c["file_bytes"] for s, c in [("backbone", backbone), *cells.items()]},
            })
    rows += [computed_row(n, rows[-1]) for n in computed_ns if n not in ns]
    if device == "cuda":
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "device": device,
        "shape": {
            "name": shape_name, "model_type": arch, "dtype": "bfloat16", **shape,
            "parameter_count": prep.parameter_count,
            "expert_kind": "ffn", "expert_layers": prep.expert_layers,
            "expert_parameter_count": prep.expert_parameter_count, "budget_params": prep.budget_params,
            "lora_rank": LORA_RANK, "lora_targets": list(LORA_TARGETS),
        },
        "method": ("torch.cuda.memory_allocated() delta" if device != "cpu" else
                   "VmRSS delta, after gc.collect() + malloc_trim(0),")
                  + " in a fresh process per cell, baseline taken after imports and a warm-up build on a toy "
                    "checkpoint",
        "rows": rows,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def computed_row(n: int, measured: dict[str, Any]) -> dict[str, Any]:
    """A row for n domains computed from a measured row's parts: the backbone, one expert
    ((ccoe - backbone) / n), one full model (ensemble / n) and one adapter ((lora's tensor
    bytes - the backbone's) / n, added to the measured lora bytes)."""
    m = measured["n"]
    bb = measured["backbone_bytes"]
    expert = (measured["ccoe_bytes"] - bb) / m
    model = measured["ensemble_bytes"] / m
    tensors = measured["tensor_bytes"]
    adapter = (tensors["lora"] - tensors["backbone"]) / m
    ccoe, ens = int(bb + n * expert), int(n * model)
    lora = int(measured["lora_bytes"] + (n - m) * adapter)
    return {
        "n": n, "computed": True, "computed_from_n": m,
        "ccoe_bytes": ccoe, "ensemble_bytes": ens, "lora_bytes": lora, "backbone_bytes": bb,
        "expert_fraction": measured["expert_fraction"],
        "ccoe_over_ensemble": ccoe / ens, "lora_over_ensemble": lora / ens,
        "limit": (1 + measured["expert_fraction"] * n) / n,
        "ensemble_over_n_backbones": ens / (n * bb),
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable table."""
    s = report["shape"]
    f = report["rows"][0]["expert_fraction"] if report["rows"] else 0.0
    head = (f"{s['model_type']} '{s['name']}' backbone, {s['parameter_count'] / 1e6:.1f}M parameters, bf16, "
            f"on {report.get('device', 'cpu')}; "
            f"experts: ffn at layers {s['expert_layers']} = {s['expert_parameter_count'] / 1e6:.2f}M "
            f"parameters each (f = {f:.1%} of the backbone, budget 15%); "
            f"LoRA: rank {s['lora_rank']} on {','.join(t.removesuffix('_proj') for t in s['lora_targets'])}")
    table = format_table(
        ["n", "backbone", "CCoE", "ensemble", "LoRA", "CCoE/ens", "LoRA/ens", "(1+f*n)/n", "ens/(n*bb)"],
        [[f"{r['n']}{' (computed)' if r.get('computed') else ''}",
          human_bytes(r["backbone_bytes"]), human_bytes(r["ccoe_bytes"]), human_bytes(r["ensemble_bytes"]),
          human_bytes(r["lora_bytes"]), f"{r['ccoe_over_ensemble']:.1%}", f"{r['lora_over_ensemble']:.1%}",
          f"{r['limit']:.1%}", f"{r['ensemble_over_n_backbones']:.3f}"] for r in report["rows"]],
    )
    foot = f"resident memory measured as {report['method']}; {report['elapsed_s']:.0f}s"
    return f"{head}\n\n{table}\n\n{foot}"


def run(args: argparse.Namespace) -> int:
    """Handler of `ccoe bench memory`."""
    ns: tuple[int, ...] = args.ns
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device")
    progress = Progress(total=2 + 3 * len(ns), quiet=args.quiet)
    report = collect(args.shape, ns, progress, args.device, args.computed_ns, args.checkpoint)
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
