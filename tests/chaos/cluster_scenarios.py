"""Scenarios on a 3-node RabbitMQ cluster of the suite's own (tests/support/cluster.py), issue 13.

Each loses one node mid-run and keeps it down until the scenario ends; the node is started again
before the next scenario. Every row must show 0 lost and 0 duplicate runs; duplicate event
deliveries are counted and must stay within 5 % of the events.
"""

from __future__ import annotations

import asyncio
import time

from contracts.topology import DEAD_LETTER_QUEUE, REQUESTS_QUEUE
from tests.chaos.runner import ChaosRun, Scenario

DUPLICATE_EVENTS_MAX = 0.05


async def kill_worker_node(run: ChaosRun) -> None:
    """kill -9 of the node the worker is connected to."""
    # Found first: behind HAProxy it is asked of the broker, which takes seconds.
    node = await asyncio.to_thread(run.cluster.node_of, "eglo-worker", run.worker_node())
    await run.until_stored(0.3)
    at = await run.stored()
    mark = run.mark()
    run.cluster.kill(node)
    run.notes.append(f"kill -9 of {node.name} (the worker's node) at {at} stored")
    await run.until_recovered(mark, within_s=45)


async def replicated(run: ChaosRun) -> None:
    """Every quorum queue of the scenario has its 3 members online before the fault."""
    queues = [REQUESTS_QUEUE, DEAD_LETTER_QUEUE, run.events_queue]
    await asyncio.to_thread(run.cluster.wait_replicated, queues)


async def find_leader(run: ChaosRun) -> None:
    await replicated(run)
    run.target = await asyncio.to_thread(run.cluster.leader, REQUESTS_QUEUE)


async def stop_quorum_leader(run: ChaosRun) -> None:
    """A graceful stop (rabbitmqctl stop) of the node leading eglo.requests."""
    node = run.target
    hit = node == await asyncio.to_thread(run.cluster.node_of, "eglo-worker", run.worker_node())
    await run.until_stored(0.3)
    at = await run.stored()
    mark = run.mark()
    stopping = asyncio.create_task(asyncio.to_thread(run.cluster.stop, node))
    while node.process.poll() is None and not stopping.done():  # noqa: ASYNC110 - a process
        await asyncio.sleep(0.02)  # progress counts from when the node is really gone
    await run.until_recovered(mark, reconnect=hit, within_s=45)
    await stopping
    where = "also the worker's node" if hit else "not the worker's node"
    run.notes.append(f"stop of {node.name} (leader of {REQUESTS_QUEUE}, {where}) at {at} stored")


async def kill_publisher_node(run: ChaosRun) -> None:
    """kill -9 of the node `eglo publish`'s connection is on, with the batch a third confirmed:
    the publishes in flight then are lost with the node and the Publisher sends them again."""
    third = run.scenario.requests // 3
    waited = time.monotonic()
    while run.publisher is None or run.confirmed < third:
        if time.monotonic() - waited > 60:
            run.notes.append(f"FAIL only {run.confirmed} confirmed in 60 s, no fault made")
            return
        await asyncio.sleep(0.005)
    node = await asyncio.to_thread(run.cluster.node_of, "eglo-publisher", run.publisher_node())
    hit = node == await asyncio.to_thread(run.cluster.node_of, "eglo-worker", run.worker_node())
    mark = run.mark()
    run.cluster.kill(node)
    where = ", also the worker's" if hit else ""
    run.notes.append(f"kill -9 of {node.name} (the publisher's node{where}) at {run.confirmed} "
                     f"of {run.scenario.requests} confirmed")
    await run.until_recovered(mark, reconnect=hit, within_s=45)


async def rolling_restart(run: ChaosRun) -> None:
    """Each node stopped (rabbitmqctl stop) and started again, one after the other, each once
    the quorum queues have their members back on every node (as the operator's rolling restart
    waits); the worker and the publisher fail over each time their node goes."""
    await run.until_stored(0.2)
    started = time.monotonic()
    for node in list(run.cluster.nodes):
        at = await run.stored()
        await asyncio.to_thread(run.cluster.stop, node)
        await asyncio.to_thread(run.cluster.start_node, node)
        await replicated(run)
        run.notes.append(f"{node.name} stopped and started again at {at} stored")
    run.notes.append(f"rolling restart of the 3 nodes took {time.monotonic() - started:.0f} s")


def cluster_scenarios(requests: int, *, full: bool = True) -> list[Scenario]:
    """The scenarios on 3 nodes; `full=False`: the quick ones, for `make test`."""
    env = {"EGLO_RETRY_DELAYS_S": "[1, 3, 5]"}
    # Paced, so the fault lands with work still to do and the recovery shows in the stored count.
    rate = 40.0
    quick = [
        Scenario(
            "cluster-kill-worker-node",
            requests,
            kill_worker_node,
            worker_env=env,
            prepare=replicated,
            publish_rate=rate,
            deadline_s=60,
        ),
        Scenario(
            "cluster-stop-quorum-leader",
            requests,
            stop_quorum_leader,
            worker_env=env,
            prepare=find_leader,
            publish_rate=rate,
            deadline_s=60,
        ),
        Scenario(
            "cluster-kill-publisher-node-mid-batch",
            requests,
            kill_publisher_node,
            worker_env=env,
            prepare=replicated,
            publish_rate=rate * 2.5,
            batch_publish=True,
            deadline_s=60,
        ),
    ]
    if not full:
        return quick
    return [
        *quick,
        Scenario(
            "cluster-rolling-restart",
            requests,
            rolling_restart,
            worker_env=env,
            prepare=replicated,
            # Slower, so that the 3 restarts (about a minute) happen while requests still come.
            publish_rate=rate / 2 if requests > 500 else rate / 4,
            deadline_s=90,
        ),
        Scenario(
            "cluster-kill-worker-node-haproxy",
            requests,
            kill_worker_node,
            worker_env=env,
            prepare=replicated,
            publish_rate=rate,
            deadline_s=60,
            haproxy=True,
        ),
        Scenario(
            "cluster-stop-quorum-leader-haproxy",
            requests,
            stop_quorum_leader,
            worker_env=env,
            prepare=find_leader,
            publish_rate=rate,
            deadline_s=60,
            haproxy=True,
        ),
    ]


async def kill_primary_promote_standby(run: ChaosRun) -> None:
    """kill -9 of the Postgres primary at 30%, the standby promoted 1 s later (support/pg_pair.py);
    the worker's EGLO_DATABASE_URL names both, with target_session_attrs=read-write."""
    import asyncpg

    pair = run.db
    await run.until_stored(0.3)
    started = time.monotonic()
    pair.kill_primary()
    await asyncio.sleep(1.0)
    # Synchronous replication: the standby has every commit the primary acknowledged.
    standby = await asyncpg.connect(pair.standby_url(run.database_url))
    try:
        at = int(await standby.fetchval("SELECT count(*) FROM optimization_runs"))
    finally:
        await standby.close()
    await asyncio.to_thread(pair.promote)
    run.notes.append(f"primary killed at {at} stored, standby promoted 1 s later")
    while await run.stored() <= at:
        if time.monotonic() - started > 60:
            run.notes.append("FAIL no run stored within 60 s of the promotion")
            return
        await asyncio.sleep(0.05)
    run.recover_s = round(time.monotonic() - started, 1)


def failover_scenarios(requests: int) -> list[Scenario]:
    return [
        Scenario(
            "postgres-failover",
            requests,
            kill_primary_promote_standby,
            worker_env={"EGLO_RETRY_DELAYS_S": "[1, 3, 5]"},
            publish_rate=40.0,
            deadline_s=60,
        )
    ]
