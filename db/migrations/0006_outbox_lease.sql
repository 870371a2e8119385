-- The worker that committed an event publishes it straight from memory; until lease_until no
-- relay claims the row, so it is not sent twice meanwhile. NULL (rows of older workers, and
-- events whose direct publish failed): any relay may claim it at once.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;
