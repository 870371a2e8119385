-- The least privilege an eglo worker (and embedder) needs, separate from the role that migrates.
-- Run as the migrating role after `eglo migrate`; rename eglo_worker as you like.
-- The worker then connects with EGLO_DATABASE_URL=postgresql://eglo_worker:...@host/db
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'eglo_worker') THEN
        CREATE ROLE eglo_worker LOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO eglo_worker;
-- Runs are written once and updated only when an operator's replay re-runs a failed one.
GRANT SELECT, INSERT, UPDATE ON optimization_runs TO eglo_worker;
GRANT SELECT, INSERT ON qnn_execution_metrics TO eglo_worker;
GRANT SELECT, INSERT, UPDATE ON anomalies TO eglo_worker;
GRANT SELECT, INSERT ON optimization_embeddings TO eglo_worker;
GRANT SELECT ON energy_datasets TO eglo_worker;
-- The relay marks events published and prunes old ones.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO eglo_worker;
GRANT SELECT ON schema_migrations TO eglo_worker;
-- Scoring completed forecasts against actuals, and the per-model rollup.
GRANT SELECT, INSERT, UPDATE ON forecast_scores TO eglo_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON model_metrics TO eglo_worker;
-- `eglo api` (same role): what it accepted, and the operator audit log, append-only.
GRANT SELECT, INSERT ON api_submissions TO eglo_worker;
GRANT SELECT, INSERT ON audit_log TO eglo_worker;
