"""`eglo api` against the real broker, database, worker and QNN emulator: submit → wait → read
back, idempotency, the dead letters' reasons on refused bodies, and access control."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from contracts.topology import request_routing_key
from db.migrate import migration_files, version_number
from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.api_support import (
    OPERATOR,
    READER,
    SUBMITTER,
    api_client,
    bearer,
    sample,
)
from tests.support.harness import running_worker, wait_for
from worker.api.app import SUBMIT_ROUTES
from worker.settings import Settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_worker(settings), api_client(settings) as client:
        yield client


async def test_submit_and_wait_answers_the_stored_run(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """No request_id and no request_type: the API fills them in; `?wait` answers 200 with the
    run the worker stored, and GET /runs/{id} reads back the same run."""
    body = sample("forecast")
    del body["request_id"], body["request_type"]
    response = await client.post("/forecast?wait=15", json=body, headers=bearer(SUBMITTER))
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["request_id"].startswith("api-")
    assert (run["request_type"], run["status"]) == ("forecast", "completed")
    assert len(run["result"]["forecast"]) == body["payload"]["horizon_steps"]
    assert run["execution"] and run["execution"][0]["model_id"]
    assert run["request"]["payload"]["historical_loads"] == body["payload"]["historical_loads"]
    assert {e["routing_key"] for e in run["events"]} >= {"run.completed.forecast"}
    again = await client.get(f"/runs/{run['request_id']}", headers=bearer(READER))
    assert again.status_code == 200
    assert again.json()["run_id"] == run["run_id"]
    plot = await client.get(run["links"]["plot"], headers=bearer(READER))
    assert plot.status_code == 200
    assert plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert await pool.fetchval("SELECT submitted_by FROM api_submissions") == "sam"


async def test_plot_is_a_png_and_a_clear_501_without_matplotlib(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib is a runtime dependency (the image draws); an install that lacks it still
    serves everything else and answers a plot 501 saying what is missing."""
    body = sample("storage", prefix="plot")
    run = (await client.post("/storage-optimize?wait=15", json=body, headers=bearer(SUBMITTER)))
    assert run.status_code == 200, run.text
    url = run.json()["links"]["plot"]
    drawn = await client.get(url, headers=bearer(READER))
    assert (drawn.status_code, drawn.headers["content-type"]) == (200, "image/png")
    assert drawn.content.startswith(b"\x89PNG\r\n\x1a\n")

    import worker.analytics

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "worker.analytics.plots")
    monkeypatch.delattr(worker.analytics, "plots")
    missing = await client.get(url, headers=bearer(READER))
    assert missing.status_code == 501, missing.text
    problem = missing.json()
    assert problem["reason"] == "plots_unavailable"
    assert "matplotlib" in problem["detail"] and "reinstall eglo" in problem["detail"]
    assert (await client.get(f"/runs/{body['request_id']}", headers=bearer(READER))).is_success


async def test_every_submit_route_runs_its_type(client: httpx.AsyncClient) -> None:
    for path, request_type in (
        ("/storage-optimize", "storage"),
        ("/grid-switch-optimize", "grid_switch"),
        ("/simulate", "simulation"),
    ):
        response = await client.post(
            f"{path}?wait=15", json=sample(request_type), headers=bearer(SUBMITTER)
        )
        assert response.status_code == 200, response.text
        run = response.json()
        assert (run["request_type"], run["status"]) == (request_type, "completed"), path
        plot = await client.get(run["links"]["plot"], headers=bearer(READER))
        assert (plot.status_code, plot.headers["content-type"]) == (200, "image/png"), path


async def test_accepted_then_pending_then_stored(settings: Settings) -> None:
    """Without `wait`: 202, a status URL (also in Location) that says `pending` until a worker
    stores the run, then the run."""
    body = sample("storage")
    async with api_client(settings) as client:
        response = await client.post("/storage-optimize", json=body, headers=bearer(SUBMITTER))
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["request_id"] == body["request_id"]
        assert response.headers["location"] == accepted["status_url"]
        status = await client.get(accepted["status_url"], headers=bearer(READER))
        assert status.json()["status"] == "pending"
        assert status.json()["submitted_by"] == "sam"
        async with running_worker(settings):

            async def stored() -> bool:
                run = await client.get(accepted["status_url"], headers=bearer(READER))
                return bool(run.json()["status"] == "completed")

            await wait_for(stored, within_s=20)


async def test_same_request_id_is_idempotent_and_a_different_body_conflicts(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """The Idempotency-Key becomes the request_id; sending it again answers the same run without
    a second one; the same id with another request is a 409 request_id_conflict."""
    body = sample("grid_switch")
    del body["request_id"]
    key = f"idem-{uuid.uuid4().hex}"
    headers = {**bearer(SUBMITTER), "Idempotency-Key": key}
    first = await client.post("/grid-switch-optimize?wait=15", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["request_id"] == key
    second = await client.post("/grid-switch-optimize", json=body, headers=headers)
    assert second.status_code == 200
    assert second.json()["run_id"] == first.json()["run_id"]
    assert await pool.fetchval("SELECT count(*) FROM optimization_runs") == 1

    other = {**body, "region": "Somewhere Else"}
    conflict = await client.post("/grid-switch-optimize", json=other, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["reason"] == "request_id_conflict"

    mismatch = await client.post(
        "/grid-switch-optimize", json={**body, "request_id": "not-the-key"}, headers=headers
    )
    assert mismatch.status_code == 422
    assert mismatch.json()["reason"] == "idempotency_key_mismatch"


def _refused_bodies() -> list[tuple[str, bytes, str | None, str, str | None]]:
    """(path, body, content type, reason, rule) of bodies the worker would dead-letter."""
    forecast = sample("forecast", prefix="bad")
    storage = sample("storage", prefix="bad")
    soc = {**storage, "payload": {**storage["payload"], "soc_min_kwh": 10**9}}
    horizon = {**forecast, "payload": {**forecast["payload"], "horizon_steps": "24"}}
    return [
        ("/forecast", b"{oops", "application/json", "invalid_json", None),
        ("/forecast", orjson.dumps(forecast), "text/plain", "unsupported_content_type", None),
        (
            "/forecast",
            orjson.dumps(forecast),
            "application/json; charset=latin-1",
            "unsupported_charset",
            None,
        ),
        ("/forecast", orjson.dumps(storage), "application/json", "routing_key_mismatch", None),
        (
            "/forecast",
            orjson.dumps({**forecast, "schema_version": 2}),
            "application/json",
            "unsupported_schema_version",
            None,
        ),
        (
            "/forecast",
            orjson.dumps({**forecast, "request_type": "teleport"}),
            "application/json",
            "unknown_request_type",
            None,
        ),
        ("/forecast", orjson.dumps(horizon), "application/json", "invalid_request", None),
        (
            "/storage-optimize",
            orjson.dumps(soc),
            "application/json",
            "invalid_request",
            "storage.soc_bounds",
        ),
    ]


async def test_refused_bodies_carry_the_dead_letters_reason_and_rule(
    client: httpx.AsyncClient,
    amqp: AbstractRobustConnection,
    amqp_url: str,
    pool: asyncpg.Pool,
) -> None:
    """Each refused body gets 422 with the reason and rule its dead letter gets when published
    over AMQP to the running worker (compared with the worker's request.dead_lettered reply)."""
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    async with Publisher.connect(amqp_url) as publisher:
        for n, (path, body, content_type, reason, rule) in enumerate(_refused_bodies()):
            response = await client.post(
                path, content=body, headers={**bearer(SUBMITTER), "Content-Type": content_type}
            )
            assert response.status_code == 422, (reason, response.text)
            problem = response.json()
            assert (problem["reason"], problem["rule"]) == (reason, rule), problem
            assert problem["detail"]
            if rule:
                assert rule in problem["detail"]
            routing_key = request_routing_key(SUBMIT_ROUTES[path])
            await publisher.publish_raw(
                body,
                routing_key,
                content_type=content_type,
                reply_to=replies.name,
                correlation_id=str(n),
            )
            message = await _next(replies)
            reply = orjson.loads(message.body)
            assert (reply["event_type"], reply["reason"], reply.get("rule")) == (
                "request.dead_lettered",
                reason,
                rule,
            ), reply
            await message.ack()
    assert await pool.fetchval("SELECT count(*) FROM api_submissions") == 0


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    message: Any = await wait_for(lambda: queue.get(fail=False), within_s=10)
    return message  # type: ignore[no-any-return]


async def test_tokens_and_roles(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    """No token or an unknown one: 401 with a Bearer challenge; a role too low: 403; each with a
    clear Problem body. /health and the OpenAPI document need no token."""
    body = sample("forecast")
    missing = await client.post("/forecast", json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["reason"] == "unauthorized"
    wrong = await client.get("/runs", headers=bearer("x" * 32))
    assert (wrong.status_code, wrong.json()["reason"]) == (401, "unauthorized")
    basic = await client.get("/runs", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401
    reader = await client.post("/forecast", json=body, headers=bearer(READER))
    assert reader.status_code == 403
    assert reader.json() == {
        "reason": "forbidden",
        "rule": None,
        "detail": "ana has role reader; this needs submitter or above",
        "request_id": None,
    }
    submitter = await client.post("/dead-letters/replay", json={}, headers=bearer(SUBMITTER))
    assert submitter.status_code == 403
    assert (await client.get("/runs", headers=bearer(READER))).status_code == 200
    assert (await client.get("/runs", headers=bearer(OPERATOR))).status_code == 200
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/healthz")).json() == {"status": "alive"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    document = (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert await pool.fetchval("SELECT count(*) FROM api_submissions") == 0


async def test_run_list_filters_and_cursor_pages(
    settings: Settings, client: httpx.AsyncClient, amqp_url: str, pool: asyncpg.Pool
) -> None:
    docs = generate_requests(24, seed=21, id_prefix="list")
    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_many(parse_request(d) for d in docs)
    await wait_for(
        lambda: pool.fetchval("SELECT count(*) = 24 FROM optimization_runs"), within_s=30
    )
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/runs", params=params, headers=bearer(READER))).json()
        seen += [item["request_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(d["request_id"] for d in docs)
    assert len(seen) == len(set(seen))

    forecasts = (
        await client.get("/runs", params={"type": "forecast"}, headers=bearer(READER))
    ).json()["items"]
    assert forecasts
    assert {i["request_type"] for i in forecasts} == {"forecast"}
    region = docs[0]["region"]
    by_region = (
        await client.get("/runs", params={"region": region}, headers=bearer(READER))
    ).json()["items"]
    assert {i["region"] for i in by_region} == {region}
    assert len(by_region) == sum(d["region"] == region for d in docs)
    day = min(d["forecast_date"] for d in docs)
    first_day = (
        await client.get(
            "/runs",
            params={"forecast_from": day, "forecast_to": day, "status": "completed"},
            headers=bearer(READER),
        )
    ).json()["items"]
    assert {i["forecast_date"] for i in first_day} == {day}
    bad = await client.get("/runs", params={"cursor": "nope"}, headers=bearer(READER))
    assert (bad.status_code, bad.json()["reason"]) == (422, "invalid_cursor")
    unknown = await client.get("/runs/no-such-request", headers=bearer(READER))
    assert (unknown.status_code, unknown.json()["reason"]) == (404, "not_found")


async def test_health_reports_each_component(settings: Settings, pool: asyncpg.Pool) -> None:
    async with api_client(settings) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok"
        assert {health[c]["state"] for c in ("broker", "database", "qnn")} == {"up"}
        # A database whose schema is older than the code (0005_api not applied) is not ready.
        newest = version_number(migration_files()[-1][0])
        await pool.execute("DELETE FROM schema_migrations WHERE version = '0005_api'")
        try:
            response = await client.get("/health")
            assert response.status_code == 503
            assert response.json()["database"]["state"] == "down"
            detail = response.json()["database"]["detail"]
            assert f"code needs {newest} (missing 0005)" in detail
            assert (await client.get("/readyz")).status_code == 503
        finally:
            await pool.execute("INSERT INTO schema_migrations (version) VALUES ('0005_api')")
    closed = settings.model_copy(update={"qnn_url": "http://127.0.0.1:9"})
    async with api_client(closed) as client:
        response = await client.get("/health")
        assert response.status_code == 200
        health = response.json()
        assert (health["status"], health["qnn"]["state"]) == ("degraded", "down")
        assert health["broker"]["state"] == health["database"]["state"] == "up"


async def test_dead_letters_listed_and_replayed_with_an_audit_row(
    settings: Settings, amqp: AbstractRobustConnection, amqp_url: str, pool: asyncpg.Pool
) -> None:
    doc = sample("forecast", prefix="dl")
    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_raw(
            orjson.dumps(doc),
            "request.forecast",
            content_type="text/plain",
            message_id=doc["request_id"],
        )
    async with api_client(settings) as client:

        async def listed() -> list[dict[str, Any]]:
            response = await client.get("/dead-letters", headers=bearer(READER))
            return list(response.json())

        async with running_worker(settings):
            letters = await wait_for(listed, within_s=15)
        assert [(d["message_id"], d["reason"]) for d in letters] == [
            (doc["request_id"], "unsupported_content_type")
        ]
        assert letters[0]["dead_lettered_at"].endswith("Z"), letters  # in UTC
        # Replayed with no worker running, so the replayed letter waits in eglo.requests.
        # (test_replay_with_a_worker_running_takes_a_snapshot: with one.)
        refused = await client.post(
            "/dead-letters/replay", json={"reason": "invalid_json"}, headers=bearer(READER)
        )
        assert refused.status_code == 403
        replay = await client.post(
            "/dead-letters/replay",
            json={"reason": "unsupported_content_type", "limit": 10},
            headers=bearer(OPERATOR),
        )
        assert replay.status_code == 200, replay.text
        assert replay.json() == {"replayed": 1, "kept": 0}
    audit = await pool.fetch("SELECT actor, role, action, target, details, outcome FROM audit_log")
    assert [dict(r) for r in audit] == [
        {
            "actor": "olga",
            "role": "operator",
            "action": "dead_letters.replay",
            "target": "unsupported_content_type",
            "details": {
                "reason": "unsupported_content_type",
                "limit": 10,
                "replayed": 1,
                "kept": 0,
            },
            "outcome": "ok",
        }
    ]
    async with amqp.channel() as channel:
        requests = await channel.declare_queue(topology.REQUESTS_QUEUE, passive=True)
        assert requests.declaration_result.message_count == 1


async def test_replay_with_a_worker_running_takes_a_snapshot(
    client: httpx.AsyncClient, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """POST /dead-letters/replay while the worker consumes: the replayed letters are not JSON, so
    each is dead-lettered again at once, behind the letters the replay has yet to look at. The
    replay takes the letters that were in the DLQ when it started, each once."""
    bad = [f"loop-{i}" for i in range(12)]
    async with Publisher.connect(amqp_url) as publisher:
        for message_id in bad:
            await publisher.publish_raw(b"{oops", "request.forecast", message_id=message_id)
        await publisher.publish_raw(
            b"{}", "request.forecast", content_type="text/plain", message_id="other"
        )

    async def dead_letters() -> int:
        async with amqp.channel() as channel:
            queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
            return int(queue.declaration_result.message_count or 0)

    await wait_for(lambda: _equals(dead_letters(), len(bad) + 1))
    replay = await client.post(
        "/dead-letters/replay",
        json={"reason": "invalid_json", "limit": 100},
        headers=bearer(OPERATOR),
    )
    assert replay.status_code == 200, replay.text
    assert replay.json() == {"replayed": len(bad), "kept": 1}
    await wait_for(lambda: _equals(dead_letters(), len(bad) + 1))
    listed = (await client.get("/dead-letters", headers=bearer(READER))).json()
    assert sorted(d["message_id"] for d in listed) == sorted([*bad, "other"])


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_anomalies_listed_and_resolved_with_an_audit_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    run = (
        await client.post("/forecast?wait=15", json=sample("forecast"), headers=bearer(SUBMITTER))
    ).json()
    anomaly_id = await pool.fetchval(
        "INSERT INTO anomalies (optimization_run_id, anomaly_type, severity, description) "
        "VALUES ($1, 'input_spike', 'high', 'a test spike') RETURNING id",
        uuid.UUID(run["run_id"]),
    )
    listed = (
        await client.get("/anomalies", params={"resolved": False}, headers=bearer(READER))
    ).json()
    assert anomaly_id in {uuid.UUID(a["id"]) for a in listed}
    assert {a["request_id"] for a in listed} == {run["request_id"]}
    in_run = (await client.get(f"/runs/{run['request_id']}", headers=bearer(READER))).json()
    assert anomaly_id in {uuid.UUID(a["id"]) for a in in_run["anomalies"]}

    assert (
        await client.post(f"/anomalies/{anomaly_id}/resolve", headers=bearer(SUBMITTER))
    ).status_code == 403
    resolved = await client.post(f"/anomalies/{anomaly_id}/resolve", headers=bearer(OPERATOR))
    assert resolved.status_code == 200, resolved.text
    assert resolved.json() == {"anomaly_id": str(anomaly_id), "source": "eglo", "resolved": True}
    assert await pool.fetchval("SELECT resolved FROM anomalies WHERE id = $1", anomaly_id)
    missing = uuid.uuid4()
    gone = await client.post(f"/anomalies/{missing}/resolve", headers=bearer(OPERATOR))
    assert (gone.status_code, gone.json()["reason"]) == (404, "not_found")
    audit = await pool.fetch("SELECT actor, action, target, outcome FROM audit_log ORDER BY id")
    assert [tuple(r) for r in audit] == [
        ("olga", "anomaly.resolve", str(anomaly_id), "ok"),
        ("olga", "anomaly.resolve", str(missing), "not_found"),
    ]


async def test_similar_runs_and_accuracy(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    """Similar runs by their embeddings (written here as the embedder would), nearest first."""
    runs = []
    for n in range(3):
        body = sample("forecast", seed=40 + n, prefix="sim")
        response = await client.post("/forecast?wait=15", json=body, headers=bearer(SUBMITTER))
        runs.append(response.json())
    for n, run in enumerate(runs):
        vector = [1.0, float(n)] + [0.0] * 62
        await pool.execute(
            "INSERT INTO optimization_embeddings (optimization_run_id, model, dimensions, "
            "embedding) VALUES ($1, 'features-v1', 64, $2::text::vector)",
            uuid.UUID(run["run_id"]),
            str(vector).replace(" ", ""),
        )
    response = await client.get(runs[0]["links"]["similar"] + "?k=2", headers=bearer(READER))
    assert response.status_code == 200, response.text
    assert [s["request_id"] for s in response.json()] == [
        runs[1]["request_id"],
        runs[2]["request_id"],
    ]
    none = await client.get(
        f"/runs/{runs[0]['request_id']}/similar?model=all-MiniLM-L6-v2", headers=bearer(READER)
    )
    assert (none.status_code, none.json()["reason"]) == (404, "no_embedding")
    accuracy = await client.get("/accuracy", headers=bearer(READER))
    assert (accuracy.status_code, accuracy.json()) == (200, [])
