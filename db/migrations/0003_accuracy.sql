-- eglo schema v3: forecast accuracy. One score per completed forecast run, measured against the
-- energy_datasets rows of the days it forecast, and a rolling rollup per model and region.
-- Idempotent (IF NOT EXISTS throughout). Written by worker/analytics/accuracy.py; see docs/accuracy.md.

CREATE TABLE IF NOT EXISTS forecast_scores (
    -- The primary key doubles as the "one score per run" rule that upserts conflict on.
    run_id             UUID PRIMARY KEY REFERENCES optimization_runs(id) ON DELETE CASCADE,
    region             TEXT NOT NULL,
    model_id           TEXT NOT NULL,
    forecast_date      DATE NOT NULL,
    resolution_minutes INT NOT NULL CHECK (resolution_minutes > 0),
    n                  INT NOT NULL CHECK (n >= 0),   -- steps scored; 0 when unscorable (see note)
    mape               DOUBLE PRECISION,              -- percent, over steps with a non-zero actual
    rmse               DOUBLE PRECISION,              -- MW
    mae                DOUBLE PRECISION,              -- MW
    r2                 DOUBLE PRECISION,              -- NULL when the actuals are constant
    coverage           DOUBLE PRECISION CHECK (coverage BETWEEN 0 AND 1),  -- NULL: no interval
    interval_level     DOUBLE PRECISION,              -- the interval's nominal level, if given
    -- Newest updated_at of the actuals this score was computed from. A score is stale when the
    -- actuals' current newest updated_at differs: comparing versions rather than clocks cannot
    -- miss an import whose transaction started before the scoring one but committed after it.
    actuals_updated_at TIMESTAMPTZ NOT NULL,
    note               TEXT,                          -- why n = 0, e.g. coarser actuals
    scored_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS forecast_scores_model_region_date
    ON forecast_scores (model_id, region, forecast_date);

CREATE TABLE IF NOT EXISTS model_metrics (
    model_id       TEXT NOT NULL,
    region         TEXT NOT NULL,
    runs           INT NOT NULL CHECK (runs >= 0),   -- scored runs inside the window
    mape           DOUBLE PRECISION,                  -- means of the per-run values
    rmse           DOUBLE PRECISION,
    mae            DOUBLE PRECISION,
    r2             DOUBLE PRECISION,
    coverage       DOUBLE PRECISION,
    interval_level DOUBLE PRECISION,
    window_days    INT NOT NULL CHECK (window_days > 0),
    window_start   DATE NOT NULL,                     -- forecast dates covered, inclusive
    window_end     DATE NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, region)
);
