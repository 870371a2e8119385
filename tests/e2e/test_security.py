"""Secrets stay out of logs and errors; the worker runs as a least-privilege database role."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.harness import events_sent, make_settings, running_worker, wait_for
from worker.observability.logs import redact
from worker.settings import Settings


def test_redact_urls_tokens_and_known_secrets() -> None:
    """Passwords in URLs, bearer tokens and configured secrets are masked."""
    text = (
        "connect amqps://eglo:hunter2@mq:5671/ failed; Authorization: Bearer sk-abc123xyz; "
        "key s3cr3t-value echoed"
    )
    out = redact(text, ("s3cr3t-value",))
    assert "hunter2" not in out and "sk-abc123xyz" not in out and "s3cr3t-value" not in out
    assert "amqps://eglo:***@mq:5671/" in out


def test_api_key_from_file_and_never_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EGLO_QNN_API_KEY_FILE is read, and settings never print the key or URL passwords."""
    key_file = tmp_path / "qnn.key"
    key_file.write_text("file-key-123\n")
    monkeypatch.setenv("EGLO_QNN_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("EGLO_AMQP_URL", "amqps://u:amqp-pass@mq/")
    settings = Settings()
    assert settings.qnn_api_key is not None
    assert settings.qnn_api_key.get_secret_value() == "file-key-123"
    assert "file-key-123" not in repr(settings) and "amqp-pass" not in repr(settings)


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_worker_runs_as_least_privilege_role(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str
) -> None:
    """With only db/worker_role.sql's grants the worker completes requests; DDL is refused."""
    await pool.execute((resources.files("db") / "worker_role.sql").read_text())
    worker_url = _as_user(database_url, "eglo_worker")
    docs = generate_requests(8, seed=21, id_prefix="role")
    async with (
        running_worker(make_settings(amqp_url, worker_url, emulator)),
        Publisher.connect(amqp_url) as publisher,
    ):
        await publisher.publish_many(parse_request(d) for d in docs)
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) = 8 FROM optimization_runs WHERE status = 'completed'"
            )
        )
        await wait_for(lambda: events_sent(pool))
    conn = await asyncpg.connect(worker_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DROP TABLE optimization_runs")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM optimization_runs")
    finally:
        await conn.close()
