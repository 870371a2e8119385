"""OpenTelemetry tracing, off by default: one trace from publish through the worker to events.

The trace context travels in AMQP headers (W3C `traceparent`), including through the outbox:
each event row keeps the context of the run that wrote it, so the relay's publish joins the trace.
When no tracer provider is installed, spans and propagation are skipped altogether: even the
OpenTelemetry no-op API cost a measurable share of the worker's CPU (docs/performance.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind

TRACER_NAME = "eglo"
tracer = trace.get_tracer(TRACER_NAME)
_installed = False


def install(provider: trace.TracerProvider) -> None:
    """Make `provider` the process's tracer provider and turn eglo's spans on."""
    global _installed
    trace.set_tracer_provider(provider)
    _installed = True


def configure(enabled: bool, *, service_name: str, otlp_endpoint: str | None) -> None:
    """Install a tracer provider exporting to OTLP/HTTP (or the console) when enabled."""
    if not enabled:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint)
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)


def active() -> bool:
    """Whether tracing is on (checked per span, so it must cost nothing)."""
    return _installed


def span(
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, str | int | float | bool],
    parent: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[trace.Span]:
    """A span in the current trace (or the one in `parent` headers); nothing when tracing is off."""
    if not active():
        return contextlib.nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(
        name,
        context=extract(parent) if parent is not None else None,
        kind=kind,
        attributes=attributes,
    )


def inject(headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The current trace context as AMQP headers (nothing when tracing is off)."""
    if not active():
        return dict(headers or {})
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    out = dict(headers or {})
    out.update(carrier)
    return out


def extract(headers: Mapping[str, Any] | None) -> context.Context:
    carrier = {
        k: v.decode() if isinstance(v, bytes) else str(v)
        for k, v in (headers or {}).items()
        if k in ("traceparent", "tracestate")
    }
    return propagate.extract(carrier)


__all__ = ["SpanKind", "active", "configure", "extract", "inject", "install", "span", "tracer"]
