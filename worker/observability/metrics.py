"""Prometheus metrics: one registry per process, created at start and passed down."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets span a fast emulator call (ms) to a slow quantum job (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OUTCOMES = ("completed", "failed", "expired", "duplicate", "dead_lettered", "delayed")
REQUEST_TYPES = ("forecast", "storage", "grid_switch", "simulation", "unknown")
# Where one request's time goes, in order (eglo_request_stage_duration_seconds{stage}).
STAGES = (
    "queue_wait",  # the producer's published-at header to the worker starting on the delivery
    "announce_wait",  # held while this worker's committed runs wait for their events' confirms
    "intake",  # parse, validate, duplicate lookup, dataset: up to the QNN call
    "qnn",  # the QNN call, retries included
    "commit_wait",  # handed to the group commit until its transaction starts
    "commit",  # its transaction (the whole batch's)
    "relay_wait",  # the commit until its outcome event gets a slot in the confirm window
    "publish_confirm",  # the outcome event's publish until the broker's confirm
)
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)


class Metrics:
    """Every metric eglo exports, prefixed `eglo_`, in base units."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "eglo_messages",
            "Request messages handled, by request type and outcome.",
            ["request_type", "outcome"],
            registry=r,
        )
        self.settle_fallbacks = Counter(
            "eglo_settle_fallbacks",
            "Deliveries whose dead-letter or delay copy could not be published: rejected into the "
            "queue's broker-level dead-letter exchange instead.",
            ["decision"],
            registry=r,
        )
        self.unsettled = Gauge(
            "eglo_unsettled_deliveries",
            "Deliveries that could be neither acked nor rejected on a channel still open; "
            "/readyz fails while this is above 0.",
            registry=r,
        )
        self.replies = Counter(
            "eglo_replies",
            "Replies sent to a request's reply_to by the consumer (dead letters, duplicates).",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "eglo_dead_letters",
            "Messages sent to the dead-letter queue, by reason.",
            ["reason"],
            registry=r,
        )
        self.processing = Histogram(
            "eglo_processing_duration_seconds",
            "From delivery to commit, by request type and outcome.",
            ["request_type", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "eglo_end_to_end_duration_seconds",
            "From the producer's AMQP timestamp to commit (needs producer clocks in sync).",
            ["request_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.qnn_duration = Histogram(
            "eglo_qnn_request_duration_seconds",
            "One HTTP call to the QNN, by status.",
            ["status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.qnn_retries = Counter(
            "eglo_qnn_retries",
            "QNN calls retried in-process, by reason.",
            ["reason"],
            registry=r,
        )
        self.qnn_cost = Counter(
            "eglo_qnn_cost_usd",
            "QNN cost reported for completed runs.",
            ["model_id"],
            registry=r,
        )
        self.in_flight = Gauge(
            "eglo_in_flight_messages", "Deliveries being processed now.", registry=r
        )
        self.prefetch = Gauge("eglo_prefetch_messages", "Configured prefetch.", registry=r)
        self.outbox_backlog = Gauge(
            "eglo_outbox_backlog_events",
            "Outbox events not yet confirmed by the broker.",
            registry=r,
        )
        self.events_published = Counter(
            "eglo_events_published",
            "Events relayed from the outbox and confirmed.",
            ["event_type"],
            registry=r,
        )
        self.db_write = Histogram(
            "eglo_db_write_duration_seconds",
            "One batch transaction of run writes.",
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.db_batch_size = Histogram(
            "eglo_db_batch_size_runs",
            "Runs committed per transaction.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.db_errors = Counter(
            "eglo_db_errors",
            "Database operations that failed and were retried.",
            ["operation"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "eglo_qnn_circuit_state",
            "QNN circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.queue_messages = Gauge(
            "eglo_queue_messages",
            "Messages ready in eglo's queues, as the broker reports them.",
            ["queue"],
            registry=r,
        )
        self.anomalies = Counter(
            "eglo_anomalies_detected",
            "Anomalies detected in completed runs.",
            ["severity", "anomaly_type"],
            registry=r,
        )
        self.embeddings = Counter(
            "eglo_embeddings_stored",
            "Scenario embeddings stored, by embedding model.",
            ["model"],
            registry=r,
        )
        self.forecast_mape = Gauge(
            "eglo_forecast_mape_percent",
            "Rolling MAPE of scored forecasts, per model and region (bounded set).",
            ["model_id", "region"],
            registry=r,
        )
        # Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        for request_type in REQUEST_TYPES:
            for outcome in OUTCOMES:
                self.messages.labels(request_type=request_type, outcome=outcome)
        self.unexpected_errors = Counter(
            "eglo_unexpected_errors",
            "Deliveries whose handling raised an unexpected exception (request.unexpected_error): "
            "requeued, each one spending one of the message's x-delivery-limit deliveries.",
            registry=r,
        )
        self.ready = Gauge(
            "eglo_ready",
            "1 while /readyz answers 200, 0 while it answers 503; evaluated at each scrape.",
            registry=r,
        )
        # A labelled counter's first increment is invisible to increase() unless the series
        # existed before it: alerts on these must see the very first one.
        for operation in ("write_runs", "outbox_relay", "retry", "embed_batch"):
            self.db_errors.labels(operation=operation)
        for decision in ("dead_letter", "delay"):
            self.settle_fallbacks.labels(decision=decision)
        self.db_gate_open = Gauge(
            "eglo_db_gate_open",
            "1 while the database can take the work (reachable, schema current, privileges "
            "held); 0 while consumption is paused for it.",
            registry=r,
        )
        self.broker_connected = Gauge(
            "eglo_broker_connected",
            "1 while the broker connection and its channels are up; 0 while down or reconnecting.",
            registry=r,
        )
        self.http_peer_failures = Counter(
            "eglo_http_peer_failures",
            "HTTP calls that got no usable reply, by peer (qnn, embeddings, monitoring) and "
            "reason: timeout, deadline (the whole call), too_large (body over its limit), "
            "bad_encoding, transport:<error>.",
            ["peer", "reason"],
            registry=r,
        )
        self.stage = Histogram(
            "eglo_request_stage_duration_seconds",
            "Where a request's time goes, by stage: queue_wait (published-at header to the "
            "worker starting on it), intake (to the QNN call), qnn, commit_wait (for the group "
            "commit), commit, relay_wait (commit to a confirm-window slot), publish_confirm (the "
            "outcome event's publish to its confirm).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        # Resolved once: observed several times per request.
        self.stages = {name: self.stage.labels(stage=name) for name in STAGES}
        self.qnn_concurrency_limit = Gauge(
            "eglo_qnn_concurrency_limit",
            "QNN calls allowed in flight at once now (adapted to the QNN's 429s).",
            registry=r,
        )
