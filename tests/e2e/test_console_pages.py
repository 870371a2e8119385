"""Every console page with realistic contents, in a real browser (Playwright driving Debian's
chromium): a batch of all four request types, dead letters of three reasons and anomalies. Each
page must load all its images and fit the window's width (nothing to scroll sideways); the
screenshots go to .eglo/console/ to be looked at."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.api_support import OPERATOR, serving
from tests.support.harness import queue_depth, running_worker, wait_for
from worker.settings import Settings

SHOTS = Path(__file__).resolve().parents[2] / ".eglo" / "console"
WIDTH = 1280
UTC_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")


async def _column(page: Any, table: str, index: int) -> list[str]:
    """The texts of one column (0-based) of a table's body rows."""
    cells: list[str] = await page.eval_on_selector_all(
        f"#{table} tbody tr", f"rows => rows.map(r => r.cells[{index}].innerText.trim())"
    )
    return cells


async def _populate(
    settings: Settings, amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool
) -> dict[str, str]:
    """A stored batch, three dead letters and two anomalies; the request_id of one run a type."""
    docs = generate_requests(12, seed=21, id_prefix="page")
    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_many(parse_request(d) for d in docs)
        bad = docs[0]
        await publisher.publish_raw(
            orjson.dumps(bad), "request.forecast", content_type="text/plain", message_id="as-text"
        )
        await publisher.publish_raw(b"{oops", "request.storage", message_id="not-json")
        forecast = next(d for d in docs if d["request_type"] == "forecast")
        odd = {**forecast, "request_id": "bad-horizon"}
        odd["payload"] = {**odd["payload"], "horizon_steps": -3}
        await publisher.publish_raw(orjson.dumps(odd), "request.forecast", message_id="bad-horizon")
    await wait_for(
        lambda: pool.fetchval(
            "SELECT count(*) = $1 FROM optimization_runs WHERE request_id LIKE 'page-%'", len(docs)
        )
    )
    await wait_for(lambda: _is(queue_depth(amqp, topology.DEAD_LETTER_QUEUE), 3))
    runs = {
        r["request_type"]: r["request_id"]
        for r in await pool.fetch(
            "SELECT DISTINCT ON (request_type) request_type, request_id FROM optimization_runs "
            "WHERE status = 'completed' ORDER BY request_type, request_id"
        )
    }
    assert runs.keys() == {"forecast", "storage", "grid_switch", "simulation"}
    forecast_run = await pool.fetchval(
        "SELECT id FROM optimization_runs WHERE request_id = $1", runs["forecast"]
    )
    await pool.execute(
        "INSERT INTO anomalies (optimization_run_id, anomaly_type, severity, description) VALUES "
        "($1, 'input_spike', 'high', 'historical load jumps 4.2x between two steps'), "
        "($1, 'forecast_out_of_range', 'medium', 'the forecast leaves the regional capacity')",
        forecast_run,
    )
    return runs


async def _is(value: object, expected: int) -> bool:
    return bool(await value == expected)  # type: ignore[misc]


async def test_console_pages_render_whole(
    settings: Settings, amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool
) -> None:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (Debian's package; .ci/run installs it)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with running_worker(settings):
        runs = await _populate(settings, amqp_url, amqp, pool)
    pages = {
        "runs": "/console/runs",
        **{f"{t}-run": f"/console/runs/{rid}" for t, rid in runs.items()},
        "dead-letters": "/console/dead-letters",
        "anomalies": "/console/anomalies",
        "accuracy": "/console/accuracy",
        "submit": "/console/submit",
    }
    async with serving(settings) as base_url, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
        await page.goto(f"{base_url}/console/login")
        await page.fill("input[name=token]", OPERATOR)
        await page.click("button[type=submit]")
        await page.wait_for_url("**/console/runs")
        for name, path in pages.items():
            response = await page.goto(base_url + path)
            assert response is not None and response.status == 200, (name, response)
            await page.wait_for_load_state("load")
            broken = await page.eval_on_selector_all(
                "img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0).length"
            )
            assert broken == 0, f"{name}: {broken} image(s) did not load"
            await page.screenshot(path=str(SHOTS / f"page-{name}.png"), full_page=True)
            scroll_width = await page.evaluate("document.documentElement.scrollWidth")
            assert scroll_width <= WIDTH, f"{name} is {scroll_width}px wide in a {WIDTH}px window"
        await page.goto(base_url + "/console/dead-letters")
        letters = await page.inner_text("#letters")
        assert {"as-text", "not-json", "bad-horizon"} <= set(letters.split())
        assert "3 dead letter(s) shown" in await page.inner_text("p.count")
        # Times in UTC with the zone marked, on every list that shows them.
        dead_lettered = await _column(page, "letters", 0)
        assert len(dead_lettered) == 3 and all(UTC_TIME.match(t) for t in dead_lettered), (
            dead_lettered
        )
        await page.goto(base_url + "/console/runs")
        stored = await _column(page, "runs", 5)
        assert len(stored) >= 12 and all(UTC_TIME.match(t) for t in stored), stored
        await page.goto(base_url + "/console/anomalies")
        anomalies = await page.inner_text("#anomalies")
        assert "input_spike" in anomalies and "forecast_out_of_range" in anomalies
        detected = await _column(page, "anomalies", 0)
        assert len(detected) >= 2 and all(UTC_TIME.match(t) for t in detected), detected
        await browser.close()
