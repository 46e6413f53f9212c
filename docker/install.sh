#!/usr/bin/env bash
# Installs CCoE Serve from a source tree into one Python environment: the image builds run it
# (docker/Dockerfile.cpu, docker/Dockerfile.cuda), and so does the test that checks it in a clean
# virtualenv (tests/unit/docker/). Ray stays at the version the project pins (pyproject.toml),
# which must be the base image's own.
#
# Usage: docker/install.sh SRC_DIR
#   PYTHON           the interpreter to install into (default: python)
#   RAY_VERSION      required; the base image's Ray, e.g. 2.60.0
#   TORCH_VERSION    default 2.13.0
#   TORCH_INDEX_URL  where torch comes from, e.g. https://download.pytorch.org/whl/cpu (default: PyPI)
#   EXTRA_PACKAGES   more packages, e.g. "s3fs" for an s3:// artifact store
set -euo pipefail

src="$(cd "${1:?usage: docker/install.sh SRC_DIR}" && pwd)"
python="${PYTHON:-python}"
ray_version="${RAY_VERSION:?RAY_VERSION must be set to the Ray version of the base image}"
pip=("$python" -m pip install --no-cache-dir --disable-pip-version-check)

# torch first, from the index that matches the image (a looser pin would pull other builds).
torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
"${pip[@]}" "${torch_index[@]}" "torch==${TORCH_VERSION:-2.13.0}"

# The project and its dependencies, Ray held at the image's version.
# shellcheck disable=SC2086  # EXTRA_PACKAGES is a list of words
"${pip[@]}" "$src" "ray[serve]==${ray_version}" ${EXTRA_PACKAGES:-}

# The gRPC stubs, generated from proto/ by the grpcio-tools installed next to the protobuf
# runtime just installed, then installed with the package (no source tree at run time).
(cd "$src" && "$python" -m ccoe_common.pb)
"${pip[@]}" --no-deps --force-reinstall "$src"

# What KubeRay's serveConfigV2 names must import: the app builder and the gRPC servicers.
"$python" - <<'PY'
from ccoe_common.serving.grpc_servicers import GRPC_SERVICERS
from ccoe_common.serving.local_stack import APP_BUILDER, import_attr

import_attr(APP_BUILDER)
for path in GRPC_SERVICERS:
    module, _, attr = path.rpartition(".")
    import_attr(f"{module}:{attr}")
print(f"install: {APP_BUILDER} and {len(GRPC_SERVICERS)} gRPC servicers import")
PY
