"""OpenTelemetry tracing: one trace per request, router -> replica -> engine phases.

The router continues the caller's trace from the gRPC metadata (`traceparent`,
`tracestate`, W3C Trace Context) and hands the replica a carrier dict with the same keys,
so every span of a request shares one trace id across processes.

Exporters (TelemetryConfig.tracing): "off" (default; spans are no-ops), "console" (stderr),
"otlp" (an OTLP/gRPC collector), "memory" (in-process, for tests). Setting CCOE_TRACE_DIR
also writes finished spans as JSON lines to <dir>/<pid>.jsonl: that is how a test reads the
spans of Ray worker processes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from ccoe_common.settings import load_settings
from ccoe_common.telemetry.config import TelemetryConfig

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured: TelemetryConfig | None = None
_provider: TracerProvider | None = None
MEMORY_EXPORTER = InMemorySpanExporter()


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to <dir>/<pid>.jsonl (trace id, span id, parent, name, attributes)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as f:
            for s in spans:
                f.write(json.dumps({
                    "name": s.name,
                    "trace_id": format(s.context.trace_id, "032x"),
                    "span_id": format(s.context.span_id, "016x"),
                    "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                    "start_ns": s.start_time, "end_ns": s.end_time,
                    "attributes": dict(s.attributes or {}),
                }) + "\n")
        return SpanExportResult.SUCCESS


def setup_tracing(config: TelemetryConfig) -> None:
    """Install the process-wide tracer provider once (later calls with the same config are no-ops)."""
    global _configured, _provider
    with _lock:
        if _configured == config:
            return
        trace_dir = load_settings().trace_dir
        if config.tracing == "off" and trace_dir is None:
            _configured = config
            return
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        if config.tracing == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif config.tracing == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        elif config.tracing == "memory":
            provider.add_span_processor(SimpleSpanProcessor(MEMORY_EXPORTER))
        if trace_dir is not None:
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_dir)))
        if _provider is None:
            trace.set_tracer_provider(provider)
        _provider = provider
        _configured = config


def tracer() -> trace.Tracer:
    return (_provider or trace.get_tracer_provider()).get_tracer("ccoe")


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a caller sent (traceparent/tracestate keys), or an empty one."""
    return _PROPAGATOR.extract(carrier={k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")})


def inject() -> dict[str, str]:
    """A carrier for the current span, to send to the next hop."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


@contextmanager
def span(name: str, parent: otel_context.Context | None = None,
         **attributes: AttributeValue | None) -> Iterator[trace.Span]:
    with tracer().start_as_current_span(name, context=parent, attributes=_known(attributes)) as s:
        yield s


def record_phase(name: str, start_ns: int, end_ns: int, **attributes: AttributeValue | None) -> None:
    """A finished child span of the current span, for a phase measured elsewhere (queue, prefill)."""
    s = tracer().start_span(name, start_time=start_ns, attributes=_known(attributes))
    s.end(end_time=max(end_ns, start_ns))


def _known(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    """The attributes that have a value: None means "not known" and is left off the span."""
    return {k: v for k, v in attributes.items() if v is not None}
