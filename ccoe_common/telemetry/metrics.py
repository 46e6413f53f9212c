"""Serving metrics in Prometheus format.

Inside Ray (the deployments) metrics go through `ray.util.metrics`, which every Ray node
exports in Prometheus text format on its metrics port (KubeRay's PodMonitors scrape it); Ray
prefixes names with `ray_`, e.g. `ray_ccoe_requests_total`. Outside Ray (in-process engines,
tools, tests) the same metrics live in a private prometheus_client registry; `render()`
returns its text.

| metric | type | labels |
| --- | --- | --- |
| ccoe_requests_total | counter | expert, code (gRPC status name: OK, NOT_FOUND, ...); one per engine request |
| ccoe_router_requests_total | counter | policy (explicit, rules, default, none), code; one per gRPC call |
| ccoe_router_retries_total | counter | reason (replica_lost), outcome (retried, gave_up); its replica died |
| ccoe_prompt_tokens_total, ccoe_generated_tokens_total | counter | expert |
| ccoe_ttft_seconds, ccoe_inter_token_latency_seconds | histogram | expert |
| ccoe_running_sequences, ccoe_queue_depth | gauge | |
| ccoe_resident_experts, ccoe_kv_cache_bytes | gauge | |
| ccoe_resident_expert_bytes | gauge | expert |
| ccoe_expert_loads_total | counter | expert (name@version), outcome (ok, failed); a replica loading for the registry |
| ccoe_expert_load_seconds | histogram | expert; read + validate + smoke test |
| ccoe_rollouts_total | counter | expert (name), outcome (done, rolled_back); from the registry |
| ccoe_rollout_seconds | histogram | expert; start of a rollout to the fleet-wide flip |
| ccoe_registry_regressions_total | counter | component (router, replica); holds begun (fail static) |
| ccoe_registry_holding | gauge | component; 1 while holding what it serves, 0 while following |
| ccoe_registry_reinitialized_total | counter | ; empty stores found and re-registered |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_COUNTERS = {
    "ccoe_requests_total": ("Finished requests by expert and gRPC status.", ("expert", "code")),
    "ccoe_prompt_tokens_total": ("Prompt tokens of finished requests.", ("expert",)),
    "ccoe_generated_tokens_total": ("Generated tokens.", ("expert",)),
    "ccoe_router_requests_total": ("gRPC calls by route policy and status.", ("policy", "code")),
    "ccoe_router_retries_total": ("Requests whose replica died under them: run again elsewhere, or failed "
                                  "UNAVAILABLE.", ("reason", "outcome")),
    "ccoe_expert_loads_total": ("Expert versions a replica loaded for the registry, by outcome.",
                                ("expert", "outcome")),
    "ccoe_rollouts_total": ("Finished rollouts by outcome.", ("expert", "outcome")),
    "ccoe_registry_regressions_total": ("Times a follower began holding back a registry state that went "
                                        "backwards (fail static).", ("component",)),
    "ccoe_registry_reinitialized_total": ("Times the registry found its store empty and re-registered the "
                                          "config's experts.", ()),
}
_HISTOGRAMS = {
    "ccoe_ttft_seconds": ("Time to first token, from the replica receiving the request.", ("expert",)),
    "ccoe_inter_token_latency_seconds": ("Time between consecutive tokens of a request.", ("expert",)),
    "ccoe_expert_load_seconds": ("Reading, validating and smoke-testing one expert version.", ("expert",)),
    "ccoe_rollout_seconds": ("From the start of a rollout to the fleet-wide flip.", ("expert",)),
}
_GAUGES = {
    "ccoe_running_sequences": ("Sequences in the running batch.", ()),
    "ccoe_queue_depth": ("Requests waiting for a KV slot.", ()),
    "ccoe_resident_experts": ("Expert versions resident on this replica.", ()),
    "ccoe_kv_cache_bytes": ("Bytes of the preallocated KV cache.", ()),
    "ccoe_resident_expert_bytes": ("Parameter bytes of each resident expert version.", ("expert",)),
    "ccoe_registry_holding": ("1 while a follower holds back a registry state that went backwards.",
                              ("component",)),
}


class Metrics:
    def __init__(self, backend: str | None = None):
        """backend: "ray", "prometheus", or None = ray when running inside Ray."""
        if backend is None:
            backend = "ray" if _in_ray() else "prometheus"
        self.backend = backend
        self._m: dict[str, Any] = {}
        if backend == "ray":
            from ray.util import metrics as rm

            for name, (doc, tags) in _COUNTERS.items():
                self._m[name] = rm.Counter(name, description=doc, tag_keys=tags)
            for name, (doc, tags) in _HISTOGRAMS.items():
                self._m[name] = rm.Histogram(name, description=doc, boundaries=list(LATENCY_BUCKETS), tag_keys=tags)
            for name, (doc, tags) in _GAUGES.items():
                self._m[name] = rm.Gauge(name, description=doc, tag_keys=tags)
        else:
            import prometheus_client as pc

            self.registry = pc.CollectorRegistry()
            for name, (doc, tags) in _COUNTERS.items():
                self._m[name] = pc.Counter(name.removesuffix("_total"), doc, tags, registry=self.registry)
            for name, (doc, tags) in _HISTOGRAMS.items():
                self._m[name] = pc.Histogram(name, doc, tags, buckets=LATENCY_BUCKETS, registry=self.registry)
            for name, (doc, tags) in _GAUGES.items():
                self._m[name] = pc.Gauge(name, doc, tags, registry=self.registry)

    def _record(self, method: str, name: str, value: float, **tags: str) -> None:
        """method: "inc", "observe" or "set" (the same names in both backends)."""
        m = self._m[name]
        if self.backend == "ray":
            getattr(m, method)(value, tags=tags or None)
        else:
            getattr(m.labels(**tags) if tags else m, method)(value)

    # ---- what the services record --------------------------------------------------------

    def request_finished(self, expert: str, code: str, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        self._record("inc", "ccoe_requests_total", 1, expert=expert, code=code)
        if prompt_tokens:
            self._record("inc", "ccoe_prompt_tokens_total", prompt_tokens, expert=expert)
        if generated_tokens:
            self._record("inc", "ccoe_generated_tokens_total", generated_tokens, expert=expert)

    def router_request(self, policy: str, code: str) -> None:
        self._record("inc", "ccoe_router_requests_total", 1, policy=policy, code=code)

    def router_retry(self, reason: str, outcome: str) -> None:
        self._record("inc", "ccoe_router_retries_total", 1, reason=reason, outcome=outcome)

    def first_token(self, expert: str, seconds: float) -> None:
        self._record("observe", "ccoe_ttft_seconds", seconds, expert=expert)

    def inter_token(self, expert: str, gaps: Sequence[float]) -> None:
        for gap in gaps:
            self._record("observe", "ccoe_inter_token_latency_seconds", gap, expert=expert)

    def engine_state(self, running: int, waiting: int, kv_cache_bytes: int, resident: dict[str, int]) -> None:
        self._record("set", "ccoe_running_sequences", running)
        self._record("set", "ccoe_queue_depth", waiting)
        self._record("set", "ccoe_kv_cache_bytes", kv_cache_bytes)
        self._record("set", "ccoe_resident_experts", len(resident))
        for expert, nbytes in resident.items():
            self._record("set", "ccoe_resident_expert_bytes", nbytes, expert=expert)

    def expert_loaded(self, expert: str, ok: bool, seconds: float) -> None:
        self._record("inc", "ccoe_expert_loads_total", 1, expert=expert, outcome="ok" if ok else "failed")
        if ok:
            self._record("observe", "ccoe_expert_load_seconds", seconds, expert=expert)

    def rollout_finished(self, expert: str, outcome: str, seconds: float) -> None:
        self._record("inc", "ccoe_rollouts_total", 1, expert=expert, outcome=outcome)
        if outcome == "done":
            self._record("observe", "ccoe_rollout_seconds", seconds, expert=expert)

    def registry_regression(self, component: str) -> None:
        self._record("inc", "ccoe_registry_regressions_total", 1, component=component)

    def registry_holding(self, component: str, holding: bool) -> None:
        self._record("set", "ccoe_registry_holding", 1 if holding else 0, component=component)

    def registry_reinitialized(self) -> None:
        self._record("inc", "ccoe_registry_reinitialized_total", 1)

    def render(self) -> str:
        """Prometheus text of the in-process registry (prometheus backend only)."""
        if self.backend != "prometheus":
            raise RuntimeError("inside Ray, metrics are exported by the Ray node's metrics endpoint")
        import prometheus_client as pc

        return pc.generate_latest(self.registry).decode()


def _in_ray() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False
