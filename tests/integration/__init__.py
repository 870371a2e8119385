"""One component against the real broker, Postgres or emulator server, no worker running."""
