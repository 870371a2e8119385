"""End-to-end: a worker, the embedder or the API running on the real broker, Postgres, emulator."""
