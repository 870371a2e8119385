"""Real QNN answers for the request templates, so the ceilings write and publish what eglo does.

Each template is sent once to the running emulator; its answer is checked the way eglo checks it
(`worker.core.result_checks.check_result`) and turned into the events eglo itself sends
(`worker.core.records.RunRecord.events()`: run.completed.<type>, embedding.requested). The ceilings
then only swap ids per request. The same pass measures the emulator's CPU per call by request
type (it competes for the cores with the worker).
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from benchmarks.harness import Bench, process_cpu
from contracts.qnn import PREDICT_PATH, build_predict_body, parse_predict_response
from contracts.requests import AnyRequest, request_fingerprint
from contracts.results import ExecutionMetadata
from producers.reader import parse_request
from worker.core.records import RunRecord
from worker.core.result_checks import check_result


@dataclass
class Fixture:
    """What eglo stores and sends for one template request once the QNN has answered."""

    request: AnyRequest
    fingerprint: str
    result: dict[str, Any]
    metadata: ExecutionMetadata
    round_trip_ms: float
    outcome_doc: dict[str, Any]  # run.completed.<type> body, template ids
    outcome_key: str
    embedding_doc: dict[str, Any]  # embedding.requested body, template ids

    @functools.cached_property
    def request_doc(self) -> dict[str, Any]:
        """The template request as JSON (what eglo stores as input_payload, template id)."""
        return self.request.model_dump(mode="json")

    @property
    def execution(self) -> dict[str, Any]:
        """The execution metadata as eglo publishes it (the outcome event's `execution`)."""
        execution: dict[str, Any] = self.outcome_doc.get("execution") or {}
        return execution

    def to_json(self) -> dict[str, Any]:
        """For the ceilings' own processes (`python -m benchmarks.amqp_ceiling --fixtures`)."""
        return {
            "outcome_key": self.outcome_key,
            "outcome": self.outcome_doc,
            "embedding": self.embedding_doc,
            "request": self.request.model_dump(mode="json", exclude_none=True),
            "fingerprint": self.fingerprint,
            "result": self.result,
            "metadata": self.metadata.model_dump(mode="json"),
            "round_trip_ms": self.round_trip_ms,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Fixture:
        return cls(
            request=parse_request(doc["request"]),
            fingerprint=doc["fingerprint"],
            result=doc["result"],
            metadata=ExecutionMetadata.model_validate(doc["metadata"]),
            round_trip_ms=doc["round_trip_ms"],
            outcome_doc=doc["outcome"],
            outcome_key=doc["outcome_key"],
            embedding_doc=doc["embedding"],
        )


async def _answer(client: httpx.AsyncClient, request: AnyRequest) -> Fixture:
    body = build_predict_body(
        request, model_id="PRETRAINED_QNN_GRID_MODEL", mode="quantum", optimization_level=1
    )
    started = time.perf_counter()
    response = await client.post(PREDICT_PATH, json=body)
    round_trip_ms = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    raw, raw_meta = parse_predict_response(request.request_type, response.content)
    result, metadata = check_result(request, raw, raw_meta)
    # The very events eglo's records produce for this run (ids swapped later by the ceilings).
    fingerprint = request_fingerprint(request)
    record = RunRecord(
        request=request,
        fingerprint=fingerprint,
        status="completed",
        attempts=1,
        result=result,
        metadata=metadata,
    )
    outcome, embedding = record.events()
    return Fixture(
        request=request,
        fingerprint=fingerprint,
        result=result,
        metadata=metadata,
        round_trip_ms=round_trip_ms,
        outcome_doc=orjson.loads(outcome.body),
        outcome_key=outcome.routing_key,
        embedding_doc=orjson.loads(embedding.body),
    )


async def build_fixtures(
    bench: Bench, concurrency: int = 8
) -> tuple[list[Fixture], dict[str, float]]:
    """(one Fixture per template, emulator CPU ms per call by request type)."""
    templates = bench.workload.templates
    fixtures: list[Fixture | None] = [None] * len(templates)
    cpu_ms: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=bench.qnn_url, timeout=30) as client:
        # One warm-up call per type: first fits fill the emulator's caches.
        seen: set[str] = set()
        for t in templates:
            if t.request_type not in seen:
                seen.add(t.request_type)
                await _answer(client, t)
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                fixtures[i] = await _answer(client, templates[i])

        for request_type in sorted(seen):
            indices = [i for i, t in enumerate(templates) if t.request_type == request_type]

            before = process_cpu(bench.emulator_ps)
            await asyncio.gather(*(one(i) for i in indices))
            cpu_ms[request_type] = (process_cpu(bench.emulator_ps) - before) / len(indices) * 1000
    assert all(f is not None for f in fixtures)
    return [f for f in fixtures if f is not None], cpu_ms
