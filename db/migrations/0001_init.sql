-- eglo schema v1: the data model's five tables plus what correctness needs.
-- Additive and idempotent: safe to re-run, applied under an advisory lock by `eglo migrate`.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS optimization_runs (
    id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id         TEXT NOT NULL,
    request_type       TEXT NOT NULL
        CHECK (request_type IN ('forecast', 'storage', 'grid_switch', 'simulation')),
    region             TEXT NOT NULL,
    forecast_date      DATE NOT NULL,
    input_payload      JSONB NOT NULL,
    request_fingerprint TEXT NOT NULL,
    result_payload     JSONB,
    status             TEXT NOT NULL DEFAULT 'completed'
        CHECK (status IN ('completed', 'failed', 'expired')),
    error_code         TEXT,
    error_message      TEXT,
    qnn_model_id       TEXT,
    qnn_execution_time DOUBLE PRECISION,  -- seconds, as reported by the QNN
    attempts           INT NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    published_at       TIMESTAMPTZ,       -- from the AMQP timestamp, when the producer set one
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT optimization_runs_request_id_key UNIQUE (request_id),
    CONSTRAINT optimization_runs_result_when_completed
        CHECK (status <> 'completed' OR result_payload IS NOT NULL),
    CONSTRAINT optimization_runs_error_when_failed
        CHECK (status <> 'failed' OR error_code IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS optimization_runs_created_at_brin
    ON optimization_runs USING brin (created_at);
CREATE INDEX IF NOT EXISTS optimization_runs_type_region_date
    ON optimization_runs (request_type, region, forecast_date);
CREATE INDEX IF NOT EXISTS optimization_runs_not_completed
    ON optimization_runs (status, created_at) WHERE status <> 'completed';

CREATE TABLE IF NOT EXISTS qnn_execution_metrics (
    id                  UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    optimization_run_id UUID NOT NULL REFERENCES optimization_runs(id) ON DELETE CASCADE,
    model_id            TEXT,
    device_used         TEXT,
    circuit_depth       INT CHECK (circuit_depth >= 0),
    n_qubits            INT CHECK (n_qubits >= 0),
    execution_time_ms   DOUBLE PRECISION CHECK (execution_time_ms >= 0),
    quantum_cost_usd    DOUBLE PRECISION CHECK (quantum_cost_usd >= 0),
    call_attempts       INT NOT NULL DEFAULT 1,   -- HTTP tries it took, retries included
    round_trip_ms       DOUBLE PRECISION,         -- measured by eglo, not reported by the QNN
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS qnn_execution_metrics_run
    ON qnn_execution_metrics (optimization_run_id);
CREATE INDEX IF NOT EXISTS qnn_execution_metrics_created_at_brin
    ON qnn_execution_metrics USING brin (created_at);

CREATE TABLE IF NOT EXISTS energy_datasets (
    id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    region             TEXT NOT NULL,
    data_date          DATE NOT NULL,
    resolution_minutes INT NOT NULL DEFAULT 60 CHECK (resolution_minutes IN (15, 30, 60)),
    historical_loads   DOUBLE PRECISION[],
    weather_data       JSONB,
    pricing_schedule   JSONB,
    storage_state      JSONB,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT energy_datasets_region_date_key UNIQUE (region, data_date)
);

-- Vectors of several embedding models live side by side: the column has no fixed dimension,
-- each row records its model and dimension, and each model gets its own partial HNSW index.
CREATE TABLE IF NOT EXISTS optimization_embeddings (
    id                  UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    optimization_run_id UUID NOT NULL REFERENCES optimization_runs(id) ON DELETE CASCADE,
    model               TEXT NOT NULL,
    dimensions          INT NOT NULL CHECK (dimensions > 0),
    embedding           VECTOR NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT optimization_embeddings_run_model_key UNIQUE (optimization_run_id, model),
    CONSTRAINT optimization_embeddings_dimensions_match CHECK (vector_dims(embedding) = dimensions)
);

CREATE TABLE IF NOT EXISTS anomalies (
    id                  UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    optimization_run_id UUID REFERENCES optimization_runs(id) ON DELETE CASCADE,
    source              TEXT NOT NULL DEFAULT 'eglo' CHECK (source IN ('eglo', 'qnn')),
    external_id         TEXT,   -- the QNN monitoring API's id, for anomalies synced from it
    anomaly_type        TEXT NOT NULL,
    severity            TEXT NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    description         TEXT,
    details             JSONB,
    suggested_actions   TEXT[],
    resolved            BOOLEAN NOT NULL DEFAULT FALSE,
    detected_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    resolved_at         TIMESTAMPTZ,
    CONSTRAINT anomalies_source_external_key UNIQUE (source, external_id)
);
CREATE INDEX IF NOT EXISTS anomalies_run ON anomalies (optimization_run_id);
CREATE INDEX IF NOT EXISTS anomalies_unresolved ON anomalies (detected_at) WHERE NOT resolved;

-- Transactional outbox: events are written in the run's transaction and relayed after commit.
CREATE TABLE IF NOT EXISTS outbox (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       UUID NOT NULL UNIQUE,
    exchange       TEXT NOT NULL,
    routing_key    TEXT NOT NULL,
    body           BYTEA NOT NULL,
    correlation_id TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
