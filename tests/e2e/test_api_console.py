"""The operator console (/console): sign-in, roles and CSRF over plain HTTP, then in a real
browser — Playwright driving Debian's chromium — submitting a forecast, opening its run page,
seeing its plot, and replaying a dead letter. Screenshots go to .eglo/console/."""

from __future__ import annotations

import re
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from producers.publisher import Publisher
from tests.support.api_support import (
    OPERATOR,
    READER,
    SUBMITTER,
    api_client,
    sample,
    serving,
)
from tests.support.harness import running_worker
from tests.support.runs import insert_run
from worker.api.console import COOKIE, csrf_token
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ".eglo" / "console"
UTC_TIME = re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\b")


async def _sign_in(client: httpx.AsyncClient, token: str) -> None:
    response = await client.post("/console/login", data={"token": token, "next": "/console/runs"})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console/runs"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie


async def test_console_signs_in_checks_roles_and_csrf(settings: Settings) -> None:
    async with api_client(settings) as client:
        first = await client.get("/console/runs")
        assert first.status_code == 303
        assert first.headers["location"].startswith("/console/login?next=")
        bad = await client.post("/console/login", data={"token": "x" * 30})
        assert bad.status_code == 401
        assert "Unknown token" in bad.text

        await _sign_in(client, READER)
        runs = await client.get("/console/runs")
        assert runs.status_code == 200 and "No runs match." in runs.text
        assert "ana (reader)" in runs.text
        # A reader sees the dead letters but gets no replay form, and may not post one.
        letters = await client.get("/console/dead-letters")
        assert letters.status_code == 200 and 'id="replay"' not in letters.text
        replay = await client.post(
            "/console/dead-letters/replay", data={"csrf": csrf_token(READER)}
        )
        assert replay.status_code == 403
        assert (await client.get("/console/submit")).status_code == 403

        client.cookies.clear()
        await _sign_in(client, OPERATOR)
        no_csrf = await client.post("/console/dead-letters/replay", data={"limit": "1"})
        assert no_csrf.status_code == 403 and "Form expired" in no_csrf.text
        ok = await client.post(
            "/console/dead-letters/replay", data={"limit": "1", "csrf": csrf_token(OPERATOR)}
        )
        assert ok.status_code == 303
        assert "Replayed+0+dead+letter" in ok.headers["location"]
        refused = await client.post(
            "/console/submit",
            data={"type": "storage", "body": "{oops", "csrf": csrf_token(OPERATOR)},
        )
        assert refused.status_code == 422
        assert "invalid_json" in refused.text
        odd = await client.get("/console/runs", params={"region": "a\x00b", "from": "junk"})
        assert odd.status_code == 200 and "no control ones" in odd.text
        assert (await client.get("/console/runs/a%00b")).status_code == 404
        assert (await client.get("/console/runs/a%00b/plot.png")).status_code == 404
        assert (await client.get("/console/accuracy")).status_code == 200
        assert (await client.get("/console/anomalies")).status_code == 200
        assert COOKIE in client.cookies
        # The console is not part of the API's OpenAPI document.
        document = (await client.get("/openapi.json")).json()
        assert not [p for p in document["paths"] if p.startswith("/console")]


async def test_console_lists_show_times_in_utc_with_the_zone(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """A run stored at 00:46:01 +02:00 (22:46:01 UTC) and its anomaly: the runs list, the run's
    page and the anomalies list show that instant in UTC, seconds included, marked `UTC`."""
    run_id = await insert_run(
        pool,
        forecast_date=date(2026, 12, 6),
        result={"forecast": [100.0] * 24, "resolution_minutes": 60},
        request_id="console-utc",
        created_at=datetime(2026, 12, 6, 0, 46, 1, tzinfo=timezone(timedelta(hours=2))),
    )
    await pool.execute(
        "INSERT INTO anomalies (optimization_run_id, anomaly_type, severity, description, "
        "detected_at) VALUES ($1, 'input_spike', 'high', 'x', '2026-12-06 01:07:09+02')",
        run_id,
    )
    async with api_client(settings) as client:
        await _sign_in(client, READER)
        runs = (await client.get("/console/runs")).text
        assert ">2026-12-05 22:46:01 UTC</td>" in runs
        run = (await client.get("/console/runs/console-utc")).text
        assert "<dd>2026-12-05 22:46:01 UTC</dd>" in run
        anomalies = (await client.get("/console/anomalies")).text
        assert ">2026-12-05 23:07:09 UTC</td>" in anomalies


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium (Debian's package; .ci/run installs it)")
    return path


async def test_console_in_a_browser(settings: Settings, amqp_url: str, pool: asyncpg.Pool) -> None:
    from playwright.async_api import async_playwright

    chromium = _chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    bad = sample("forecast", prefix="console-bad")
    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_raw(
            orjson.dumps(bad),
            "request.forecast",
            content_type="text/plain",
            message_id=bad["request_id"],
        )
    async with (
        running_worker(settings),
        serving(settings) as base_url,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{base_url}/console/submit")
        assert "/console/login" in page.url
        await page.fill("input[name=token]", SUBMITTER)
        await page.click("button[type=submit]")
        await page.wait_for_url(re.compile(r".*/console/submit$"))

        # Submit the example forecast: the console waits for the run and opens its page.
        await page.click("#send")
        await page.wait_for_url(re.compile(r".*/console/runs/api-[0-9a-f]+$"), timeout=20_000)
        assert await page.inner_text("#status") == "completed"
        plot = page.locator("#plot")
        await plot.wait_for()
        await page.wait_for_function(
            "document.querySelector('#plot').complete"
            " && document.querySelector('#plot').naturalWidth > 0"
        )
        assert await plot.evaluate("img => img.naturalWidth") > 400
        await page.screenshot(path=str(SHOTS / "forecast-run.png"), full_page=True)
        request_id = page.url.rsplit("/", 1)[1]

        # A storage run from the example of its type.
        await page.goto(f"{base_url}/console/submit?type=storage")
        await page.click("#send")
        await page.wait_for_url(re.compile(r".*/console/runs/api-[0-9a-f]+$"), timeout=20_000)
        assert await page.inner_text("#status") == "completed"
        await page.wait_for_function(
            "document.querySelector('#plot').complete"
            " && document.querySelector('#plot').naturalWidth > 0"
        )
        await page.screenshot(path=str(SHOTS / "storage-run.png"), full_page=True)

        await page.goto(f"{base_url}/console/runs")
        runs = await page.inner_text("#runs")
        assert request_id in runs and UTC_TIME.search(runs), runs
        await page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

        # An operator replays the dead letter from its page.
        await page.click("text=Sign out")
        await page.fill("input[name=token]", OPERATOR)
        await page.click("button[type=submit]")
        await page.goto(f"{base_url}/console/dead-letters")
        letters = await page.inner_text("#letters")
        assert bad["request_id"] in letters and "unsupported_content_type" in letters
        assert UTC_TIME.search(letters), letters  # when it was dead-lettered
        await page.screenshot(path=str(SHOTS / "dead-letters.png"), full_page=True)
        await page.select_option("select[name=reason]", "unsupported_content_type")
        await page.click("#replay button[type=submit]")
        await page.wait_for_selector(".flash")
        assert "Replayed 1 dead letter(s)" in await page.inner_text(".flash")
        await browser.close()
    audit = await pool.fetch("SELECT actor, action, outcome FROM audit_log")
    assert [tuple(r) for r in audit] == [("olga", "dead_letters.replay", "ok")]
