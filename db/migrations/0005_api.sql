-- eglo schema v5: the HTTP API (`eglo api`). Idempotent (IF NOT EXISTS throughout).

-- What the API accepted and published, so that its status URL can say "pending" before the
-- worker has stored a run. One row per request_id; a re-submission of the same id keeps the first.
CREATE TABLE IF NOT EXISTS api_submissions (
    request_id   TEXT PRIMARY KEY,
    request_type TEXT NOT NULL
        CHECK (request_type IN ('forecast', 'storage', 'grid_switch', 'simulation')),
    submitted_by TEXT NOT NULL,            -- the token's name, never the token
    submitted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS api_submissions_submitted_at_brin
    ON api_submissions USING brin (submitted_at);

-- Every state-changing operator action (dead-letter replay, anomaly resolve): who, when, what,
-- and how it ended. Written by the API after the action, also when the action failed.
CREATE TABLE IF NOT EXISTS audit_log (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor      TEXT NOT NULL,              -- the token's name
    role       TEXT NOT NULL,
    action     TEXT NOT NULL,              -- e.g. dead_letters.replay, anomaly.resolve
    target     TEXT,                       -- e.g. the anomaly id
    details    JSONB NOT NULL DEFAULT '{}'::jsonb,
    outcome    TEXT NOT NULL               -- ok, or the error
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
