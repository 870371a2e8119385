"""The AMQP names other teams code against: exchanges, queues, routing keys and headers."""

from __future__ import annotations

REQUESTS_EXCHANGE = "eglo.requests"
REQUESTS_QUEUE = "eglo.requests"
DEAD_LETTER_EXCHANGE = "eglo.requests.dlx"
DEAD_LETTER_QUEUE = "eglo.requests.dlq"
EVENTS_EXCHANGE = "eglo.events"
# Poison messages that crash the process on every delivery stop looping after this many.
DELIVERY_LIMIT = 20

REASON_HEADER = "x-eglo-dead-letter-reason"
DETAIL_HEADER = "x-eglo-dead-letter-detail"
ORIGINAL_ROUTING_KEY_HEADER = "x-eglo-original-routing-key"
REPUBLISHED_AT_HEADER = "x-eglo-republished-at"
ATTEMPT_HEADER = "x-eglo-attempt"
REPLAYED_HEADER = "x-eglo-replayed"
# Which replay pass published a replayed copy (worker.dlq): a pass stops at its own copies.
REPLAY_PASS_HEADER = "x-eglo-replay-pass"
RULE_HEADER = "x-eglo-dead-letter-rule"
ORIGINAL_EXPIRATION_HEADER = "x-eglo-original-expiration"
ORIGINAL_USER_ID_HEADER = "x-eglo-original-user-id"

# AMQP's own timestamp property has whole-second resolution: too coarse for latency.
PUBLISHED_AT_HEADER = "x-eglo-published-at"


def request_routing_key(request_type: str) -> str:
    return f"request.{request_type}"


def delay_queue_name(delay_s: float) -> str:
    """A retry tier: a quorum queue (until issue 13, `eglo.requests.delay.<ms>ms`, classic)."""
    return f"eglo.requests.retry.{int(delay_s * 1000)}ms"


# The quorum delay tiers' arguments besides the TTL: expired messages go back onto eglo.requests
# through the default exchange, dead-lettered at-least-once (held until eglo.requests confirms
# them, which needs reject-publish overflow; RabbitMQ 3.10+).
DELAY_QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": REQUESTS_QUEUE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
