"""Fault knobs against a real running emulator: rates, Retry-After, hangs, garbage, downtime."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import pytest_asyncio
from pydantic import ValidationError

from contracts.qnn import HEALTH_PATH, PREDICT_PATH, MalformedResponse, parse_predict_response
from contracts.results import RESULT_MODELS
from qnn_emulator.faults import Fault, FaultInjector
from qnn_emulator.samples import forecast_request, predict_body
from qnn_emulator.server import running_emulator
from qnn_emulator.settings import EmulatorSettings, FaultKnobs

CALLS = 200
BODY = predict_body(forecast_request("fault", steps=48, horizon=12))
JSON = {"Content-Type": "application/json"}


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def _call(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url + PREDICT_PATH, data=BODY, headers=JSON) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _is_usable(raw: bytes) -> bool:
    """Whether the worker could get a valid forecast result out of this body."""
    try:
        result, _ = parse_predict_response("forecast", raw)
        RESULT_MODELS["forecast"].model_validate(result)
    except (MalformedResponse, ValidationError):
        return False
    return True


def _expect_rate(count: int, rate: float, calls: int = CALLS) -> None:
    sigma = (calls * rate * (1 - rate)) ** 0.5
    assert abs(count - calls * rate) <= 4 * sigma, (count, calls * rate)


async def test_error_rate(http: aiohttp.ClientSession) -> None:
    """error_rate=0.2 gives ~20% 500/503 (both kinds), the rest are good answers."""
    async with running_emulator(EmulatorSettings.isolated(error_rate=0.2, seed=11)) as url:
        outcomes = [await _call(http, url) for _ in range(CALLS)]
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) <= {200, 500, 503} and statuses[500] > 0 and statuses[503] > 0
    _expect_rate(statuses[500] + statuses[503], 0.2)
    for status, headers, raw in outcomes:
        if status == 200:
            assert _is_usable(raw)
        else:
            assert headers["X-Emulator-Fault"] == "error"
            assert orjson.loads(raw)["success"] is False


async def test_throttle_rate_sends_integer_retry_after(http: aiohttp.ClientSession) -> None:
    """throttle_rate=0.25 gives ~25% 429s, each with Retry-After = retry_after_s (integer)."""
    settings = EmulatorSettings.isolated(throttle_rate=0.25, retry_after_s=3, seed=12)
    async with running_emulator(settings) as url:
        outcomes = [await _call(http, url) for _ in range(CALLS)]
    throttled = [headers for status, headers, _ in outcomes if status == 429]
    _expect_rate(len(throttled), 0.25)
    assert all(h["Retry-After"] == "3" for h in throttled)
    assert {status for status, _, _ in outcomes} == {200, 429}


async def test_garbage_rate_bodies_are_unusable(http: aiohttp.ClientSession) -> None:
    """garbage_rate=0.3: ~30% of 200s carry bodies the worker cannot use, in several shapes."""
    async with running_emulator(EmulatorSettings.isolated(garbage_rate=0.3, seed=13)) as url:
        outcomes = [await _call(http, url) for _ in range(CALLS)]
    assert {status for status, _, _ in outcomes} == {200}
    garbage = [(h, raw) for _, h, raw in outcomes if h.get("X-Emulator-Fault") == "garbage"]
    _expect_rate(len(garbage), 0.3)
    assert not any(_is_usable(raw) for _, raw in garbage)
    assert all(_is_usable(raw) for _, h, raw in outcomes if "X-Emulator-Fault" not in h)
    shapes = {(h["Content-Type"].split(";")[0], raw[:1]) for h, raw in garbage}
    assert len(shapes) >= 4  # truncated JSON, HTML page, array, empty, binary ...


async def test_same_seed_same_fault_sequence(http: aiohttp.ClientSession) -> None:
    """Two emulators with one seed fail the same calls, in the same way."""
    sequences = []
    for _ in range(2):
        settings = EmulatorSettings.isolated(error_rate=0.2, throttle_rate=0.2, seed=99)
        async with running_emulator(settings) as url:
            sequences.append([(await _call(http, url))[0] for _ in range(40)])
    assert sequences[0] == sequences[1]
    assert len(set(sequences[0])) > 1


def test_injector_partitions_unit_interval() -> None:
    """Combined rates are each honoured: draws split by the partition of [0, 1)."""
    knobs = FaultKnobs(error_rate=0.1, throttle_rate=0.2, hang_rate=0.05, garbage_rate=0.15)
    injector = FaultInjector(knobs, seed=5)
    counts = Counter(injector.draw() for _ in range(20_000))
    for fault, rate in (
        (Fault.ERROR, 0.1),
        (Fault.THROTTLE, 0.2),
        (Fault.HANG, 0.05),
        (Fault.GARBAGE, 0.15),
        (None, 0.5),
    ):
        _expect_rate(counts[fault], rate, 20_000)


def test_rates_above_one_are_rejected() -> None:
    """Fault rates that add up past 1 cannot be configured."""
    with pytest.raises(ValidationError):
        EmulatorSettings.isolated(error_rate=0.6, throttle_rate=0.5)


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every knob can come from EGLO_EMULATOR_<NAME>."""
    monkeypatch.setenv("EGLO_EMULATOR_ERROR_RATE", "0.25")
    monkeypatch.setenv("EGLO_EMULATOR_HANG_S", "2.5")
    monkeypatch.setenv("EGLO_EMULATOR_API_KEY", "k")
    settings = EmulatorSettings()
    assert settings.error_rate == 0.25 and settings.hang_s == 2.5
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"


async def test_hang_outlasts_client_timeout(http: aiohttp.ClientSession) -> None:
    """hang_rate=1 holds the call past the client's timeout; after hang_s it answers 504."""
    async with running_emulator(EmulatorSettings.isolated(hang_rate=1.0, hang_s=0.6)) as url:
        started = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                url + PREDICT_PATH,
                data=BODY,
                headers=JSON,
                timeout=aiohttp.ClientTimeout(total=0.2),
            ) as resp:
                await resp.read()
        assert time.perf_counter() - started < 0.5
        status, headers, _ = await _call(http, url)
        assert status == 504 and headers["X-Emulator-Fault"] == "hang"
        async with http.get(url + HEALTH_PATH) as resp:  # health is never faulted
            assert resp.status == 200


async def test_shutdown_does_not_wait_out_a_hang(http: aiohttp.ClientSession) -> None:
    """Stopping the emulator releases calls hung for the default 600 s at once."""
    started = time.perf_counter()
    async with running_emulator(EmulatorSettings.isolated(hang_rate=1.0)) as url:
        pending = asyncio.create_task(_call(http, url))
        await asyncio.sleep(0.2)
        assert not pending.done()
    assert time.perf_counter() - started < 5.0
    try:
        status, _, _ = await pending
        assert status == 504
    except aiohttp.ClientError:
        pass  # the connection may close before the answer is written


async def test_latency_is_added_and_reported(http: aiohttp.ClientSession) -> None:
    """latency_ms delays predict (not health) and shows in execution_time_ms."""
    async with running_emulator(EmulatorSettings.isolated(latency_ms=150)) as url:
        started = time.perf_counter()
        status, _, raw = await _call(http, url)
        elapsed = time.perf_counter() - started
        assert status == 200 and elapsed >= 0.15
        assert orjson.loads(raw)["data"]["execution"]["execution_time_ms"] >= 150
        started = time.perf_counter()
        async with http.get(url + HEALTH_PATH) as resp:
            assert resp.status == 200
        assert time.perf_counter() - started < 0.15


async def test_admin_switch_takes_the_whole_api_down(http: aiohttp.ClientSession) -> None:
    """`POST /admin/health?ok=false` fails health and predict with 503 until `ok=true`."""
    async with running_emulator(EmulatorSettings.isolated()) as url:
        async with http.post(url + "/admin/health", params={"ok": "false"}) as resp:
            assert await resp.json() == {"healthy": False}
        async with http.get(url + HEALTH_PATH) as resp:
            assert resp.status == 503
        assert (await _call(http, url))[0] == 503
        async with http.get(url + "/api/v1/monitoring/anomalies/") as resp:
            assert resp.status == 503
        async with http.post(url + "/admin/health", params={"ok": "true"}) as resp:
            assert await resp.json() == {"healthy": True}
        async with http.get(url + HEALTH_PATH) as resp:
            assert resp.status == 200
        assert (await _call(http, url))[0] == 200


async def test_start_unhealthy(http: aiohttp.ClientSession) -> None:
    """unhealthy=True starts the emulator down."""
    async with running_emulator(EmulatorSettings.isolated(unhealthy=True)) as url:
        resp = await http.get(url + HEALTH_PATH)
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable"}


async def test_faults_can_change_at_run_time(http: aiohttp.ClientSession) -> None:
    """`POST /admin/faults` updates knobs (validated); later calls follow the new knobs."""
    async with running_emulator(EmulatorSettings.isolated(seed=1)) as url:
        assert (await _call(http, url))[0] == 200
        async with http.post(
            url + "/admin/faults", json={"throttle_rate": 1.0, "retry_after_s": 7}
        ) as resp:
            knobs = await resp.json()
        assert knobs["throttle_rate"] == 1.0 and knobs["error_rate"] == 0.0
        status, headers, _ = await _call(http, url)
        assert status == 429 and headers["Retry-After"] == "7"
        async with http.post(url + "/admin/faults", json={"error_rate": 0.5}) as resp:
            assert resp.status == 422  # 1.0 + 0.5 > 1
        async with http.post(url + "/admin/faults", json={"throttle_rate": 0}) as resp:
            assert resp.status == 200
        assert (await _call(http, url))[0] == 200
        async with http.get(
            url + "/api/v1/monitoring/models/PRETRAINED_QNN_GRID_MODEL/logs"
        ) as resp:
            faults = [e["fault"] for e in await resp.json()]
        assert faults == [None, "throttle", None]
