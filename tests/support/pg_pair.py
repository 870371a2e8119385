"""A Postgres primary and a streaming standby of the suite's own (issue 13), made from the embedded
server's binaries (pgserver), on TCP ports of their own under a temp dir.

Replication is synchronous (`synchronous_standby_names = '*'`, `synchronous_commit = on`): a commit
returns once the standby has flushed it, so a promoted standby has everything the worker acked.
`kill_primary` is a kill -9 of the primary's postmaster; `promote` makes the standby the primary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from db.migrate import migrate
from db.pool import connect
from worker.ops.processes import free_port


def _bin() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class PgPair:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eglo-pg-pair-"))
        self.primary = self.dir / "primary"
        self.standby = self.dir / "standby"
        self.primary_port = free_port()
        self.standby_port = free_port()
        self._user: Any = None
        if os.geteuid() == 0:  # initdb refuses root: run the servers as pgserver's own user
            import pwd

            self._user = pwd.getpwnam("pgserver").pw_uid
            os.chown(self.dir, self._user, -1)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(_bin() / args[0]), *args[1:]],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.primary), "-U", "postgres", "--auth=trust", "-N")
        with open(self.primary / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.primary_port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nwal_level = replica\n"
                "max_wal_senders = 5\nsynchronous_standby_names = '*'\n"
                "synchronous_commit = on\nfsync = off\nhot_standby = on\n"
            )
        self._ctl(self.primary, "start")
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
            "-D", str(self.standby), "-R", "-X", "stream",
        )  # fmt: skip
        with open(self.standby / "postgresql.conf", "a") as conf:
            # Alone after its promotion: with the primary's synchronous_standby_names (copied by
            # pg_basebackup) every commit would wait for a standby that is not there. An HA
            # manager does this for real (Patroni: synchronous_mode_strict off).
            conf.write(f"port = {self.standby_port}\nsynchronous_standby_names = ''\n")
        self._ctl(self.standby, "start")

    def _ctl(self, data: Path, *args: str) -> None:
        log = data.parent / f"{data.name}.log"
        self._run("pg_ctl", "-D", str(data), "-l", str(log), "-w", *args)

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres"

    def url(self, database: str) -> str:
        """Both servers, libpq style: whichever is the primary gets the connection."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
            f"/{database}?target_session_attrs=read-write"
        )

    async def fresh_database(self) -> str:
        name = f"chaos_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await connect(self.url(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return self.url(name)

    def standby_url(self, url: str) -> str:
        """The standby alone (read-only until promoted), for the database of `url`."""
        database = url.split("/", 3)[3].split("?", 1)[0]
        return f"postgresql://postgres@127.0.0.1:{self.standby_port}/{database}"

    def kill_primary(self) -> None:
        pid = int((self.primary / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    def promote(self) -> None:
        self._ctl(self.standby, "promote")

    def close(self) -> None:
        for data in (self.standby, self.primary):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def pg_pair() -> Iterator[PgPair]:
    pair = PgPair()
    try:
        pair.start()
        yield pair
    finally:
        pair.close()
