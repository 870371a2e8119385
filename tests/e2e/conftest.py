"""Fixtures shared by the API's end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.api_support import empty_api_tables
from tests.support.harness import make_settings
from worker.settings import Settings


@pytest.fixture
async def settings(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str
) -> AsyncIterator[Settings]:
    """Settings for `eglo api` and its worker over empty API tables; `?wait` up to 20 s."""
    await empty_api_tables(pool)
    yield make_settings(amqp_url, database_url, emulator, api_max_wait_s=20)
