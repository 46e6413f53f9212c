"""What one ModelReplica runs: the model, its engine, and the stream API the router calls."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import torch

from ccoe_common.defaults import DTYPE_CHOICES
from ccoe_common.engine.engine import Engine
from ccoe_common.engine.params import GenerationRequest
from ccoe_common.errors import CCoEError
from ccoe_common.experts.artifact import read_manifest
from ccoe_common.model import CCoEModel
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.serving.config import AppConfig, ReplicaConfig
from ccoe_common.serving.events import DeltaEvent, ErrorEvent, Event
from ccoe_common.serving.validated import ValidatedExperts
from ccoe_common.telemetry import tracing
from ccoe_common.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


def tune_process(rc: ReplicaConfig) -> None:
    """Process-wide settings for a process whose job is one replica (the ModelReplica actor calls
    it before building the runtime; an in-process runtime in a test or a tool leaves them alone)."""
    # The engine thread holds the GIL for most of a step; a shorter switch interval keeps
    # this process's event loop (streams out, cancels in, Ray's health probes) responsive.
    sys.setswitchinterval(0.0005)
    # Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU; the engine thread inherits this.
    torch.set_num_threads(rc.threads)


class ReplicaRuntime:
    def __init__(self, config: AppConfig, *, load_config_experts: bool = True):
        """load_config_experts=False when the registry decides what this replica holds."""
        self.config = config
        rc = config.replica
        device = rc.device or ("cuda" if rc.num_gpus > 0 else "cpu")
        tracing.setup_tracing(config.telemetry)
        model = CCoEModel.from_pretrained(config.backbone, dtype=DTYPE_CHOICES[rc.dtype], device=device,
                                          budget_fraction=rc.budget_fraction)
        for uri in config.experts if load_config_experts else ():
            log.info("loading expert %s", model.push(uri))
        self.engine = Engine(model, rc.engine).start()
        self.validated = ValidatedExperts()
        self.metrics = Metrics()
        self.update_gauges()

    async def stream(self, request: GenerationRequest, carrier: dict[str, str]) -> AsyncGenerator[Event, None]:
        """Engine deltas as DeltaEvents; an error becomes one final ErrorEvent."""
        submitted_ns = time.time_ns()
        expert = "backbone" if request.expert is None else str(request.expert)
        code = "CANCELLED"  # unless the stream ends otherwise: the caller went away
        gaps: list[float] = []
        last = time.monotonic()
        with tracing.span("replica.generate", tracing.extract(carrier), request_id=request.request_id,
                          expert=expert) as s:
            try:
                async for delta in self.engine.generate(request):
                    now = time.monotonic()
                    if delta.expert is not None:
                        expert = str(delta.expert)
                    gaps.append(now - last)
                    last = now
                    if delta.finish_reason is not None:
                        assert delta.usage is not None and delta.timings is not None  # set on the last delta
                        code = "OK"
                        _record_phases(submitted_ns, delta.timings, delta.usage)
                        s.set_attribute("finish_reason", delta.finish_reason)
                        s.set_attribute("expert_version", expert)
                        self.metrics.request_finished(expert, code, delta.usage.prompt_tokens,
                                                      delta.usage.completion_tokens)
                        if delta.timings.ttft_s is not None:
                            self.metrics.first_token(expert, delta.timings.ttft_s)
                        self.metrics.inter_token(expert, gaps[1:])  # gaps[0] is the time to first token
                    yield DeltaEvent.from_delta(delta)
            except CCoEError as e:
                code = e.code
                s.set_attribute("error.code", e.code)
                yield ErrorEvent.from_error(e)
            finally:
                if code != "OK":
                    self.metrics.request_finished(expert, code)
                self.update_gauges()

    def update_gauges(self) -> None:
        self.validated.expire()  # an expert validated for a push that never rolled out is let go
        s = self.engine.stats()
        self.metrics.engine_state(s.running, s.waiting, s.kv_cache_bytes, s.resident)

    def expert_names(self) -> list[str]:
        return sorted({k.name for k in self.engine.model.resident()})

    def validate(self, uri: str) -> str | None:
        """Load and check an artifact against this backbone without serving it: None if it
        would load, else the reason (checksum, fingerprint, shapes, budget...)."""
        try:
            manifest = read_manifest(uri)
            expert = self.engine.load(uri)
        except Exception as e:  # noqa: BLE001 - every refusal is reported by message
            return f"{type(e).__name__}: {e}"
        self.validated.keep(expert, manifest.weights_sha256)
        return None

    def load(self, uri: str) -> LoadedExpert:
        """Read and check an artifact for the registry (not yet resident): the expert validated
        moments ago for the same push if the stored manifest names it, else a full load."""
        kept = self.validated.take(read_manifest(uri))
        return kept if kept is not None else self.engine.load(uri)

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        return {"running": s.running, "waiting": s.waiting, "free_slots": s.free_slots, "steps": s.steps,
                "generated_tokens": s.generated_tokens, "resident": s.resident, "draining": s.draining,
                "staged": s.staged, "kv_cache_bytes": s.kv_cache_bytes,
                "backbone_bytes": self.engine.model.memory_report().backbone_bytes,
                "torch_threads": torch.get_num_threads()}

    def healthy(self) -> bool:
        return self.engine.alive

    def close(self) -> None:
        self.engine.stop()


def _record_phases(submitted_ns: int, timings, usage) -> None:
    # The engine measures its phases; they become child spans with their real start and end.
    if timings is None:
        return
    q = submitted_ns + int(timings.queue_s * 1e9)
    first = submitted_ns + int((timings.ttft_s or timings.total_s) * 1e9)
    end = submitted_ns + int(timings.total_s * 1e9)
    tracing.record_phase("engine.queue", submitted_ns, q)
    tracing.record_phase("engine.prefill", q, first, prompt_tokens=usage.prompt_tokens if usage else None)
    tracing.record_phase("engine.decode", first, end, completion_tokens=usage.completion_tokens if usage else None)
