"""Pipeline: every Decision it can return, against in-memory fakes of the QNN and the run store.

The fake QNN answers with the emulator's real models (in-process), so a completed run carries a
result that the real checks accept. The end-to-end tests cover the same paths on the real broker,
database and emulator; these say which branch broke, in milliseconds.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import TypeAdapter

from contracts.requests import AnyRequest, OptimizationRequest
from contracts.topology import ATTEMPT_HEADER, REPLAYED_HEADER, request_routing_key
from producers.amqp_codec import Int64
from producers.sample import generate_requests
from qnn_emulator.predictors import predict
from worker.core.history import DatasetNotFound
from worker.core.records import Reply, RunRecord
from worker.observability.metrics import Metrics
from worker.runtime.pipeline import Ack, DeadLetter, Delay, Delivery, Pipeline
from worker.runtime.qnn import QnnAnswer, QnnRejected, QnnUnavailable
from worker.runtime.store import SaveResult, StoredRun
from worker.settings import Settings

ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(OptimizationRequest)
DOCS = generate_requests(8, seed=5)


def doc(kind: str = "forecast", **changes: Any) -> dict[str, Any]:
    found = copy.deepcopy(next(d for d in DOCS if d["request_type"] == kind))
    found.update(changes)
    return found


def delivery(document: dict[str, Any], **fields: Any) -> Delivery:
    return Delivery(
        body=orjson.dumps(document),
        content_type="application/json",
        routing_key=request_routing_key(document["request_type"]),
        **fields,
    )


@dataclass
class FakeQnn:
    """Answers with the emulator's model, or raises what `fail` says."""

    fail: Exception | None = None
    result: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r
    calls: int = 0

    async def predict(self, request: AnyRequest) -> QnnAnswer:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        answer = dict(predict(request.payload).result)
        return QnnAnswer(self.result(answer), {"model_id": "fake"}, 1, 12.0)


@dataclass
class FakeRuns:
    """Runs by request_id, as the store's unique index keeps them."""

    runs: dict[str, RunRecord] = field(default_factory=dict)
    down_for: int = 0  # the next N calls fail as a refused database connection would
    twin_on_save: RunRecord | None = None  # another worker stores this just before our save

    def _maybe_down(self) -> None:
        if self.down_for:
            self.down_for -= 1
            raise OSError(111, "Connect call failed")

    async def find(self, request_id: str) -> StoredRun | None:
        self._maybe_down()
        run = self.runs.get(request_id)
        return None if run is None else StoredRun(str(run.run_id), run.fingerprint, run.status)

    async def save(self, record: RunRecord) -> SaveResult:
        self._maybe_down()
        if self.twin_on_save is not None:
            self.runs[record.request.request_id] = self.twin_on_save
            self.twin_on_save = None
        stored = self.runs.get(record.request.request_id)
        if stored is not None and not record.replaces_failed:
            same = stored.fingerprint == record.fingerprint
            return SaveResult.DUPLICATE if same else SaveResult.CONFLICT
        self.runs[record.request.request_id] = record
        return SaveResult.INSERTED

    async def outcome_reply(self, stored: StoredRun) -> Reply:
        body = orjson.dumps({"run_id": stored.run_id, "status": stored.status})
        return Reply(uuid.UUID(stored.run_id), f"run.{stored.status}.forecast", body)


def pipeline(qnn: FakeQnn, runs: FakeRuns, **settings: Any) -> Pipeline:
    values: dict[str, Any] = {"retry_delays_s": [0.1, 0.5], **settings}
    return Pipeline(Settings(**values), qnn, runs, Metrics())


async def test_a_valid_request_completes_and_is_stored_once() -> None:
    qnn, runs = FakeQnn(), FakeRuns()
    document = doc("storage")
    decision = await pipeline(qnn, runs).handle(delivery(document))
    assert decision == Ack("completed")
    stored = runs.runs[document["request_id"]]
    assert stored.status == "completed" and stored.result is not None
    assert qnn.calls == 1


async def test_bad_input_is_dead_lettered_with_its_reason_and_never_reaches_the_qnn() -> None:
    qnn, runs = FakeQnn(), FakeRuns()
    decision = await pipeline(qnn, runs).handle(
        Delivery(b"{not json", "application/json", reply_to="amq.rabbitmq.reply-to")
    )
    assert isinstance(decision, DeadLetter)
    assert decision.reason == "invalid_json"
    assert decision.reply is not None  # the RPC caller hears of it
    assert qnn.calls == 0 and runs.runs == {}


async def test_the_same_request_again_is_a_duplicate_without_a_second_call() -> None:
    qnn, runs = FakeQnn(), FakeRuns()
    pipe = pipeline(qnn, runs)
    document = doc()
    await pipe.handle(delivery(document))
    again = await pipe.handle(delivery(document, reply_to="amq.rabbitmq.reply-to"))
    assert isinstance(again, Ack) and again.outcome == "duplicate"
    assert again.reply is not None and orjson.loads(again.reply.body)["status"] == "completed"
    assert qnn.calls == 1


async def test_a_reused_request_id_with_another_payload_is_a_conflict() -> None:
    runs = FakeRuns()
    pipe = pipeline(FakeQnn(), runs)
    document = doc()
    await pipe.handle(delivery(document))
    other = doc("grid_switch", request_id=document["request_id"])
    decision = await pipe.handle(delivery(other))
    assert isinstance(decision, DeadLetter) and decision.reason == "request_id_conflict"


async def test_a_twin_stored_meanwhile_makes_this_delivery_a_duplicate() -> None:
    document = doc()
    twin_pipe = pipeline(FakeQnn(), twin_runs := FakeRuns())
    await twin_pipe.handle(delivery(document))
    runs = FakeRuns(twin_on_save=twin_runs.runs[document["request_id"]])
    decision = await pipeline(FakeQnn(), runs).handle(delivery(document))
    assert decision == Ack("duplicate")


async def test_a_passed_deadline_is_stored_as_expired_without_calling() -> None:
    qnn, runs = FakeQnn(), FakeRuns()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    document = doc(deadline=past)
    decision = await pipeline(qnn, runs).handle(delivery(document))
    assert decision == Ack("expired")
    assert runs.runs[document["request_id"]].error_code == "deadline_passed"
    assert qnn.calls == 0


async def test_a_rejecting_qnn_fails_the_run_for_good() -> None:
    runs = FakeRuns()
    document = doc()
    decision = await pipeline(FakeQnn(fail=QnnRejected("422 bad shape")), runs).handle(
        delivery(document)
    )
    assert decision == Ack("failed")
    assert runs.runs[document["request_id"]].error_code == "qnn_rejected"


@pytest.mark.parametrize(("attempt", "delay_s"), [(0, 0.1), (1, 0.5)])
async def test_an_unavailable_qnn_delays_through_the_tiers(attempt: int, delay_s: float) -> None:
    runs = FakeRuns()
    headers = {ATTEMPT_HEADER: Int64(attempt)} if attempt else {}
    decision = await pipeline(FakeQnn(fail=QnnUnavailable("503")), runs).handle(
        delivery(doc(), headers=headers)
    )
    assert decision == Delay(attempt + 1, delay_s, "qnn_unavailable")
    assert runs.runs == {}  # nothing stored while a later attempt may still succeed


async def test_an_unavailable_qnn_past_the_tiers_stores_failed_and_keeps_the_message() -> None:
    runs = FakeRuns()
    document = doc()
    decision = await pipeline(FakeQnn(fail=QnnUnavailable("503")), runs).handle(
        delivery(document, headers={ATTEMPT_HEADER: 2})
    )
    assert isinstance(decision, DeadLetter) and decision.reason == "retries_exhausted"
    assert runs.runs[document["request_id"]].status == "failed"


async def test_a_replayed_failed_request_runs_again_in_place() -> None:
    runs = FakeRuns()
    document = doc()
    await pipeline(FakeQnn(fail=QnnRejected("nope")), runs).handle(delivery(document))
    failed = runs.runs[document["request_id"]]
    decision = await pipeline(FakeQnn(), runs).handle(
        delivery(document, headers={REPLAYED_HEADER: True})
    )
    assert decision == Ack("completed")
    rerun = runs.runs[document["request_id"]]
    assert rerun.replaces_failed and rerun.run_id == failed.run_id


async def test_a_result_that_breaks_the_hard_limits_fails_the_run() -> None:
    def negative(result: dict[str, Any]) -> dict[str, Any]:
        forecast = result.get("forecast") or result.get("predictions")
        assert isinstance(forecast, list)
        return {**result, "forecast": [-1e9 for _ in forecast]}

    runs = FakeRuns()
    document = doc()
    decision = await pipeline(FakeQnn(result=negative), runs).handle(delivery(document))
    assert decision == Ack("failed")
    assert runs.runs[document["request_id"]].error_code == "qnn_invalid_result"


async def test_a_missing_dataset_fails_the_run_naming_the_days() -> None:
    document = doc()
    payload = document["payload"]
    del payload["historical_loads"]
    payload["dataset_ref"] = {
        "region": "North",
        "start_date": "2025-06-01",
        "end_date": "2025-06-02",
    }

    async def no_days(request: AnyRequest) -> AnyRequest:
        ref = request.payload.dataset_ref  # type: ignore[union-attr]
        assert ref is not None
        raise DatasetNotFound(ref, [date(2025, 6, 1), date(2025, 6, 2)])

    runs, qnn = FakeRuns(), FakeQnn()
    pipe = Pipeline(Settings(), qnn, runs, Metrics(), datasets=no_days)
    decision = await pipe.handle(delivery(document))
    assert decision == Ack("failed")
    stored = runs.runs[document["request_id"]]
    assert stored.error_code == "dataset_not_found"
    assert "2025-06-01..2025-06-02" in (stored.error_message or "")
    assert qnn.calls == 0


async def test_a_database_that_refuses_is_waited_out_not_blamed_on_the_message() -> None:
    runs = FakeRuns(down_for=2)
    document = doc()
    decision = await pipeline(FakeQnn(), runs).handle(delivery(document))
    assert decision == Ack("completed")
    assert document["request_id"] in runs.runs


async def test_a_database_error_that_is_the_requests_is_not_retried() -> None:
    class Broken(FakeRuns):
        async def save(self, record: RunRecord) -> SaveResult:
            raise asyncpg.DataError("value out of range")

    with pytest.raises(asyncpg.DataError):
        await pipeline(FakeQnn(), Broken()).handle(delivery(doc()))
