"""`ccoe bench rollout`: how long a pushed expert version takes to be served by every replica
while the fleet is under load, and whether any request fails or mixes versions meanwhile.

The local stack runs 2 (or more) ModelReplicas on a Qwen2-0.5B-shaped random-weight backbone,
serving version 1 of one expert (default placement: as many GL-spread MLP layers as fit the
15% budget). Client threads stream requests to that expert by name, back to back, for the
whole run. Then versions 2, 3, ... are pushed one after another through the registry's
PushExpert (all-at-once rollouts), and for each:

- t0 is taken just before PushExpert is sent;
- the rollout is polled (`wait_rollout`) until it is `done`;
- then a probe request (1 token) is sent, again until its answer comes from the new version;
- push-to-live = the moment that probe answered - t0.

Every response of the load and the probes is checked: a response fails on any gRPC error,
and is "mixed" if its messages name more than one version of the expert. Exit status 1 if
any failed or was mixed, or a push never went live; timing is reported against the p99 target
(3 s, --quick 2 s), not enforced (it depends on how busy the machine is).

    ccoe bench rollout                  # 0.5b shape, 2 replicas, 10 pushes
    ccoe bench rollout --quick --json   # 3 pushes, < 5 minutes on 2 cores
    ccoe bench rollout --shape tiny --pushes 2 --json   # the end-to-end test's toy run
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccoe_common.bench.memory import SHAPES as MEMORY_SHAPES
from ccoe_common.bench.memory import _quiet_transformers
from ccoe_common.bench.serve import _percentile
from ccoe_common.bench.throughput import SHAPES as THROUGHPUT_SHAPES
from ccoe_common.bench.throughput import _perturb
from ccoe_common.bench.throughput import workload_from_args as throughput_workload
from ccoe_common.console import (
    Progress,
    UserError,
    add_json_flag,
    format_table,
    positive_int,
    print_json,
    stdout_to_stderr,
)

if TYPE_CHECKING:
    from ccoe_common.serving.local_stack import LocalStack

EXPERT = "rollout"
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": THROUGHPUT_SHAPES["0.5b"],
    "150m": MEMORY_SHAPES["150m"],
    "tiny": MEMORY_SHAPES["tiny"],
}
PROMPT = "Compute 12 + 7 and 144 / 12."
REQUEST_TIMEOUT_S = 120.0  # a load request slower than this counts as failed (DEADLINE_EXCEEDED)
LIVE_TIMEOUT_S = 300.0  # per push: rollout done and a probe on the new version, or the run stops
WARMUP_TIMEOUT_S = 300.0
_BACKBONE_DONE = "backbone.done"  # written after the checkpoint, so a half-written one is rebuilt


@dataclass(frozen=True)
class Workload:
    """What one run does. Example: Workload(shape="0.5b", replicas=2, clients=4, max_tokens=8, pushes=10)."""

    shape: str = "0.5b"
    replicas: int = 2
    clients: int = 4  # streaming load threads, each sending its next request as soon as one ends
    max_tokens: int = 8
    pushes: int = 10
    gap_s: float = 2.0  # load keeps running between pushes, so every version serves a while
    target_p99_s: float = 3.0  # push-to-live p99 reported as met or not (not enforced)


FULL = Workload()
QUICK = Workload(pushes=3, gap_s=1.0, target_p99_s=2.0)


# ---- CLI ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ccoe bench rollout`."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="backbone shape (default 0.5b = Qwen2-0.5B's; 150m; tiny = a toy for tests)")
    parser.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                        help=f"ModelReplicas (default {FULL.replicas})")
    parser.add_argument("--clients", type=positive_int, default=None, metavar="N",
                        help=f"concurrent streaming load clients (default {FULL.clients})")
    parser.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                        help=f"tokens per load request (default {FULL.max_tokens})")
    parser.add_argument("--pushes", type=positive_int, default=None, metavar="N",
                        help=f"versions pushed one after another (default {FULL.pushes}, --quick {QUICK.pushes})")
    parser.add_argument("--gap-s", type=float, default=None, metavar="S",
                        help=f"load-only pause between pushes (default {FULL.gap_s}, --quick {QUICK.gap_s})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="cache of the checkpoint and expert versions (default CCOE_CACHE_DIR/bench-rollout)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.pushes} pushes, < 5 minutes on 2 cores")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_json_flag(parser)


def workload_from_args(args: argparse.Namespace) -> Workload:
    if args.gap_s is not None and args.gap_s < 0:
        raise UserError(f"--gap-s must be >= 0, got {args.gap_s}")
    return throughput_workload(args, QUICK, FULL)


# ---- assets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    backbone: Path
    uris: list[str]  # uris[i] holds version i + 1 of the expert
    backbone_params: int
    expert_params: int
    expert_layers: list[int]


def prepare(workdir: Path, shape: str, versions: int) -> Assets:
    """The checkpoint and `versions` versions of the expert under workdir/shape, built once.

    Version v is the carved expert plus seeded noise (seed v), so each version is a distinct
    artifact (its own sha256) and any missing one can be written without the others.
    """
    import torch

    from ccoe_common.experts.artifact import read_manifest
    from ccoe_common.model import CCoEModel
    from ccoe_common.model.synthetic import make_checkpoint

    root = workdir / shape
    backbone = root / "backbone"
    experts = root / "experts"
    if not (root / _BACKBONE_DONE).exists():
        shutil.rmtree(root, ignore_errors=True)  # experts of an older backbone would not match it
        with _quiet_transformers():
            make_checkpoint(backbone, "qwen2", seed=0, dtype=torch.bfloat16, **SHAPES[shape])
        (root / _BACKBONE_DONE).touch()
    uris = [str(experts / f"v{v}") for v in range(1, versions + 1)]
    missing = [v for v, uri in enumerate(uris, start=1) if not (Path(uri) / "manifest.json").exists()]
    if missing:
        model = CCoEModel.from_pretrained(backbone, dtype=torch.bfloat16)
        for v in missing:
            expert = model.carve(EXPERT, version=v, domains=["bench"])
            _perturb(list(expert.parameters()), seed=v)
            expert.to_artifact(uris[v - 1], model.info)
        del model, expert
        gc.collect()  # the driver should not hold a backbone copy while the replicas run
    manifest = read_manifest(uris[0])
    return Assets(backbone=backbone, uris=uris, backbone_params=manifest.base_model.parameter_count,
                  expert_params=manifest.parameter_count, expert_layers=list(manifest.layers))


# ---- load -----------------------------------------------------------------------------------


@dataclass
class Response:
    started: float  # time.monotonic() when sent
    ended: float
    versions: set[int]  # every version of the expert that the response's messages named
    error: str | None  # gRPC status code name, None if it succeeded
    probe: bool = False


@dataclass
class Log:
    """Responses of every thread; list.append is atomic, so threads append without a lock."""

    responses: list[Response] = field(default_factory=list)


def request(max_tokens: int):  # -> pb.GenerateRequest
    from ccoe_common.pb import inference_pb2 as pb

    return pb.GenerateRequest(prompt=PROMPT, expert=pb.ExpertRef(name=EXPERT), max_tokens=max_tokens,
                              sampling=pb.SamplingParams(temperature=0.0, ignore_eos=True))


def stream_once(stub: Any, max_tokens: int, log: Log, probe: bool = False) -> Response:
    """One GenerateStream to the expert by name, consumed to the end and logged."""
    import grpc

    started = time.monotonic()
    versions: set[int] = set()
    error = None
    try:
        for msg in stub.GenerateStream(request(max_tokens), timeout=REQUEST_TIMEOUT_S):
            versions.update(e.version for e in msg.route.experts if e.name == EXPERT)
            if msg.HasField("expert") and msg.expert.name == EXPERT:
                versions.add(msg.expert.version)
    except grpc.RpcError as e:
        error = e.code().name if e.code() is not None else "UNKNOWN"
    response = Response(started, time.monotonic(), versions, error, probe)
    log.responses.append(response)
    return response


@contextmanager
def load(stack: LocalStack, clients: int, max_tokens: int, log: Log) -> Iterator[threading.Event]:
    """`clients` threads streaming back to back until the block ends; yields the stop event.
    On exit the threads finish the request they are in, so every response is logged."""
    from ccoe_common.pb import inference_pb2_grpc

    stop = threading.Event()
    channel = stack.inference_channel()
    stub = inference_pb2_grpc.InferenceStub(channel)

    def client() -> None:
        while not stop.is_set():
            stream_once(stub, max_tokens, log)

    threads = [threading.Thread(target=client, name=f"rollout-load-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        yield stop
    finally:
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 10)
        channel.close()


def wait_warm(log: Log, clients: int, timeout_s: float = WARMUP_TIMEOUT_S) -> None:
    """Until each client could have finished one request: `clients` successful responses."""
    deadline = time.monotonic() + timeout_s
    while sum(r.error is None for r in log.responses) < clients:
        if time.monotonic() > deadline:
            errors = sorted({r.error for r in log.responses if r.error})
            raise RuntimeError(f"the load got {len(log.responses)} responses in {timeout_s:.0f}s, fewer than "
                               f"{clients} successful; errors: {errors or 'none'}")
        time.sleep(0.1)


# ---- pushes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushTiming:
    version: int
    push_rpc_s: float  # PushExpert returned: copied into the store, validated on a replica, registered
    rollout_done_s: float  # the registry reported the rollout done (every live replica holds it)
    live_s: float  # a probe's answer came from the new version
    probe_s: float  # how long that probe took (queueing + one token on a loaded replica)
    probes: int
    live_at: float  # time.monotonic() of live_s, to check later requests against


def push_until_live(registry: Any, stub: Any, uri: str, version: int, log: Log) -> PushTiming:
    """Push one version and time it until a request by name is answered by it."""
    from ccoe_common.registry.client import policy

    t0 = time.monotonic()
    pushed = registry.push(uri, who="bench-rollout", rollout=policy("all_at_once"))
    t_push = time.monotonic()
    if pushed.expert.version != version:
        raise RuntimeError(f"pushed {uri} registered {pushed.expert.name}@{pushed.expert.version}, "
                           f"expected version {version}")
    registry.wait_rollout(EXPERT, pushed.rollout.id, timeout_s=LIVE_TIMEOUT_S, poll_s=0.02)
    t_done = time.monotonic()
    probes = 0
    while True:
        probes += 1
        answer = stream_once(stub, 1, log, probe=True)
        if answer.error is None and version in answer.versions:
            break
        if time.monotonic() - t0 > LIVE_TIMEOUT_S:
            raise TimeoutError(f"{EXPERT}@{version}: rollout done but {probes} probes in {LIVE_TIMEOUT_S:.0f}s "
                               f"never answered from it (last: versions {sorted(answer.versions)}, "
                               f"error {answer.error})")
        time.sleep(0.02)
    return PushTiming(version, t_push - t0, t_done - t0, answer.ended - t0, answer.ended - answer.started, probes,
                      answer.ended)


# ---- the run --------------------------------------------------------------------------------


def collect(wl: Workload, workdir: Path, step: Callable[[str], None]) -> dict[str, Any]:
    import grpc
    import torch

    from ccoe_common.pb import inference_pb2_grpc
    from ccoe_common.ports import free_port
    from ccoe_common.registry.client import RolloutFailed
    from ccoe_common.serving.config import AppConfig
    from ccoe_common.serving.local_stack import LocalStack

    started = time.monotonic()
    torch.set_num_threads(2)
    assets = prepare(workdir, wl.shape, wl.pushes + 1)
    step(f"{wl.shape} backbone ({assets.backbone_params / 1e6:.1f}M parameters) and {wl.pushes + 1} versions "
         f"of a {assets.expert_params / 1e6:.1f}M-parameter expert ready in {workdir / wl.shape}")
    engine = {"max_seq_len": 256, "max_running": max(8, 2 * wl.clients), "max_batched_tokens": 256,
              "prefill_chunk": 256, "max_waiting": 64}
    config = AppConfig.load({
        "backbone": str(assets.backbone), "experts": [assets.uris[0]],
        "replica": {"num_replicas": wl.replicas, "num_cpus": 0, "dtype": "bfloat16", "engine": engine},
        "auth": {"mode": "token"},
        # The versions are pushed from where prepare() built them.
        "registry": {"allowed_sources": [os.path.commonpath(assets.uris)]},
    })
    log = Log()
    timings: list[PushTiming] = []
    error = None
    with LocalStack(config, grpc_port=free_port(), http_port=free_port()) as stack:
        step(f"local stack up: {wl.replicas} replicas serving {EXPERT}@1")
        channel = stack.inference_channel()
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            with stack.registry_client() as registry, load(stack, wl.clients, wl.max_tokens, log):
                wait_warm(log, wl.clients)
                step(f"load running: {wl.clients} clients, {len(log.responses)} responses so far")
                for v in range(2, wl.pushes + 2):
                    try:
                        t = push_until_live(registry, stub, assets.uris[v - 1], v, log)
                    except (grpc.RpcError, RolloutFailed, TimeoutError, RuntimeError) as e:
                        error = f"push of {EXPERT}@{v}: {type(e).__name__}: {e}"
                        step(error)
                        break
                    timings.append(t)
                    step(f"push {v - 1}/{wl.pushes}: {EXPERT}@{v} live in {t.live_s:.2f}s (PushExpert "
                         f"{t.push_rpc_s:.2f}s, rollout done {t.rollout_done_s:.2f}s, {t.probes} probe(s))")
                    if v < wl.pushes + 1:
                        time.sleep(wl.gap_s)
        finally:
            channel.close()
    return report(wl, assets, log, timings, error, time.monotonic() - started)


def report(wl: Workload, assets: Assets, log: Log, timings: list[PushTiming], error: str | None,
           elapsed_s: float) -> dict[str, Any]:
    live = [t.live_s for t in timings]
    responses = log.responses
    failures: dict[str, int] = {}
    for r in responses:
        if r.error:
            failures[r.error] = failures.get(r.error, 0) + 1
    p99 = _percentile(live, 99)
    return {
        "pushes": len(timings),
        "push_to_live_p50_s": round(_percentile(live, 50), 3),
        "push_to_live_p99_s": round(p99, 3),
        "requests": len(responses),
        "failed_requests": sum(failures.values()),
        "mixed_version_responses": sum(len(r.versions) > 1 for r in responses),
        "target_p99_s": wl.target_p99_s,
        "target_met": bool(timings) and p99 <= wl.target_p99_s,
        "push_to_live_max_s": round(max(live, default=0.0), 3),
        "probe_requests": sum(r.probe for r in responses),
        "stale_responses": stale_responses(responses, timings),
        "failures_by_code": failures,
        "push_times": [{"version": t.version, "push_rpc_s": round(t.push_rpc_s, 3),
                        "rollout_done_s": round(t.rollout_done_s, 3), "live_s": round(t.live_s, 3),
                        "probe_s": round(t.probe_s, 3), "probes": t.probes} for t in timings],
        "error": error,
        "shape": wl.shape,
        "dtype": "bfloat16",
        "backbone_params": assets.backbone_params,
        "expert_params": assets.expert_params,
        "expert_fraction": round(assets.expert_params / assets.backbone_params, 4),
        "expert_layers": assets.expert_layers,
        "replicas": wl.replicas,
        "clients": wl.clients,
        "max_tokens": wl.max_tokens,
        "gap_s": wl.gap_s,
        "rollout_strategy": "all_at_once",
        "percentiles": "nearest rank over the pushes; with fewer than 100 pushes p99 is the slowest push",
        "elapsed_s": round(elapsed_s, 1),
    }


def stale_responses(responses: list[Response], timings: list[PushTiming]) -> int:
    """Responses sent after a version was seen live that were still answered by an older one."""
    stale = 0
    for r in responses:
        live_before = [t.version for t in timings if t.live_at < r.started]
        if live_before and r.versions and min(r.versions) < max(live_before):
            stale += 1
    return stale


def ok(r: dict[str, Any]) -> bool:
    return r["error"] is None and r["failed_requests"] == 0 and r["mixed_version_responses"] == 0


def render(r: dict[str, Any]) -> str:
    head = (f"qwen2 '{r['shape']}' backbone ({r['backbone_params'] / 1e6:.1f}M parameters, {r['dtype']}), "
            f"{r['replicas']} replicas; expert '{EXPERT}': ffn at layers {r['expert_layers']} "
            f"({r['expert_params'] / 1e6:.2f}M parameters, {r['expert_fraction']:.1%} of the backbone); "
            f"load: {r['clients']} clients streaming {r['max_tokens']} tokens per request; "
            f"{r['rollout_strategy']} rollouts, {r['gap_s']:g}s apart")
    table = format_table(
        ("push", "version", "PushExpert s", "rollout done s", "live s", "probes", "last probe s"),
        [(i, t["version"], f"{t['push_rpc_s']:.2f}", f"{t['rollout_done_s']:.2f}", f"{t['live_s']:.2f}", t["probes"],
          f"{t['probe_s']:.2f}")
         for i, t in enumerate(r["push_times"], start=1)],
    )
    timing = "PASS" if r["target_met"] else "FAIL"
    serving = "PASS" if ok(r) else "FAIL"
    failures = ", ".join(f"{k} {n}" for k, n in sorted(r["failures_by_code"].items()))
    lines = [
        head, "", table, "",
        f"push-to-live over {r['pushes']} pushes: p50 {r['push_to_live_p50_s']:.2f}s, "
        f"p99 {r['push_to_live_p99_s']:.2f}s (= the slowest push); target p99 <= {r['target_p99_s']:g}s: {timing}",
        f"requests {r['requests']} ({r['probe_requests']} probes), failed {r['failed_requests']}"
        f"{f' ({failures})' if failures else ''}, mixed-version responses {r['mixed_version_responses']}, "
        f"answered by an older version after the new one was live {r['stale_responses']}: {serving}",
    ]
    if r["error"]:
        lines.append(f"stopped early: {r['error']}")
    lines.append(f"{r['elapsed_s']:.0f}s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handler of `ccoe bench rollout`: 0 if no request failed or mixed versions, else 1."""
    from ccoe_common.settings import load_settings

    wl = workload_from_args(args)
    workdir = args.workdir or load_settings().cache_dir / "bench-rollout"
    progress = Progress(total=3 + wl.pushes, quiet=args.quiet)
    # Ray prints to stdout from its own threads, also while the stack shuts down; the report
    # below is the only thing this command writes there.
    with stdout_to_stderr():
        result = collect(wl, workdir.expanduser(), progress.step)
    if args.json:
        print_json(result)
    else:
        print(render(result))
    return 0 if ok(result) else 1

