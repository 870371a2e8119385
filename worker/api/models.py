"""What the HTTP API answers (response bodies); requests are the AMQP contract's own models."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from contracts.vocabulary import RequestType, RunStatus


class Problem(BaseModel):
    """Every error: a stable machine-readable `reason` (for a refused request body, the same
    reason as its dead letter would carry), the broken rule's id when that is why, and a detail."""

    reason: str = Field(examples=["invalid_request", "unauthorized", "forbidden", "not_found"])
    rule: str | None = Field(default=None, description="e.g. storage.soc_bounds")
    detail: str
    request_id: str | None = None


class Accepted(BaseModel):
    """Published with a confirm; the run is not stored yet."""

    request_id: str
    request_type: RequestType
    status: Literal["accepted"] = "accepted"
    status_url: str


class Execution(BaseModel):
    model_id: str | None
    device_used: str | None
    circuit_depth: int | None
    n_qubits: int | None
    execution_time_ms: float | None
    quantum_cost_usd: float | None
    call_attempts: int
    round_trip_ms: float | None
    created_at: datetime


class AnomalyView(BaseModel):
    id: uuid.UUID
    source: str
    anomaly_type: str
    severity: str
    description: str | None
    details: dict[str, Any] | None
    suggested_actions: list[str] | None
    resolved: bool
    detected_at: datetime
    resolved_at: datetime | None
    request_id: str | None


class EventView(BaseModel):
    event_id: uuid.UUID
    routing_key: str
    created_at: datetime
    published_at: datetime | None


class RunSummary(BaseModel):
    run_id: uuid.UUID
    request_id: str
    request_type: RequestType
    region: str
    forecast_date: date
    status: RunStatus
    error_code: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime


class Run(RunSummary):
    request: dict[str, Any] = Field(description="The request as stored (the AMQP body).")
    result: dict[str, Any] | None
    error_message: str | None
    qnn_model_id: str | None
    qnn_execution_time: float | None = Field(description="Seconds, as the QNN reported it.")
    published_at: datetime | None
    execution: list[Execution]
    anomalies: list[AnomalyView]
    events: list[EventView] = Field(description="Events still in the outbox (it is pruned).")
    links: dict[str, str]


class PendingRun(BaseModel):
    """Accepted by this API, not stored by a worker yet (or dead-lettered: see /dead-letters)."""

    request_id: str
    request_type: RequestType
    status: Literal["pending"] = "pending"
    submitted_by: str
    submitted_at: datetime


class RunPage(BaseModel):
    items: list[RunSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class SimilarRunView(BaseModel):
    run_id: uuid.UUID
    request_id: str
    request_type: RequestType
    region: str
    forecast_date: date
    distance: float = Field(description="Cosine distance of the scenario embeddings.")
    result: dict[str, Any] | None


class DeadLetterView(BaseModel):
    message_id: str | None
    routing_key: str
    reason: str
    detail: str
    body_preview: str
    size: int
    dead_lettered_at: datetime | None = Field(
        default=None, description="When it was dead-lettered (UTC), when the message says."
    )


class ReplayCommand(BaseModel):
    model_config = {"extra": "forbid"}

    reason: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z_]+$", description="Only this reason."
    )
    limit: int = Field(default=100, ge=1, le=10_000)


class ReplayResult(BaseModel):
    replayed: int
    kept: int


class Resolved(BaseModel):
    anomaly_id: uuid.UUID
    source: str
    resolved: Literal[True] = True


class AccuracyRow(BaseModel):
    model_id: str
    region: str
    runs: int
    steps: int
    first_date: date
    last_date: date
    mape: float | None = Field(description="Percent.")
    p90_mape: float | None
    rmse: float | None = Field(description="MW.")
    mae: float | None
    r2: float | None
    coverage: float | None
    interval_level: float | None
    window_mape: float | None
    window_days: int | None
    unscorable: int


class Component(BaseModel):
    state: Literal["up", "down"]
    detail: str | None = None
    latency_ms: float | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "down"] = Field(
        description="down (503): broker or database unreachable; degraded: only the QNN."
    )
    broker: Component
    database: Component
    qnn: Component
