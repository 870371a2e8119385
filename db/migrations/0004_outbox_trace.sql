-- The trace context of the run that wrote each event, so the relay's publish joins its trace.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS headers JSONB;
