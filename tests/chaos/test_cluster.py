"""Issue 13 on a real 3-node RabbitMQ cluster (the suite's own nodes, never the default one):
a node lost mid-run loses nothing, runs nothing twice, and re-sends few events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.chaos.cluster_scenarios import cluster_scenarios
from tests.chaos.environment import ChaosDatabase, chaos_database
from tests.chaos.runner import format_cluster_table, run_scenario
from tests.support.cluster import RabbitCluster, rabbit_cluster
from worker.settings import Settings

# The quick ones (a node lost mid-run, mid-batch); the rolling restart and HAProxy: make chaos.
SHORT = {s.name: s for s in cluster_scenarios(200, full=False)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with rabbit_cluster() as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster_db() -> Iterator[ChaosDatabase]:
    with chaos_database() as db:
        yield db


@pytest.mark.chaos
@pytest.mark.parametrize("name", list(SHORT))
def test_node_loss_loses_nothing(
    name: str, cluster: RabbitCluster, cluster_db: ChaosDatabase
) -> None:
    for node in cluster.nodes:  # the previous scenario's lost node comes back first
        if node not in cluster.running():
            cluster.start_node(node)
    row = asyncio.run(run_scenario(SHORT[name], cluster_db, cluster))
    print(format_cluster_table([row]))
    assert row.passed, format_cluster_table([row])
    assert row.recover_s is not None, format_cluster_table([row])
    # At most the relay's window per loss (16 by default); the 5 % ratio is checked at full size.
    assert row.duplicate_events <= Settings().outbox_window, format_cluster_table([row])
