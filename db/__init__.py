"""eglo's Postgres schema, migrations and connection pool."""
