"""One connected trace: publish → worker → QNN → database → emitted events."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.harness import events_sent, make_settings, running_worker, wait_for
from worker.observability import tracing


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter behind the global tracer provider (settable once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    exporter.clear()


async def test_one_trace_from_publish_to_events(
    spans: InMemorySpanExporter, amqp_url: str, database_url: str, pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """Every hop of one request shares a trace id and hangs off the publish span."""
    spans.clear()
    doc = next(r for r in generate_requests(4, seed=8, id_prefix="traced")
               if r["request_type"] == "forecast")
    async with running_worker(make_settings(amqp_url, database_url, emulator)), \
            Publisher.connect(amqp_url) as publisher:
        await publisher.publish(parse_request(doc))
        await wait_for(lambda: events_sent(pool))
        await wait_for(lambda: len(_named(spans.get_finished_spans(), "eglo.events publish")) == 2)

    finished = spans.get_finished_spans()
    [publish] = _named(finished, "eglo.requests publish")
    trace_id = publish.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    [process] = _named(in_trace, "eglo.requests process")
    [qnn] = _named(in_trace, "qnn predict")
    [save] = _named(in_trace, "db save run")
    events = _named(in_trace, "eglo.events publish")
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert qnn.parent is not None and qnn.parent.span_id == process.context.span_id
    assert save.parent is not None and save.parent.span_id == process.context.span_id
    assert len(events) == 2
    assert all(e.parent is not None and by_id[e.parent.span_id] is process for e in events)
    assert process.attributes is not None
    assert process.attributes["eglo.request_id"] == doc["request_id"]
    routing_keys = sorted(str((e.attributes or {})["messaging.rabbitmq.destination.routing_key"])
                          for e in events)
    assert routing_keys == ["embedding.requested", "run.completed.forecast"]


def _named(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]
