"""A client of the ccoe.v1.Registry gRPC API, for the ops CLI, the demo and the benchmarks.

    with RegistryClient("127.0.0.1:9000", token=os.environ["CCOE_TOKEN"]) as reg:
        pushed = reg.push("file:///exports/math/v2", who="alice")
        reg.wait_rollout("math", pushed.rollout.id)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec

from ccoe_common.auth.client import authorized_channel
from ccoe_common.experts.artifact import read_manifest
from ccoe_common.experts.manifest import MANIFEST_FILE, WEIGHTS_FILE
from ccoe_common.pb import registry_pb2 as pb
from ccoe_common.pb import registry_pb2_grpc

CHUNK_BYTES = 1 << 20
Progress = Callable[[int, int], None]  # (bytes sent, bytes total)


class RolloutFailed(RuntimeError):
    def __init__(self, rollout: pb.Rollout):
        self.rollout = rollout
        super().__init__(f"rollout {rollout.id} of {rollout.expert}@{rollout.to_version} was rolled back: "
                         f"{rollout.reason}")


def policy(strategy: str = "all_at_once", canary_replicas: int = 1, max_unavailable: int = 1,
           canary_wait_s: float = 0.0) -> pb.RolloutPolicy:
    names = {"all_at_once": pb.ALL_AT_ONCE, "all-at-once": pb.ALL_AT_ONCE, "canary": pb.CANARY}
    if strategy not in names:
        raise ValueError(f"rollout strategy must be all-at-once or canary, got {strategy!r}")
    return pb.RolloutPolicy(strategy=names[strategy], canary_replicas=canary_replicas,
                            max_unavailable=max_unavailable, canary_wait_ms=int(canary_wait_s * 1000))


class RegistryClient:
    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 120.0):
        """token: the caller's bearer token (role admin for every method here); None sends none."""
        self.address = address
        self.timeout_s = timeout_s
        self.channel = authorized_channel(address, token)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- experts ---------------------------------------------------------------------------

    def push(self, uri: str, *, who: str, rollout: pb.RolloutPolicy | None = None,
             expected_revision: int | None = None, register_only: bool = False) -> pb.PushExpertResponse:
        req = pb.PushExpertRequest(uri=uri, who=who, rollout=rollout or policy(), register_only=register_only)
        if expected_revision is not None:
            req.expected_revision = expected_revision
        return self.stub.PushExpert(req, timeout=self.timeout_s)

    def upload(self, folder: str, *, progress: Progress | None = None) -> pb.UploadArtifactResponse:
        """Stream a local (or any fsspec) artifact folder into the registry's artifact store."""
        manifest = read_manifest(folder)
        sizes = {name: fsspec.core.url_to_fs(_join(folder, name))[0].size(_join(folder, name))
                 for name in (MANIFEST_FILE, WEIGHTS_FILE)}
        total = sum(sizes.values())

        def chunks() -> Iterator[pb.ArtifactChunk]:
            sent = 0
            for name in (WEIGHTS_FILE, MANIFEST_FILE):
                with fsspec.open(_join(folder, name), "rb") as f:
                    while data := f.read(CHUNK_BYTES):
                        yield pb.ArtifactChunk(expert=manifest.name, version=manifest.version, file=name, data=data)
                        sent += len(data)
                        if progress is not None:
                            progress(sent, total)

        return self.stub.UploadArtifact(chunks(), timeout=self.timeout_s)

    def pop(self, name: str, version: int = 0, *, who: str, export_to: str = "",
            wait_s: float = 0.0) -> pb.PopExpertResponse:
        return self.stub.PopExpert(pb.PopExpertRequest(name=name, version=version, who=who, export_to=export_to,
                                                       wait_ms=int(wait_s * 1000)),
                                   timeout=self.timeout_s + wait_s)

    def list(self) -> pb.ListExpertsResponse:
        return self.stub.ListExperts(pb.ListExpertsRequest(), timeout=self.timeout_s)

    def get(self, name: str) -> pb.ExpertInfo:
        return self.stub.GetExpert(pb.GetExpertRequest(name=name), timeout=self.timeout_s)

    # ---- rules -----------------------------------------------------------------------------

    def get_rules(self) -> pb.RulesResponse:
        return self.stub.GetRules(pb.GetRulesRequest(), timeout=self.timeout_s)

    def set_rules(self, table: str, *, who: str, expected_revision: int | None = None) -> pb.RulesResponse:
        req = pb.SetRulesRequest(table=table, who=who)
        if expected_revision is not None:
            req.expected_revision = expected_revision
        return self.stub.SetRules(req, timeout=self.timeout_s)

    # ---- rollouts --------------------------------------------------------------------------

    def rollout(self, expert: str) -> pb.Rollout:
        return self.stub.GetRollout(pb.GetRolloutRequest(expert=expert), timeout=self.timeout_s)

    def start_rollout(self, expert: str, version: int, *, who: str,
                      rollout: pb.RolloutPolicy | None = None) -> pb.Rollout:
        return self.stub.StartRollout(pb.StartRolloutRequest(expert=expert, version=version, who=who,
                                                             policy=rollout or policy()), timeout=self.timeout_s)

    def rollback(self, expert: str, *, who: str, reason: str = "") -> pb.Rollout:
        return self.stub.Rollback(pb.RollbackRequest(expert=expert, who=who, reason=reason), timeout=self.timeout_s)

    def wait_rollout(self, expert: str, rollout_id: str = "", *, timeout_s: float = 300.0, poll_s: float = 0.05,
                     on_change: Callable[[pb.Rollout], None] | None = None) -> pb.Rollout:
        """Block until the rollout finishes; raises RolloutFailed if it was rolled back."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            r = self.rollout(expert)
            if rollout_id and r.id != rollout_id:
                raise RolloutFailed(pb.Rollout(id=rollout_id, expert=expert,
                                               reason=f"superseded by rollout {r.id}", state="rolled_back"))
            view = (r.state, tuple((s.replica_id, s.state) for s in r.replicas))
            if on_change is not None and view != last:
                on_change(r)
                last = view
            if r.state == "done":
                return r
            if r.state == "rolled_back":
                raise RolloutFailed(r)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {r.id} of {expert}@{r.to_version} still {r.state} after {timeout_s}s")
            time.sleep(poll_s)

    # ---- audit -----------------------------------------------------------------------------

    def audit(self, limit: int = 50) -> pb.ListAuditResponse:
        return self.stub.ListAudit(pb.ListAuditRequest(limit=limit), timeout=self.timeout_s)


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name if "://" in folder else str(Path(folder) / name)
