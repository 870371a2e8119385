"""Events eglo emits on the `eglo.events` topic exchange (schema version 1).

Every event has a stable `event_id`: a relay that crashes between publishing and recording it
re-sends the same id, so consumers drop the rare duplicate by remembering ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from contracts.results import ExecutionMetadata
from contracts.vocabulary import DEAD_LETTER_REASONS, DeadLetterReason, RequestType
from contracts.vocabulary import RunStatus as RunStatus
from contracts.vocabulary import Severity as Severity
from contracts.wire import Integer, SchemaVersion, WireDate, WireDateTime, WireUUID


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    schema_version: SchemaVersion = 1
    event_id: WireUUID = Field(description="Also the AMQP message_id; deduplicate on it.")
    event_type: str = Field(
        description="Also the AMQP type property and, on eglo.events, the routing key."
    )
    occurred_at: WireDateTime


class Event(_Message):
    run_id: WireUUID
    request_id: str
    request_type: RequestType


class RunOutcome(Event):
    """`run.completed.<type>`, `run.failed.<type>` or `run.expired.<type>`."""

    status: RunStatus
    region: str
    forecast_date: WireDate
    attempts: Integer = Field(ge=1, description="Deliveries it took, delay-queue retries included.")
    result: dict[str, Any] | None = None
    execution: ExecutionMetadata | None = None
    error_code: str | None = None
    error_message: str | None = None


class EmbeddingRequested(Event):
    """`embedding.requested`: a completed run whose scenario should be embedded."""


class AnomalyDetected(Event):
    """`anomaly.detected.<severity>`: something about a completed run an operator should see."""

    anomaly_id: WireUUID
    anomaly_type: str = Field(description="e.g. input_spike, forecast_outside_envelope.")
    severity: Severity
    description: str
    suggested_actions: list[str]
    details: dict[str, Any] = Field(default_factory=dict)
    region: str
    forecast_date: WireDate


REQUEST_DEAD_LETTERED: Final = "request.dead_lettered"


class RequestDeadLettered(_Message):
    """The reply to a request with `reply_to` that was dead-lettered instead of becoming a run."""

    event_type: Literal["request.dead_lettered"] = "request.dead_lettered"
    request_id: str | None = Field(
        default=None, description="The body's request_id, when it had a readable one."
    )
    request_type: RequestType | None = None
    # A string with examples, not an enum: generated Go maps an unknown enum value to the first
    # member, and this list grows.
    reason: Annotated[
        DeadLetterReason,
        WithJsonSchema(
            {
                "type": "string",
                "examples": list(DEAD_LETTER_REASONS),
                "description": "As in x-eglo-dead-letter-reason; new reasons may be added.",
            }
        ),
    ]
    rule: str | None = Field(
        default=None, description="The broken rule's id (request.rules.v1.json), if that is why."
    )
    detail: str


def anomaly_routing_key(severity: str) -> str:
    return f"anomaly.detected.{severity}"


def outcome_routing_key(status: RunStatus, request_type: str) -> str:
    return f"run.{status}.{request_type}"


EMBEDDING_REQUESTED = "embedding.requested"
