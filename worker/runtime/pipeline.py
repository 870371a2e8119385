"""What to do with one delivery: validate, deduplicate, call the QNN, store the outcome.

Returns a Decision; the consumer alone turns decisions into acks, dead letters and delays, so the
rule "ack only after commit" lives in one place.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import stamina
import structlog
from opentelemetry import trace

from contracts.requests import AnyRequest, ForecastRequest, request_fingerprint
from contracts.results import ExecutionMetadata
from contracts.topology import ATTEMPT_HEADER, PUBLISHED_AT_HEADER, REPLAYED_HEADER
from contracts.vocabulary import DeadLetterReason
from worker.core.anomalies import OP_WINDOW, Anomaly, detect_run_anomalies
from worker.core.history import DatasetError, dataset_ref_of
from worker.core.intake import Rejection, identify, parse_request
from worker.core.records import Reply, RunRecord, dead_letter_reply
from worker.core.result_checks import InvalidResult, check_result
from worker.observability import tracing
from worker.observability.metrics import Metrics
from worker.runtime.gates import DatabaseGate, is_systemic
from worker.runtime.qnn import QnnAnswer, QnnRejected, QnnUnavailable
from worker.runtime.store import SaveResult, StoredRun
from worker.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery:
    """The parts of an AMQP delivery the pipeline looks at (no aio-pika types, for testing)."""

    body: bytes
    content_type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    # The key the producer published with (a delay tier's copy carries it in a header).
    routing_key: str | None = None

    @property
    def replayed(self) -> bool:
        """Re-injected from the DLQ by an operator (`eglo dlq replay`)."""
        return bool(self.headers.get(REPLAYED_HEADER))

    @property
    def attempt(self) -> int:
        """Delay-queue round trips so far (0 on first delivery)."""
        value = self.headers.get(ATTEMPT_HEADER, 0)
        return value if isinstance(value, int) and value >= 0 else 0


@dataclass(frozen=True, slots=True)
class Ack:
    outcome: str  # completed | failed | expired | duplicate
    # Sent to reply_to before the ack; a stored run's reply leaves through the outbox instead.
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: DeadLetterReason
    detail: str
    rule: str | None = None
    reply: Reply | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    attempt: int
    delay_s: float
    reason: str


Decision = Ack | DeadLetter | Delay


class Predictor(Protocol):
    """What the pipeline needs of the QNN (runtime/qnn.py's QnnClient)."""

    async def predict(self, request: AnyRequest) -> QnnAnswer: ...


class Runs(Protocol):
    """What the pipeline needs of the run store (runtime/store.py's RunStore)."""

    async def find(self, request_id: str) -> StoredRun | None: ...

    async def save(self, record: RunRecord) -> SaveResult: ...

    async def outcome_reply(self, stored: StoredRun) -> Reply: ...



@dataclass(slots=True)
class _Run:
    """One request on its way through the steps, and how its record is made."""

    request: AnyRequest
    fingerprint: str
    delivery: Delivery
    rerun: dict[str, Any] = field(default_factory=dict)

    def record(self, **fields: Any) -> RunRecord:
        delivery = self.delivery
        return RunRecord(
            request=self.request,
            fingerprint=self.fingerprint,
            attempts=delivery.attempt + 1,
            published_at=delivery.timestamp,
            reply_to=delivery.reply_to,
            correlation_id=delivery.correlation_id,
            trace_headers=tracing.inject(),
            **self.rerun,
            **fields,
        )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        qnn: Predictor,
        store: Runs,
        metrics: Metrics,
        datasets: Callable[[AnyRequest], Awaitable[AnyRequest]] | None = None,
        on_forecast: Callable[[ForecastRequest], None] | None = None,
        db_gate: DatabaseGate | None = None,
        room: Callable[[], Awaitable[float]] | None = None,
    ) -> None:
        """`datasets` turns a request's dataset_ref into inline history (from energy_datasets).
        `db_gate` is told of systemic database failures, and waited on before retrying them.
        `room` holds a request while announcing trails committing (the outbox relay's)."""
        self._settings = settings
        self._qnn = qnn
        self._store = store
        self._metrics = metrics
        self._baselines = OperationalBaselines()
        self._datasets = datasets
        self._on_forecast = on_forecast
        self._db_gate = db_gate
        self._room = room

    async def handle(self, delivery: Delivery) -> Decision:
        started = time.perf_counter()
        # The producer's millisecond header only: AMQP's whole-second timestamp is too coarse.
        published = delivery.timestamp
        if delivery.attempt == 0 and PUBLISHED_AT_HEADER in delivery.headers and published:
            waited = (datetime.now(UTC) - published).total_seconds()
            self._metrics.stages["queue_wait"].observe(max(waited, 0.0))
        parsed = parse_request(
            delivery.body,
            delivery.content_type,
            max_bytes=self._settings.max_body_bytes,
            routing_key=delivery.routing_key,
        )
        if isinstance(parsed, Rejection):
            log.warning(
                "request.rejected", reason=parsed.reason, detail=parsed.detail, rule=parsed.rule
            )
            decision: Decision = _dead_letter(delivery, parsed.reason, parsed.detail, parsed.rule)
            request_type = "unknown"  # nothing about an unparseable message can be trusted
        else:
            structlog.contextvars.bind_contextvars(
                request_id=parsed.request_id, request_type=parsed.request_type
            )
            span = trace.get_current_span()
            span.set_attribute("eglo.request_id", parsed.request_id)
            span.set_attribute("eglo.request_type", parsed.request_type)
            decision = await self._process(parsed, delivery, started)
            request_type = parsed.request_type
        outcome = _outcome(decision)
        self._metrics.messages.labels(request_type=request_type, outcome=outcome).inc()
        self._metrics.processing.labels(request_type=request_type, outcome=outcome).observe(
            time.perf_counter() - started
        )
        if delivery.timestamp is not None and isinstance(decision, Ack):
            lag = (datetime.now(UTC) - delivery.timestamp).total_seconds()
            self._metrics.end_to_end.labels(request_type=request_type).observe(max(lag, 0))
        return decision

    async def _process(self, request: AnyRequest, delivery: Delivery, started: float) -> Decision:
        """dedupe -> deadline -> resolve -> call -> check -> detect -> save; each step either
        hands on or ends with the Decision."""
        if self._room is not None:
            held = await self._room()
            self._metrics.stages["announce_wait"].observe(held)
            started += held  # intake is timed from the end of the hold
        run = _Run(request, request_fingerprint(request), delivery)
        for step in (self._dedupe, self._deadline, self._resolve):
            if (decision := await step(run)) is not None:
                return decision
        calling = time.perf_counter()
        self._metrics.stages["intake"].observe(calling - started)
        answer = await self._call(run)
        if not isinstance(answer, QnnAnswer):
            return answer
        self._metrics.stages["qnn"].observe(time.perf_counter() - calling)
        try:
            result, metadata = check_result(run.request, answer.result, answer.metadata)
        except InvalidResult as exc:
            log.warning("qnn.result.invalid", error=str(exc))
            return await self._save(
                run.record(
                    status="failed",
                    error_code="qnn_invalid_result",
                    error_message=str(exc),
                    call_attempts=answer.call_attempts,
                    round_trip_ms=answer.round_trip_ms,
                ),
                delivery,
            )
        anomalies = self._baselines.detect(
            run.request, result, answer.round_trip_ms, metadata.cost_usd
        )
        decision = await self._save(
            run.record(
                status="completed",
                result=result,
                metadata=metadata,
                call_attempts=answer.call_attempts,
                round_trip_ms=answer.round_trip_ms,
                anomalies=tuple(anomalies),
            ),
            delivery,
        )
        if isinstance(decision, Ack) and decision.outcome == "completed":
            self._after_commit(run.request, metadata, anomalies)
        return decision

    async def _dedupe(self, run: _Run) -> Decision | None:
        """A stored request is a duplicate or a conflict, unless it is an operator's replay of a
        failed run (say, after a long QNN outage), which re-runs it in place."""
        stored = await self._with_db_retry(self._store.find, run.request.request_id)
        if stored is None:
            return None
        if (
            run.delivery.replayed
            and stored.status == "failed"
            and stored.fingerprint == run.fingerprint
        ):
            run.rerun = {"run_id": uuid.UUID(stored.run_id), "replaces_failed": True}
            return None
        return await self._already_stored(stored, run.fingerprint, run.delivery)

    async def _deadline(self, run: _Run) -> Decision | None:
        deadline = run.request.deadline
        if deadline is None or deadline > datetime.now(UTC):
            return None
        return await self._save(
            run.record(
                status="expired",
                error_code="deadline_passed",
                error_message=f"deadline {deadline.isoformat()} had passed",
            ),
            run.delivery,
        )

    async def _resolve(self, run: _Run) -> Decision | None:
        """A dataset_ref's stored days become the request's history."""
        if self._datasets is None or dataset_ref_of(run.request) is None:
            return None
        try:
            run.request = await self._with_db_retry(self._datasets, run.request)
        except DatasetError as exc:
            return await self._save(
                run.record(status="failed", error_code="dataset_not_found", error_message=str(exc)),
                run.delivery,
            )
        return None

    async def _call(self, run: _Run) -> QnnAnswer | Decision:
        """The QNN's answer; a rejection fails the run, unavailability delays it through the
        tiers and then fails it, keeping the message for replay."""
        delivery = run.delivery
        try:
            return await self._qnn.predict(run.request)
        except QnnRejected as exc:
            return await self._save(
                run.record(status="failed", error_code=exc.code, error_message=str(exc)), delivery
            )
        except QnnUnavailable as exc:
            tiers = self._settings.retry_delays_s
            if delivery.attempt < len(tiers):
                log.info(
                    "request.delayed",
                    attempt=delivery.attempt + 1,
                    delay_s=tiers[delivery.attempt],
                    error=str(exc),
                )
                return Delay(delivery.attempt + 1, tiers[delivery.attempt], exc.code)
            decision = await self._save(
                run.record(status="failed", error_code=exc.code, error_message=str(exc)), delivery
            )
            # Stored as failed (and announced) above; the message itself is kept for replay.
            return (
                DeadLetter("retries_exhausted", str(exc)) if isinstance(decision, Ack) else decision
            )

    def _after_commit(
        self, request: AnyRequest, metadata: ExecutionMetadata, anomalies: list[Anomaly]
    ) -> None:
        """What a completed run's commit sets off in this process: cost and anomaly counters,
        and the forecast scorer's note."""
        if metadata.cost_usd:
            self._metrics.qnn_cost.labels(model_id=metadata.model_id or "unknown").inc(
                metadata.cost_usd
            )
        if self._on_forecast is not None and isinstance(request, ForecastRequest):
            self._on_forecast(request)
        for anomaly in anomalies:
            self._metrics.anomalies.labels(
                severity=anomaly.severity, anomaly_type=anomaly.anomaly_type
            ).inc()

    async def _save(self, record: RunRecord, delivery: Delivery) -> Decision:
        with tracing.span(
            "db save run",
            kind=tracing.SpanKind.CLIENT,
            attributes={
                "db.system": "postgresql",
                "eglo.run_id": str(record.run_id),
                "eglo.run.status": record.status,
            },
        ):
            result = await self._with_db_retry(self._store.save, record)
        if result is SaveResult.INSERTED:
            log.debug("run.stored", run_id=str(record.run_id), status=record.status)
            return Ack(record.status)
        # A twin was stored meanwhile (another worker, or the same batch).
        stored = await self._with_db_retry(self._store.find, record.request.request_id)
        assert stored is not None, "a conflicting save means a stored run"
        return await self._already_stored(stored, record.fingerprint, delivery)

    async def _already_stored(
        self, stored: StoredRun, fingerprint: str, delivery: Delivery
    ) -> Decision:
        """A duplicate is acked and answered with the stored run's outcome; a reused request_id
        with another payload is dead-lettered."""
        if stored.fingerprint == fingerprint:
            log.info("request.duplicate", run_id=stored.run_id)
            reply = None
            if delivery.reply_to:
                reply = await self._with_db_retry(self._store.outcome_reply, stored)
            return Ack("duplicate", reply)
        return _dead_letter(
            delivery,
            "request_id_conflict",
            "request_id was already used for a different request",
            None,
        )

    async def _with_db_retry(self, op: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Wait out a failure that is not the message's (database unreachable, table missing,
        privilege revoked): the message stays unacked meanwhile and spends no delivery, the gate
        pauses consumption, and the operation is retried once the gate reopens."""
        try:
            # The retry machinery costs more than the call itself; enter it only when needed.
            return await op(*args)
        except Exception as exc:
            if not self._db_systemic(exc):
                raise
        async for attempt in stamina.retry_context(
            on=self._db_systemic, attempts=None, timeout=None, wait_initial=0.2, wait_max=5.0
        ):
            with attempt:
                if self._db_gate is not None:
                    await self._db_gate.wait_open()
                return await op(*args)
        raise AssertionError("unreachable")

    def _db_systemic(self, exc: Exception) -> bool:
        if is_systemic(exc):
            self._metrics.db_errors.labels(operation="retry").inc()
            log.warning("db.unavailable", error=repr(exc)[:200])
            if self._db_gate is not None:
                self._db_gate.report(exc)
            return True
        return False


class OperationalBaselines:
    """Recent QNN latency and cost per request type, the yardstick for operational anomalies.

    Per process and per type: cost grows with problem size, so only like is compared with like.
    """

    def __init__(self, window: int = OP_WINDOW) -> None:
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._cost: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def detect(
        self, request: AnyRequest, result: dict[str, Any], latency_ms: float, cost_usd: float | None
    ) -> list[Anomaly]:
        latencies, costs = self._latency[request.request_type], self._cost[request.request_type]
        found = detect_run_anomalies(
            request,
            result,
            latency_ms=latency_ms,
            recent_latency_ms=tuple(latencies),
            cost_usd=cost_usd,
            recent_cost_usd=tuple(costs),
        )
        latencies.append(latency_ms)
        if cost_usd is not None:
            costs.append(cost_usd)
        return found


def _dead_letter(
    delivery: Delivery, reason: DeadLetterReason, detail: str, rule: str | None
) -> DeadLetter:
    reply = None
    if delivery.reply_to:
        request_id, request_type = identify(delivery.body)
        reply = dead_letter_reply(
            delivery.body,
            reason=reason,
            detail=detail,
            rule=rule,
            request_id=request_id,
            request_type=request_type,
        )
    return DeadLetter(reason, detail, rule, reply)


def unexpected_failure(delivery: Delivery, exc: BaseException, deliveries: int) -> DeadLetter:
    """The dead letter for a message that failed with an unexpected error on every one of its
    deliveries: the queue's limit would dead-letter it anyway, but without a reason."""
    return _dead_letter(
        delivery,
        "unexpected_error",
        f"failed on {deliveries} deliveries, last with {type(exc).__name__}: {exc}"[:1000],
        None,
    )


def _outcome(decision: Decision) -> str:
    if isinstance(decision, Ack):
        return decision.outcome
    return "dead_lettered" if isinstance(decision, DeadLetter) else "delayed"
