"""The words eglo's messages, metrics and docs share, each defined once."""

from __future__ import annotations

from typing import Final, Literal, get_args

RequestType = Literal["forecast", "storage", "grid_switch", "simulation"]
RunStatus = Literal["completed", "failed", "expired"]
Severity = Literal["low", "medium", "high", "critical"]
# Why a request was dead-lettered (`x-eglo-dead-letter-reason`, `eglo_dead_letters_total`).
DeadLetterReason = Literal[
    "invalid_json",
    "invalid_request",
    "unknown_request_type",
    "unsupported_schema_version",
    "unsupported_content_type",
    "unsupported_charset",
    "routing_key_mismatch",
    "body_too_large",
    "request_id_conflict",
    "retries_exhausted",
    # Failed with an unexpected error on every delivery up to the queue's delivery limit.
    "unexpected_error",
]
# Why the embedder dead-lettered an `embedding.requested` event (`eglo.embeddings.dlq`).
EmbedderDeadLetterReason = Literal["invalid_json", "invalid_event", "unembeddable", "run_not_found"]

REQUEST_TYPES: Final[tuple[RequestType, ...]] = get_args(RequestType)
RUN_STATUSES: Final[tuple[RunStatus, ...]] = get_args(RunStatus)
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
DEAD_LETTER_REASONS: Final[tuple[DeadLetterReason, ...]] = get_args(DeadLetterReason)
EMBEDDER_DEAD_LETTER_REASONS: Final[tuple[EmbedderDeadLetterReason, ...]] = get_args(
    EmbedderDeadLetterReason
)
