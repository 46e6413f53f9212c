"""Tracing (OpenTelemetry, W3C trace context) and metrics (Prometheus format)."""
