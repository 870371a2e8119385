"""`python -m tests.chaos [--short] [--cluster] [--only NAME]`: run the scenarios, print the table.

`--cluster`: the scenarios of issue 13 instead: a Postgres primary lost and its standby promoted
(support/pg_pair.py), then the RabbitMQ cluster scenarios on 3 nodes of the suite's own: a node
lost under the worker, the quorum leader stopped, a node lost while `eglo publish` is mid-batch, a
rolling restart of the 3 nodes, and the first two again with HAProxy in front of the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.chaos.cluster_scenarios import DUPLICATE_EVENTS_MAX
from tests.chaos.environment import chaos_database
from tests.chaos.runner import Row, format_cluster_table, format_table, run_scenario
from tests.chaos.scenarios import scenarios
from tests.support import infra
from worker.observability import logs


async def main_cluster(short: bool, only: list[str]) -> list[Row]:
    from tests.chaos.cluster_scenarios import cluster_scenarios, failover_scenarios
    from tests.support.cluster import rabbit_cluster
    from tests.support.pg_pair import pg_pair

    size = 200 if short else 2000
    chosen = [s for s in cluster_scenarios(size) if not only or s.name in only]
    rows = []
    infra.ensure_local_rabbitmq()
    for scenario in failover_scenarios(size):  # Postgres primary lost, standby promoted
        if only and scenario.name not in only:
            continue
        print(f"running {scenario.name} ({scenario.requests} requests)...", file=sys.stderr)
        with pg_pair() as pair:
            row = await run_scenario(scenario, pair)  # type: ignore[arg-type]
        print(format_cluster_table([row]), file=sys.stderr)
        rows.append(row)
    with chaos_database() as db, rabbit_cluster() as cluster:
        for scenario in chosen:
            for node in cluster.nodes:  # the previous scenario's lost node comes back first
                if node not in cluster.running():
                    cluster.start_node(node)
            print(f"running {scenario.name} ({scenario.requests} requests)...", file=sys.stderr)
            row = await run_scenario(scenario, db, cluster)
            print(format_cluster_table([row]), file=sys.stderr)
            rows.append(row)
    return rows


async def main(short: bool, only: list[str]) -> list[Row]:
    infra.ensure_local_rabbitmq()
    chosen = scenarios(300 if short else 2000, db_down_s=5 if short else 10)
    if only:
        chosen = [s for s in chosen if s.name in only]
    rows = []
    with chaos_database() as db:
        for scenario in chosen:
            print(f"running {scenario.name} ({scenario.requests} requests)...", file=sys.stderr)
            row = await run_scenario(scenario, db)
            print(format_table([row]), file=sys.stderr)
            rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    parser.add_argument("--short", action="store_true", help="300 requests per scenario")
    parser.add_argument("--only", action="append", default=[], help="scenario name")
    parser.add_argument("--cluster", action="store_true", help="the 3-node RabbitMQ scenarios")
    args = parser.parse_args()
    logs.configure("WARNING", json=False)
    if args.cluster:
        result = asyncio.run(main_cluster(args.short, args.only))
        print(format_cluster_table(result))
        ok = all(r.passed and r.duplicate_events <= DUPLICATE_EVENTS_MAX * r.events for r in result)
        sys.exit(0 if ok else 1)
    result = asyncio.run(main(args.short, args.only))
    print(format_table(result))
    sys.exit(0 if all(r.passed for r in result) else 1)
