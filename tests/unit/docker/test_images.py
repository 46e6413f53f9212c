"""What can be checked of the container images without a Docker engine: the base image is the
official Ray image of the pinned Ray, every path a Dockerfile copies exists and survives
.dockerignore, the image runs as non-root with a health check, the health check works, and
the install the image runs works in a clean virtualenv (slow: a full install)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from concurrent import futures
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for line in text.splitlines() if (m := re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)) and
            not line.lstrip().startswith("#")]


def _args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", path.read_text(), re.M))


def _copies(path: Path) -> list[tuple[list[str], str]]:
    out = []
    for name, rest in _instructions(path):
        if name == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


# ---- .dockerignore, as Docker reads it (last matching line wins; "!" takes back in) ----------------

def _pattern(p: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def _rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    return rules


def ignored(rel: str) -> bool:
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, pattern in _rules():
        if any(pattern.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_the_ignore_reader_follows_dockers_rules():
    assert ignored(".venv/bin/python") and ignored("tests/unit/x.py") and ignored("charts/ccoe/values.yaml")
    assert not ignored("ccoe_common/serving/config.py") and not ignored("proto/ccoe/v1/registry.proto")
    assert ignored("ccoe_common/pb/registry_pb2.py") and ignored("ccoe_common/__pycache__/x.cpython-311.pyc")
    assert not ignored("ccoe_common/pb/build.py")


# ---- the Dockerfiles --------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_is_the_official_ray_image_of_the_pinned_ray(flavour):
    path = DOCKERFILES[flavour]
    args = _args(path)
    (base,) = [rest for name, rest in _instructions(path) if name == "FROM"]
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    platform = "cpu" if flavour == "cpu" else args["CUDA_TAG"]
    assert resolved == f"rayproject/ray:{args['RAY_VERSION']}-py311-{platform}"
    pinned = re.findall(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "ccoe" / "values.yaml").read_text())["ray"]["version"]
    assert pinned == [args["RAY_VERSION"]] and chart == args["RAY_VERSION"]
    assert version("ray") == args["RAY_VERSION"]  # what scripts/setup.sh installed here
    assert re.fullmatch(r"py3\d+", args["PYTHON_TAG"])


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(flavour):
    for sources, _ in _copies(DOCKERFILES[flavour]):
        for src in sources:
            path = ROOT / src
            assert path.exists(), src
            assert not ignored(src), f"{src} is excluded by .dockerignore"
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            kept = [p for p in files if not ignored(str(p.relative_to(ROOT)))]
            assert kept, src
    copied = {s for sources, _ in _copies(DOCKERFILES[flavour]) for s in sources}
    assert {"pyproject.toml", "proto", "ccoe_common", "services", "docker/install.sh"} <= copied


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_runs_as_non_root_with_a_health_check(flavour):
    steps = _instructions(DOCKERFILES[flavour])
    users = [rest for name, rest in steps if name == "USER"]
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    health_check = [rest for name, rest in steps if name == "HEALTHCHECK"]
    assert len(health_check) == 1 and '"ccoe-healthcheck"' in health_check[0]
    assert ("COPY", "--chmod=0755 docker/healthcheck.py /usr/local/bin/ccoe-healthcheck") in steps
    cmd = [rest for name, rest in steps if name == "CMD"]
    assert cmd == ['["ccoe", "serve", "--config", "/etc/ccoe/app.yaml"]']


def test_the_install_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "docker" / "install.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_cpu_image_takes_cpu_torch():
    assert _args(DOCKERFILES["cpu"])["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


# ---- the health check ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("ccoe.v1.Inference", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def _health(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *argv], capture_output=True, text=True, timeout=60)


def test_health_check_passes_on_serving(health_server):
    assert _health("--port", str(health_server)).returncode == 0


def test_health_check_fails_on_not_serving_and_on_nothing_listening(health_server):
    done = _health("--port", str(health_server), "--service", "ccoe.v1.Inference")
    assert done.returncode == 1 and "answers NOT_SERVING" in done.stderr
    done = _health("--port", "1", "--timeout", "1")
    assert done.returncode == 1 and "unhealthy: 127.0.0.1:1: UNAVAILABLE" in done.stderr


# ---- the install the image runs, in a clean virtualenv ------------------------------------------------

@pytest.mark.slow
def test_the_image_install_works_in_a_clean_virtualenv(tmp_path):
    """The build context as Docker would send it (the COPY sources, less what .dockerignore drops),
    installed by docker/install.sh into a virtualenv that has nothing: then the console script and
    the app builder resolve there."""
    args = _args(DOCKERFILES["cpu"])
    src = tmp_path / "ccoe-src"
    for sources, _ in _copies(DOCKERFILES["cpu"]):
        for rel in sources:
            path = ROOT / rel
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for f in files:
                r = str(f.relative_to(ROOT))
                if not ignored(r):
                    (src / r).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, src / r)
    assert not list(src.glob("ccoe_common/pb/*_pb2*.py"))  # the build makes them
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # PIP_NO_COMPILE: byte-compiling all of torch and Ray is most of an install and proves nothing here.
    env = {**os.environ, "PYTHON": str(python), "RAY_VERSION": args["RAY_VERSION"], "PIP_NO_COMPILE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(src / "docker" / "install.sh"), str(src)], env=env, capture_output=True,
                          text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "services.app:build_app and 3 gRPC servicers import" in done.stdout
    shutil.rmtree(src)  # nothing may depend on the source tree any more
    ccoe = subprocess.run([str(env_dir / "bin" / "ccoe"), "serve", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert ccoe.returncode == 0 and "--config" in ccoe.stdout, ccoe.stderr[-2000:]
    check = subprocess.run([str(python), "-c", "import ray, ccoe_common.pb.registry_pb2 as r; print(ray.__version__)"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == args["RAY_VERSION"], check.stderr[-2000:]
