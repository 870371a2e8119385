"""The TLS settings: how they reach the connection URLs, and the combinations refused at start."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from worker.runtime.connections import amqp_url, database_url, explain
from worker.settings import Settings


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def _query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def test_amqp_files_become_aiormq_query_options(pem: dict[str, Path]) -> None:
    settings = Settings(
        amqp_url="amqps://eglo:s3cret@rabbit.internal:5671/prod%2Fa?heartbeat=30",
        amqp_ca_file=pem["ca"],
        amqp_cert_file=pem["cert"],
        amqp_key_file=pem["key"],
    )
    url = amqp_url(settings)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "amqps",
        "eglo:s3cret@rabbit.internal:5671",
        "/prod%2Fa",
    )
    assert _query(url) == {
        "heartbeat": "30",
        "cafile": str(pem["ca"]),
        "certfile": str(pem["cert"]),
        "keyfile": str(pem["key"]),
    }


def test_no_tls_settings_leave_the_urls_alone() -> None:
    settings = Settings(
        amqp_url="amqps://u:p@h:5671/?cafile=/etc/ca.pem", database_url="postgresql://u@h/db"
    )
    assert amqp_url(settings) == "amqps://u:p@h:5671/?cafile=/etc/ca.pem"
    assert database_url(settings) == "postgresql://u@h/db"


def test_database_ca_means_verify_full_unless_the_url_says_otherwise(
    pem: dict[str, Path],
) -> None:
    settings = Settings(
        database_url="postgresql://eglo:pw@db.internal:5432/eglo?sslrootcert=/old.pem",
        database_ca_file=pem["ca"],
        database_cert_file=pem["cert"],
        database_key_file=pem["key"],
    )
    assert _query(database_url(settings)) == {
        "sslrootcert": str(pem["ca"]),  # the setting replaces the URL's own
        "sslcert": str(pem["cert"]),
        "sslkey": str(pem["key"]),
        "sslmode": "verify-full",
    }
    verify_ca = Settings(
        database_url="postgresql://eglo@db/eglo?sslmode=verify-ca", database_ca_file=pem["ca"]
    )
    assert _query(database_url(verify_ca))["sslmode"] == "verify-ca"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (dict(amqp_url="amqp://g:g@h:5672/", amqp_ca_file="ca"), "not amqps://"),
        (dict(amqp_url="amqps://g:g@h/", amqp_cert_file="cert"), "set both EGLO_AMQP_CERT_FILE"),
        (dict(database_ca_file="ca"), "need EGLO_DATABASE_URL"),
        (
            dict(database_url="postgresql://h/db?sslmode=prefer", database_ca_file="ca"),
            "sslmode=prefer, which does not verify the server",
        ),
        (
            dict(database_url="postgresql://h/db", database_key_file="key"),
            "set both EGLO_DATABASE_CERT_FILE",
        ),
        (dict(amqp_url="amqps://g:g@h/", amqp_ca_file="/nonexistent/ca.pem"), "amqp_ca_file"),
    ],
)
def test_combinations_refused_at_start(
    pem: dict[str, Path], values: dict[str, Any], words: str
) -> None:
    for key, value in values.items():
        if value in pem:
            values[key] = pem[value]
    with pytest.raises(ValidationError, match=words):
        Settings(**values)


def test_settings_read_from_the_environment(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGLO_AMQP_URL", "amqps://g:g@h:5671/")
    monkeypatch.setenv("EGLO_AMQP_CA_FILE", str(pem["ca"]))
    monkeypatch.setenv("EGLO_DATABASE_URL", "postgresql://h/db")
    monkeypatch.setenv("EGLO_DATABASE_CA_FILE", str(pem["ca"]))
    settings = Settings()
    assert settings.amqp_ca_file == pem["ca"] and settings.database_ca_file == pem["ca"]


def test_explain_names_the_server_and_the_setting() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code, error.verify_message = 20, "unable to get local issuer certificate"
    explained = explain(
        error, "amqps://g:g@rabbit:5671/?cafile=/ca.pem", server="the broker", setting="EGLO_AMQP"
    )
    assert str(explained) == (
        "TLS to the broker at rabbit:5671 failed: the server's certificate was refused: unable "
        "to get local issuer certificate; it is not signed by a CA in EGLO_AMQP_CA_FILE (/ca.pem)"
    )
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "hostname mismatch"
    explained = explain(
        mismatch, "postgresql://db.internal:5432/x", server="Postgres", setting="EGLO_DATABASE"
    )
    assert str(explained).endswith(
        "hostname mismatch; the certificate does not name db.internal in its subjectAltName"
    )
    assert (
        explain(
            ConnectionRefusedError(111, "refused"), "amqp://h/", server="s", setting="EGLO_AMQP"
        )
        is None
    )


def test_explain_fills_in_the_default_port() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert str(explain(error, "amqps://g:g@rabbit/", server="the broker", setting="EGLO_AMQP")) == (
        "TLS to the broker at rabbit:5671 failed: the server did not answer in TLS: is this its "
        "TLS port?"
    )


def test_explain_names_every_host_of_a_multi_host_database_url() -> None:
    """libpq's form for a primary and its standby (issue 13): no single port to name."""
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    url = "postgresql://u:p@pg-0:5432,pg-1:5433/eglo?target_session_attrs=read-write"
    assert str(explain(error, url, server="Postgres", setting="EGLO_DATABASE")) == (
        "TLS to Postgres at pg-0:5432,pg-1:5433 failed: the server did not answer in TLS: is "
        "this its TLS port?"
    )
