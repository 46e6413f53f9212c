"""What every registry-talking command shares: where the registry is (an address, or a Helm
release on Kubernetes reached through a port-forward), who is asking, how gRPC errors become one
line and an exit code, the upload bar, and how a rollout is shown.

    ccoe expert list --registry 10.0.0.5:9000
    ccoe --kube-context prod --namespace serving --release demo expert list
    ccoe expert push ./exports/law --upload        # --who defaults to alice@laptop
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import grpc

from ccoe_common import settings
from ccoe_common.auth.client import read_token_file
from ccoe_common.console import UserError, format_table, human_bytes, positive_int
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.registry.client import RegistryClient, RolloutFailed, policy
from ccoe_common.settings import DEFAULT_REGISTRY, load_settings

# The registry answers these when it could not be reached or did not answer in time: the
# request may succeed if retried, so they exit 1 (like a failed rollout), not 2 (a bad request).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Each poll reads every replica's report from Redis; a person watching needs no more than this.
POLL_S = 0.1
STRATEGY_NAMES = {pb.ROLLOUT_STRATEGY_UNSPECIFIED: "all-at-once", pb.ALL_AT_ONCE: "all-at-once",
                  pb.CANARY: "canary"}


# ---- flags and the client ------------------------------------------------------------------

def default_registry() -> str:
    return load_settings().registry


def default_who() -> str:
    """For the audit log, e.g. "alice@laptop"."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def add_registry_flags(parser: argparse.ArgumentParser, *, who: bool = False) -> None:
    parser.add_argument("--registry", metavar="ADDRESS", default=None,
                        help=f"the registry's gRPC address (default: $CCOE_REGISTRY, else {DEFAULT_REGISTRY})")
    parser.add_argument("--token-file", metavar="PATH", default=None,
                        help="file holding your bearer token (default: $CCOE_TOKEN); mint one with `ccoe auth token`")
    if who:
        parser.add_argument("--who", default=None,
                            help="ignored when the server authenticates: the audit log records the token's "
                                 "principal (default: $USER@hostname)")


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """The global flags that point the registry commands and `ccoe cluster` at a Helm release."""
    group = parser.add_argument_group(
        "a release on Kubernetes", "with --release, the registry commands find the release's ops Service through "
                                   "the Kubernetes API and reach it through a port-forward they open themselves")
    group.add_argument("--release", metavar="NAME", default=None, help="Helm release of charts/ccoe, e.g. demo")
    group.add_argument("--namespace", metavar="NS", default=None,
                       help="its namespace (default: the context's namespace, else default)")
    group.add_argument("--kube-context", metavar="CONTEXT", default=None,
                       help="kubeconfig context (default: the current context)")
    group.add_argument("--kubeconfig", metavar="PATH", default=None,
                       help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")


@contextmanager
def through_cluster(args: argparse.Namespace) -> Iterator[None]:
    """Runs a registry command against `--release`: its registry address becomes a local
    port-forward to the release's ops Service for as long as the command runs."""
    if getattr(args, "cluster_command", False):  # `ccoe cluster ...` uses the flags itself
        yield
        return
    if args.release is None:
        given = [flag for flag, value in (("--namespace", args.namespace), ("--kube-context", args.kube_context),
                                          ("--kubeconfig", args.kubeconfig)) if value]
        if given:
            raise UserError(f"{given[0]} needs --release NAME: the Helm release whose registry to reach")
        yield
        return
    if not hasattr(args, "registry"):
        raise UserError(f"--release works with the registry commands (expert list/show/push/pop, rollout, rules "
                        f"get/set, audit) and `ccoe cluster`, not with `ccoe {args.command}`")
    if args.registry:
        raise UserError(f"--registry {args.registry} and --release {args.release} both say where the registry is; "
                        "give one of them")
    from ccoe_common.kube.cluster import connect, forward_to_ops

    cluster = connect(args.kube_context, args.namespace, args.kubeconfig)
    with forward_to_ops(cluster, args.release) as address:
        args.registry = address
        yield


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=["all-at-once", "canary"], default="all-at-once",
                        help="all-at-once: every replica loads at once; canary: a few first, then the rest "
                             "(default all-at-once)")
    parser.add_argument("--canary-replicas", type=positive_int, default=1, metavar="N",
                        help="canary: replicas that load first (default 1)")
    parser.add_argument("--max-unavailable", type=positive_int, default=1, metavar="N",
                        help="canary: replicas loading at once after the canary (default 1)")
    parser.add_argument("--canary-wait", type=float, default=0.0, metavar="S",
                        help="canary: seconds the canary holds the version before the rest load (default 0)")


def add_wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="return once the rollout has started")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="give up waiting for the rollout after S seconds (default 600; it goes on)")


def policy_from_args(args: argparse.Namespace) -> pb.RolloutPolicy:
    if args.canary_wait < 0:
        raise ValueError(f"--canary-wait must be >= 0 seconds, got {args.canary_wait}")
    return policy(args.strategy, args.canary_replicas, args.max_unavailable, args.canary_wait)


def address(args: argparse.Namespace) -> str:
    return getattr(args, "registry", None) or default_registry()


def who(args: argparse.Namespace) -> str:
    return getattr(args, "who", None) or default_who()


def token(args: argparse.Namespace) -> str | None:
    """--token-file, else $CCOE_TOKEN, else None (a server with auth on then answers UNAUTHENTICATED)."""
    path = getattr(args, "token_file", None)
    return read_token_file(path) if path else settings.token()


def connect(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(address(args), token=token(args))


def local_or_uri(path: str) -> str:
    """A local path made absolute (the registry resolves paths in its own working directory);
    URIs ("s3://…", "file://…") pass as they are."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def rpc_error_exit(args: argparse.Namespace, error: grpc.RpcError) -> int:
    """One line on stderr, e.g. "ccoe expert: error: NOT_FOUND: expert 'x' is not registered"."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(error)
    if code == grpc.StatusCode.UNAVAILABLE and getattr(args, "release", None):
        details += f" (through the port-forward to release {args.release}'s ops Service)"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        details += " (set CCOE_TOKEN or --token-file to a token with role admin; mint one with `ccoe auth token`)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        details += (f" (is a registry listening at {address(args)}? "
                    "point --registry or CCOE_REGISTRY at it, or reach a cluster with --release)")
    print(f"ccoe {args.command}: error: {code.name}: {details}", file=sys.stderr)
    return 1 if code in RETRYABLE else 2


# ---- upload progress -------------------------------------------------------------------------

class UploadBar:
    """Bytes sent, on stderr: redrawn in place on a terminal, a line per quarter in a log.

    law@1  [##########----------]  50%  1.2 MiB / 2.4 MiB  3.1 MiB/s
    """

    WIDTH = 24

    def __init__(self, label: str, stream: Any = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.last_quarter = -1
        self.done = self.total = 0

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if self.tty:
            if done >= total or now - self.last_draw >= 0.1:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self.last_draw = now
            return
        quarter = 4 * done // total if total else 4
        if quarter > self.last_quarter:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self.last_quarter = quarter

    def finish(self) -> None:
        if self.tty and self.total:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self) -> str:
        share = self.done / self.total if self.total else 1.0
        filled = int(share * self.WIDTH)
        rate = self.done / max(time.monotonic() - self.start, 1e-6)
        return (f"uploading {self.label}  [{'#' * filled}{'-' * (self.WIDTH - filled)}] {int(share * 100):3d}%  "
                f"{human_bytes(self.done)} / {human_bytes(self.total)}  {human_bytes(rate)}/s")


# ---- rollouts --------------------------------------------------------------------------------

def when(unix_s: float) -> str | None:
    """Local ISO time, e.g. "2026-11-22T18:40:03+01:00"; None for 0 (not yet)."""
    return datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds") if unix_s else None


def rollout_dict(r: pb.Rollout) -> dict[str, Any] | None:
    if not r.id:
        return None
    p = r.policy
    return {"id": r.id, "expert": r.expert, "from_version": r.from_version, "to_version": r.to_version,
            "state": r.state, "reason": r.reason,
            "policy": {"strategy": STRATEGY_NAMES.get(p.strategy, str(p.strategy)),
                       "canary_replicas": p.canary_replicas, "max_unavailable": p.max_unavailable,
                       "canary_wait_s": p.canary_wait_ms / 1000},
            "replicas": [{"replica_id": s.replica_id, "state": s.state, "detail": s.detail} for s in r.replicas],
            "started_at": r.started_at, "finished_at": r.finished_at or None,
            "duration_s": round(r.finished_at - r.started_at, 3) if r.finished_at else None}


def rollout_headline(r: pb.Rollout) -> str:
    """e.g. "rollout 3fa2c1d0e9ab: law 1 -> 2 (canary), done in 2.4 s"."""
    source = f"v{r.from_version}" if r.from_version else "nothing"
    head = (f"rollout {r.id}: {r.expert} {source} -> v{r.to_version} "
            f"({STRATEGY_NAMES.get(r.policy.strategy, '?')}), {r.state}")
    if r.finished_at:
        head += f" in {r.finished_at - r.started_at:.1f} s"
    else:
        head += f" for {max(time.time() - r.started_at, 0):.1f} s"
    if r.reason:
        head += f": {r.reason}"
    return head


def replica_summary(r: pb.Rollout) -> str:
    """e.g. "1/2 ready: ModelReplica#ab12 ready, ModelReplica#cd34 loading"."""
    ready = sum(s.state == "ready" for s in r.replicas)
    states = ", ".join(f"{s.replica_id} {s.state}" + (f" ({s.detail})" if s.detail and s.state != "waiting" else "")
                       for s in r.replicas)
    return f"{ready}/{len(r.replicas)} replicas ready" + (f": {states}" if states else "")


def rollout_table(r: pb.Rollout) -> str:
    rows = [(s.replica_id, s.state, s.detail or "-") for s in r.replicas]
    return format_table(("replica", "state", "detail"), rows) if rows else "(no live replica)"


def print_rollout(r: pb.Rollout) -> None:
    print(rollout_headline(r))
    print(f"started {when(r.started_at)}" + (f", finished {when(r.finished_at)}" if r.finished_at else ""))
    print(rollout_table(r))


def wait_for_rollout(client: RegistryClient, r: pb.Rollout, timeout_s: float) -> tuple[pb.Rollout, int]:
    """Follow a rollout to its end, one stderr line per change; (last seen, exit code): 0 done,
    1 rolled back or still going at the timeout, 130 if interrupted (the rollout goes on)."""
    start = time.monotonic()

    def show(now: pb.Rollout) -> None:
        print(f"  {time.monotonic() - start:5.1f}s  {now.state:<11} {replica_summary(now)}",
              file=sys.stderr, flush=True)

    try:
        return client.wait_rollout(r.expert, r.id, timeout_s=timeout_s, poll_s=POLL_S, on_change=show), 0
    except RolloutFailed as e:
        # The raised record can be a stand-in (when superseded); the registry's is fuller.
        current = client.rollout(r.expert)
        return (current if current.id == r.id else e.rollout), 1
    except TimeoutError as e:
        print(f"ccoe: {e}; it goes on: follow it with `ccoe rollout status {r.expert} --watch`", file=sys.stderr)
        return client.rollout(r.expert), 1
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the rollout goes on: `ccoe rollout status {r.expert} --watch`", file=sys.stderr)
        return r, 130


def manifest_summary(manifest_json: str) -> dict[str, Any]:
    m = json.loads(manifest_json) if manifest_json else {}
    return {k: m.get(k) for k in ("kind", "layers", "parameter_count", "dtype", "domains", "weights_sha256",
                                  "created_at")}


def expert_dict(e: pb.ExpertInfo) -> dict[str, Any]:
    return {"name": e.name, "revision": e.revision, "latest": e.latest, "serving": e.serving,
            "versions": [{"version": v.version, "state": v.state, "uri": v.uri, "loaded_on": list(v.loaded_on),
                          "registered_revision": v.registered_revision,
                          "manifest": manifest_summary(v.manifest_json)} for v in e.versions],
            "rollout": rollout_dict(e.rollout)}
