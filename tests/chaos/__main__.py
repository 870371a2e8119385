"""`python -m tests.chaos [--short] [--only NAME]`: run the scenarios and print the table."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests import infra
from tests.chaos.environment import chaos_database
from tests.chaos.runner import Row, format_table, run_scenario
from tests.chaos.scenarios import scenarios
from worker import logs


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
    args = parser.parse_args()
    logs.configure("WARNING", json=False)
    result = asyncio.run(main(args.short, args.only))
    print(format_table(result))
    sys.exit(0 if all(r.passed for r in result) else 1)
