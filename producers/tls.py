"""Why a TLS handshake with the broker or the database failed, in words that name the setting.

The CA and client-certificate settings travel in the connection URLs, in the form each driver
reads (aiormq: `cafile`/`certfile`/`keyfile`; asyncpg, like libpq: `sslrootcert`/`sslcert`/
`sslkey`/`sslmode`), so every place that connects from a URL gets them.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit


class TlsError(Exception):
    """A TLS handshake with the broker or the database failed; the message says why.

    Not a ConnectionError on purpose: it is a configuration problem (CA, certificate, host name),
    so a loop that retries lost connections should let it through rather than retry it quietly.
    """


def explain(exc: BaseException, url: str, *, server: str, setting: str) -> TlsError | None:
    """A TlsError saying what a failed handshake means, or None if `exc` is not one."""
    chain = list(_chain(exc))
    ssl_error = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    # aiormq re-raises as AMQPConnectionError(*args) or with the error's repr: keep the text too.
    text = " ".join(str(e) for e in chain)
    upper = text.upper() + str(getattr(ssl_error, "reason", "") or "").upper()
    parts = urlsplit(url)
    where = _where(parts)
    query = url_query(url)
    ca_key, cert_key, default_ca = _URL_KEYS[setting]
    ca = query.get(ca_key) or f"unset: {default_ca}"
    cert = query.get(cert_key)
    set_cert = f"set {setting}_CERT_FILE and {setting}_KEY_FILE"
    if isinstance(ssl_error, ssl.SSLCertVerificationError):
        if ssl_error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            hint = f"the certificate does not name {where[0]} in its subjectAltName"
        else:
            hint = f"it is not signed by a CA in {setting}_CA_FILE ({ca})"
        detail = str(ssl_error.verify_message).rstrip(".")
        message = f"the server's certificate was refused: {detail}; {hint}"
    elif "CERTIFICATE_VERIFY_FAILED" in upper:
        detail = text.split("certificate verify failed: ", 1)[-1].split(" (_ssl.c", 1)[0]
        message = (
            f"the server's certificate was refused: {detail}; "
            f"it is not signed by a CA in {setting}_CA_FILE ({ca})"
        )
    elif "CERTIFICATE_REQUIRED" in upper or "REQUIRES A VALID CLIENT CERTIFICATE" in upper:
        # TLS alert, or Postgres's own words for pg_hba `cert` / `clientcert`.
        message = f"{server} requires a client certificate: {set_cert}"
    elif "UNKNOWN_CA" in upper or "BAD_CERTIFICATE" in upper:
        message = (
            f"{server} refused the client certificate ({cert or 'none'}): "
            "it is not signed by a CA it trusts"
        )
    elif "WRONG_VERSION_NUMBER" in upper or "PACKET_LENGTH" in upper:
        message = "the server did not answer in TLS: is this its TLS port?"
    elif ssl_error is not None or "[SSL" in text:
        message = str(getattr(ssl_error, "reason", None) or ssl_error or text)
    elif _uses_tls(url) and any(isinstance(e, ConnectionResetError) for e in chain):
        # With TLS 1.3 the server checks the client's certificate after the client's side of the
        # handshake is done: its refusal can arrive as a reset instead of an alert.
        if cert is None:
            message = (
                f"{server} closed the connection after the TLS handshake, as one that requires "
                f"a client certificate does: {set_cert}"
            )
        else:
            message = (
                f"{server} closed the connection after the TLS handshake: it may not accept "
                f"the client certificate ({cert})"
            )
    else:
        return None
    return TlsError(f"TLS to {server} at {where[1]} failed: {message}")


def _where(parts: SplitResult) -> tuple[str, str]:
    """The host, and host:port, for the message. A libpq multi-host URL (`h1:5432,h2:5432`, a
    primary and its standby) has no single host or port: its hosts are named together."""
    default = _DEFAULT_PORTS.get(parts.scheme.lower(), 5432)
    try:
        return str(parts.hostname), f"{parts.hostname}:{parts.port or default}"
    except ValueError:
        hosts = parts.netloc.rpartition("@")[2]
        return hosts, hosts


def _uses_tls(url: str) -> bool:
    if urlsplit(url).scheme.lower() == "amqps":
        return True
    return url_query(url).get("sslmode") in ("require", "verify-ca", "verify-full")


_DEFAULT_PORTS = {"amqps": 5671, "amqp": 5672}  # and 5432 for Postgres

_URL_KEYS = {  # the URL's CA and certificate parameters, and where the CA comes from without one
    "EGLO_AMQP": ("cafile", "certfile", "the system's trust store"),
    "EGLO_DATABASE": ("sslrootcert", "sslcert", "~/.postgresql/root.crt"),
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def url_query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def with_query(url: str, extra: dict[str, Path | str | None]) -> str:
    """The URL with these query parameters set (a setting replaces the URL's own value)."""
    values = {k: str(v) for k, v in extra.items() if v is not None}
    if not values:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in values]
    return urlunsplit(parts._replace(query=urlencode([*query, *values.items()])))
