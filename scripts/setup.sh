#!/usr/bin/env bash
# Creates .venv in the repo root with CCoE Serve installed editable.
# Usage: scripts/setup.sh [--dev]   (--dev adds test and benchmark dependencies)
# Safe to re-run: it does nothing when the installed set already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="bench"
if [[ "${1:-}" == "--dev" ]]; then extras="dev"; fi

PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"   # the CPU wheel; a looser pin pulls several GB of CUDA wheels

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=".venv/.ccoe-installed-${extras}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup: .venv is up to date ($extras)"
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_PIN (CPU build)"
    .venv/bin/pip install --quiet "$TORCH_PIN"
fi
echo "setup: installing ccoe-serve[$extras] (editable)"
.venv/bin/pip install --quiet -e ".[$extras]"
echo "setup: generating gRPC stubs from proto/"
.venv/bin/python -m ccoe_common.pb
echo "$want" > "$stamp"
echo "setup: done; the command is .venv/bin/ccoe"
