"""Events eglo emits on the `eglo.events` topic exchange (schema version 1).

Every event has a stable `event_id`: a relay that crashes between publishing and recording it
re-sends the same id, so consumers drop the rare duplicate by remembering ids.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.requests import RequestType
from contracts.results import ExecutionMetadata

RunStatus = Literal["completed", "failed", "expired"]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    schema_version: Literal[1] = 1
    event_id: uuid.UUID
    event_type: str = Field(description="Also the routing key, e.g. run.completed.forecast.")
    occurred_at: datetime
    run_id: uuid.UUID
    request_id: str
    request_type: RequestType


class RunOutcome(Event):
    """`run.completed.<type>`, `run.failed.<type>` or `run.expired.<type>`."""

    status: RunStatus
    region: str
    forecast_date: date
    attempts: int = Field(ge=1, description="Deliveries it took, delay-queue retries included.")
    result: dict[str, Any] | None = None
    execution: ExecutionMetadata | None = None
    error_code: str | None = None
    error_message: str | None = None


class EmbeddingRequested(Event):
    """`embedding.requested`: a completed run whose scenario should be embedded."""


Severity = Literal["low", "medium", "high", "critical"]


class AnomalyDetected(Event):
    """`anomaly.detected.<severity>`: something about a completed run an operator should see."""

    anomaly_id: uuid.UUID
    anomaly_type: str = Field(description="e.g. input_spike, forecast_outside_envelope.")
    severity: Severity
    description: str
    suggested_actions: list[str]
    details: dict[str, Any] = Field(default_factory=dict)
    region: str
    forecast_date: date


def anomaly_routing_key(severity: str) -> str:
    return f"anomaly.detected.{severity}"


def outcome_routing_key(status: RunStatus, request_type: str) -> str:
    return f"run.{status}.{request_type}"


EMBEDDING_REQUESTED = "embedding.requested"
