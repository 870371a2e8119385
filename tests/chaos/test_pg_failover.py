"""Issue 13: a Postgres primary killed mid-run and its synchronous standby promoted; the worker
(EGLO_DATABASE_URL naming both, target_session_attrs=read-write) waits, reconnects to the new
primary and loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.chaos.cluster_scenarios import failover_scenarios
from tests.chaos.runner import format_cluster_table, run_scenario
from tests.support.pg_pair import PgPair, pg_pair

SHORT = {s.name: s for s in failover_scenarios(200)}


@pytest.fixture
def pair(broker: object) -> Iterator[PgPair]:
    with pg_pair() as servers:
        yield servers


@pytest.mark.chaos
@pytest.mark.parametrize("name", list(SHORT))
def test_primary_lost_standby_promoted_loses_nothing(name: str, pair: PgPair) -> None:
    row = asyncio.run(run_scenario(SHORT[name], pair))  # type: ignore[arg-type]
    print(format_cluster_table([row]))
    assert row.passed, format_cluster_table([row])
    assert row.recover_s is not None, format_cluster_table([row])
