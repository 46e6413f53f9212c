#!/usr/bin/env bash
# Sets up the dev environment, runs the linter and the type checker, then the whole test
# suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The type checker reads the generated gRPC stubs (.pyi); importing the package regenerates
# any that are missing or older than proto/.
.venv/bin/python -c "import ccoe_common.pb"
if ! .venv/bin/ruff check; then
    echo "test.sh: ruff check failed (see above; \`.venv/bin/ruff check --fix\` fixes the safe ones)" >&2
    exit 1
fi
if ! .venv/bin/mypy; then
    echo "test.sh: mypy failed (see above)" >&2
    exit 1
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit $rc
