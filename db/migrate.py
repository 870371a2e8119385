"""Applies db/migrations/*.sql in order, once each, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

log = structlog.get_logger(__name__)
# Any constant works; it only has to be the same for every eglo process.
MIGRATION_LOCK_KEY = 0x6567_6C6F  # "eglo"


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files("db") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text()) for name in names]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the versions applied. Safe from many processes at once."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version TEXT PRIMARY KEY,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("db.migration.applied", version=version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


def version_number(version: str) -> str:
    """`0004_outbox_trace` -> `0004`: how versions are named to people."""
    return version.split("_", 1)[0]


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """The database's migrations against the ones this code ships."""

    applied: tuple[str, ...]  # versions recorded in schema_migrations (empty: no schema at all)
    shipped: tuple[str, ...]  # versions this code ships, in order

    @property
    def pending(self) -> tuple[str, ...]:
        done = set(self.applied)
        return tuple(v for v in self.shipped if v not in done)

    @property
    def current(self) -> bool:
        return not self.pending

    def describe(self) -> str:
        """One line for /readyz and `eglo migrate --check`, e.g. "schema at 0003, code needs
        0004", or "schema at 0006, code needs 0006 (missing 0005)" when one was skipped."""
        needs = version_number(self.shipped[-1]) if self.shipped else "none"
        if self.current:
            return f"schema at {needs}, current"
        if not self.applied:
            return f"schema missing, code needs {needs}"
        newest = max(self.applied)
        line = f"schema at {version_number(newest)}, code needs {needs}"
        gaps = [version_number(v) for v in self.pending if v < newest]
        # A version skipped below the newest applied one (not just the newest ones pending).
        return f"{line} (missing {', '.join(gaps)})" if gaps else line


async def schema_status(conn: asyncpg.Connection) -> SchemaStatus:
    """What has been applied; a database never migrated has no schema_migrations table."""
    shipped = tuple(version for version, _ in migration_files())
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        return SchemaStatus((), shipped)
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return SchemaStatus(tuple(r["version"] for r in rows), shipped)


# What a worker needs of each table it touches while handling a message (db/worker_role.sql
# grants these and more). Checked one privilege at a time: has_table_privilege with a list is
# true when any one of them is held.
WORKER_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "optimization_runs": ("SELECT", "INSERT", "UPDATE"),
    "qnn_execution_metrics": ("SELECT", "INSERT"),
    "anomalies": ("SELECT", "INSERT"),
    "outbox": ("SELECT", "INSERT", "UPDATE"),
    "energy_datasets": ("SELECT",),
}
EMBEDDER_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "optimization_runs": ("SELECT",),
    "optimization_embeddings": ("SELECT", "INSERT"),
}

_PRIVILEGE_PROBLEMS = """
SELECT name, privilege,
       CASE WHEN to_regclass(name) IS NULL THEN 'missing'
            WHEN NOT has_table_privilege(to_regclass(name), privilege) THEN 'denied' END AS problem
FROM unnest($1::text[], $2::text[]) AS t(name, privilege)
"""


async def schema_problem(
    conn: asyncpg.Connection, privileges: dict[str, tuple[str, ...]]
) -> str | None:
    """Why this connection's role cannot do its work on this database, or None: the schema is
    missing or older than the code, a table is gone, or a privilege is not granted."""
    status = await schema_status(conn)
    if not status.current:
        return status.describe()
    names = [name for name, privs in privileges.items() for _ in privs]
    wanted = [p for privs in privileges.values() for p in privs]
    for row in await conn.fetch(_PRIVILEGE_PROBLEMS, names, wanted):
        if row["problem"] == "missing":
            return f"table {row['name']} missing"
        if row["problem"] == "denied":
            return f"no {row['privilege']} privilege on {row['name']}"
    return None
