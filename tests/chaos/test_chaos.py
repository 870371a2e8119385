"""The chaos suite, shortened (300 requests per scenario): every request accounted for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.chaos.environment import ChaosDatabase, chaos_database
from tests.chaos.runner import format_table, run_scenario
from tests.chaos.scenarios import scenarios
from tests.support import infra

SHORT = {s.name: s for s in scenarios(300, db_down_s=5)}


@pytest.fixture(scope="module")
def chaos_db(broker: object) -> Iterator[ChaosDatabase]:
    with chaos_database() as db:
        yield db


@pytest.mark.chaos
@pytest.mark.parametrize("name", list(SHORT))
def test_scenario_loses_nothing_and_duplicates_nothing(name: str, chaos_db: ChaosDatabase) -> None:
    """Every valid request ends in exactly one terminal run; dead letters equal the poison."""
    infra.ensure_local_rabbitmq()
    row = asyncio.run(run_scenario(SHORT[name], chaos_db))
    print(format_table([row]))
    assert row.passed, format_table([row])
