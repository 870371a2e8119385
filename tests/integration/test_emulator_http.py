"""HTTP tests against a real running emulator: endpoints, validation, auth and monitoring."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import orjson
import pytest
import pytest_asyncio

from contracts.qnn import HEALTH_PATH, PREDICT_PATH, parse_predict_response
from contracts.requests import AnyRequest
from contracts.results import RESULT_MODELS, ExecutionMetadata
from qnn_emulator.execution import DEVICE, circuit_shape
from qnn_emulator.predictors import problem_size, runs_inline
from qnn_emulator.samples import (
    forecast_request,
    grid_switch_request,
    predict_body,
    simulation_request,
    storage_request,
    synthetic_load,
)
from qnn_emulator.server import running_emulator
from qnn_emulator.settings import DEFAULT_MODEL_ID, EmulatorSettings

ANOMALIES = "/api/v1/monitoring/anomalies/"
LOGS = f"/api/v1/monitoring/models/{DEFAULT_MODEL_ID}/logs"
JSON = {"Content-Type": "application/json"}


@pytest_asyncio.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    """One fault-free emulator shared by this module's tests."""
    async with running_emulator(EmulatorSettings.isolated(seed=1)) as url:
        yield url


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def _metadata(raw: object) -> ExecutionMetadata:
    """parse_predict_response's metadata, whether it hands back the model or its fields."""
    if isinstance(raw, ExecutionMetadata):
        return raw
    return ExecutionMetadata.model_validate(raw)


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    async with http.post(url + PREDICT_PATH, data=body, headers={**JSON, **(headers or {})}) as r:
        return r.status, await r.read()


async def test_health(base_url: str, http: aiohttp.ClientSession) -> None:
    """GET health answers 200 {"status": "ok"}."""
    async with http.get(base_url + HEALTH_PATH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "request_obj",
    [
        forecast_request("http-forecast", steps=14 * 24),
        storage_request("http-storage"),
        storage_request("http-storage-export", with_load=False),
        grid_switch_request("http-grid"),
        simulation_request("http-sim"),
        simulation_request("http-sim-fc", base=forecast_request(steps=48)),
        simulation_request("http-sim-grid", base=grid_switch_request()),
        simulation_request(  # big enough to run in the executor, off the event loop
            "http-sim-big", base=forecast_request(steps=2000, resolution_minutes=15, horizon=96)
        ),
    ],
    ids=lambda r: r.request_id,
)
async def test_predict_is_accepted_by_the_worker_contracts(
    base_url: str, http: aiohttp.ClientSession, request_obj: AnyRequest
) -> None:
    """Each request type's answer parses with contracts.qnn and validates as its result model."""
    status, raw = await _post(
        http, base_url, predict_body(request_obj, mode="hybrid", optimization_level=2)
    )
    assert status == 200, raw
    doc = orjson.loads(raw)
    assert doc["success"] is True and doc["data"]["model_id"] == DEFAULT_MODEL_ID
    result, raw_meta = parse_predict_response(request_obj.request_type, raw)
    RESULT_MODELS[request_obj.request_type].model_validate(result)
    meta = _metadata(raw_meta)
    shape = circuit_shape(problem_size(request_obj.payload), 2)
    assert meta.model_id == DEFAULT_MODEL_ID and meta.device == DEVICE
    assert (meta.n_qubits, meta.circuit_depth) == (shape.n_qubits, shape.circuit_depth)
    assert meta.execution_time_ms is not None and meta.execution_time_ms > 0
    assert meta.cost_usd is not None and meta.cost_usd > 0
    assert doc["data"]["execution"]["mode"] == "hybrid"


def test_big_simulation_leaves_the_event_loop() -> None:
    """The executor path above is really taken for the big simulation."""
    big = simulation_request(base=forecast_request(steps=2000, resolution_minutes=15, horizon=96))
    assert not runs_inline(big.payload)
    assert runs_inline(forecast_request().payload)


async def test_forecast_answer_has_the_requested_shape(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """Forecast, lower and upper have horizon_steps values in order, with level and resolution."""
    req = forecast_request("http-shape", steps=96 * 3, resolution_minutes=15, horizon=40)
    status, raw = await _post(http, base_url, predict_body(req))
    assert status == 200
    pred = orjson.loads(raw)["data"]["prediction"]
    assert len(pred["forecast"]) == len(pred["lower"]) == len(pred["upper"]) == 40
    assert all(
        lo <= f <= up
        for lo, f, up in zip(pred["lower"], pred["forecast"], pred["upper"], strict=True)
    )
    assert pred["interval_level"] == 0.9 and pred["resolution_minutes"] == 15


def _body_with(payload_patch: dict[str, object], request_type: str = "forecast") -> bytes:
    req = forecast_request("bad") if request_type == "forecast" else storage_request("bad")
    body = orjson.loads(predict_body(req))
    body["inputs"]["payload"].update(payload_patch)
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{not json", ""),
        (b"[]", ""),
        (orjson.dumps({"model_id": DEFAULT_MODEL_ID, "code": "x"}), "inputs"),
        (_body_with({"historical_loads": [1.0, 2.0]}), "historical_loads"),
        (_body_with({"historical_loads": [-1.0] * 30}), "historical_loads"),
        (_body_with({"horizon_steps": 0}), "horizon_steps"),
        (_body_with({"resolution_minutes": 7}), "resolution_minutes"),
        (_body_with({"surprise": 1}), "surprise"),
        (_body_with({"soc_initial_kwh": 999.0}, "storage"), "soc"),
        (
            orjson.dumps(
                {**orjson.loads(predict_body(forecast_request())), "optimization_level": 9}
            ),
            "optimization_level",
        ),
    ],
)
async def test_invalid_input_is_422(
    base_url: str, http: aiohttp.ClientSession, body: bytes, where: str
) -> None:
    """Malformed bodies and payloads that break the contracts get 422 validation_error."""
    status, raw = await _post(http, base_url, body)
    assert status == 422
    doc = orjson.loads(raw)
    assert doc["success"] is False
    assert doc["error"]["code"] == "validation_error"
    assert where in doc["error"]["message"] + orjson.dumps(doc["error"].get("details")).decode()


async def test_simulation_with_duplicate_scenarios_is_422(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """SimulationPayload's own validators apply (unique scenario names)."""
    body = orjson.loads(predict_body(simulation_request("dup")))
    body["inputs"]["payload"]["scenarios"] = [{"name": "a"}, {"name": "a"}]
    status, raw = await _post(http, base_url, orjson.dumps(body))
    assert status == 422
    assert "unique" in orjson.loads(raw)["error"]["message"]


async def test_unknown_model_is_404(base_url: str, http: aiohttp.ClientSession) -> None:
    """A model_id the emulator does not serve is refused."""
    status, raw = await _post(http, base_url, predict_body(forecast_request(), model_id="NOPE"))
    assert status == 404
    assert orjson.loads(raw)["error"]["code"] == "model_not_found"


async def test_anomalies_detect_resolve_and_filter(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """A spike in history is reported once, can be resolved, and the filter follows."""
    loads = synthetic_load(14 * 24, seed=3)
    loads[300] *= 3.0
    loads[310] = 0.0
    body = predict_body(forecast_request("spiky", loads=loads))
    for _ in range(2):  # a redelivery must not duplicate the anomaly
        assert (await _post(http, base_url, body))[0] == 200
    async with http.get(base_url + ANOMALIES) as resp:
        listed = [a for a in await resp.json() if a["request_id"] == "spiky"]
    kinds = sorted(a["anomaly_type"] for a in listed)
    assert kinds == ["load_drop", "load_spike"]
    spike = next(a for a in listed if a["anomaly_type"] == "load_spike")
    assert spike["severity"] in {"low", "medium", "high", "critical"}
    assert "index 300" in spike["description"] and spike["suggested_actions"]
    assert spike["resolved"] is False and spike["resolved_at"] is None
    assert spike["model_id"] == DEFAULT_MODEL_ID and spike["detected_at"].endswith("+00:00")

    async with http.post(f"{base_url}{ANOMALIES}{spike['id']}/resolve") as resp:
        assert resp.status == 200
        resolved = await resp.json()
    assert resolved["resolved"] is True and resolved["resolved_at"] is not None
    async with http.get(base_url + ANOMALIES, params={"resolved": "false"}) as resp:
        assert spike["id"] not in {a["id"] for a in await resp.json()}
    async with http.get(base_url + ANOMALIES.rstrip("/"), params={"resolved": "true"}) as resp:
        assert spike["id"] in {a["id"] for a in await resp.json()}
    async with http.post(f"{base_url}{ANOMALIES}anm-missing/resolve") as resp:
        assert resp.status == 404
    async with http.get(base_url + ANOMALIES, params={"resolved": "maybe"}) as resp:
        assert resp.status == 422


async def test_clean_history_raises_no_load_anomaly(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    """Ordinary noisy load is not flagged."""
    assert (await _post(http, base_url, predict_body(forecast_request("clean"))))[0] == 200
    async with http.get(base_url + ANOMALIES) as resp:
        assert not [a for a in await resp.json() if a["request_id"] == "clean"]


async def test_capacity_shortfall_is_an_anomaly(base_url: str, http: aiohttp.ClientSession) -> None:
    """Load beyond all source capacity is reported as a capacity_shortfall."""
    req = grid_switch_request("short", peak_kw=2000)
    assert (await _post(http, base_url, predict_body(req)))[0] == 200
    async with http.get(base_url + ANOMALIES) as resp:
        found = [a for a in await resp.json() if a["request_id"] == "short"]
    assert [a["anomaly_type"] for a in found] == ["capacity_shortfall"]


async def test_model_logs(base_url: str, http: aiohttp.ClientSession) -> None:
    """Each predict call is logged for its model, newest first, with a limit."""
    for i in range(3):
        status, _ = await _post(http, base_url, predict_body(grid_switch_request(f"log-{i}")))
        assert status == 200
    async with http.get(base_url + LOGS, params={"limit": "2"}) as resp:
        assert resp.status == 200
        logs = await resp.json()
    assert [e["request_id"] for e in logs] == ["log-2", "log-1"]
    entry = logs[0]
    assert entry["request_type"] == "grid_switch" and entry["status_code"] == 200
    assert entry["execution_time_ms"] > 0 and entry["cost_usd"] > 0 and entry["timestamp"]
    async with http.get(base_url + "/api/v1/monitoring/models/NOPE/logs") as resp:
        assert resp.status == 404


async def test_buffers_are_bounded(http: aiohttp.ClientSession) -> None:
    """Logs and anomalies keep only the configured number of newest entries."""
    settings = EmulatorSettings.isolated(log_buffer=5, anomaly_buffer=3)
    async with running_emulator(settings) as url:
        for i in range(8):
            req = grid_switch_request(f"ring-{i}", peak_kw=2000)
            assert (await _post(http, url, predict_body(req)))[0] == 200
        async with http.get(url + LOGS) as resp:
            assert [e["request_id"] for e in await resp.json()] == [
                f"ring-{i}" for i in range(7, 2, -1)
            ]
        async with http.get(url + ANOMALIES) as resp:
            assert [a["request_id"] for a in await resp.json()] == ["ring-7", "ring-6", "ring-5"]


async def test_slow_execution_is_an_anomaly(http: aiohttp.ClientSession) -> None:
    """An execution slower than slow_execution_ms (here via injected latency) is reported."""
    settings = EmulatorSettings.isolated(latency_ms=30, slow_execution_ms=10)
    async with running_emulator(settings) as url:
        assert (await _post(http, url, predict_body(storage_request("slow"))))[0] == 200
        async with http.get(url + ANOMALIES) as resp:
            found = await resp.json()
    assert [(a["anomaly_type"], a["request_id"]) for a in found] == [("slow_execution", "slow")]
    assert found[0]["severity"] == "medium"  # 30+ ms against 10 ms


async def test_api_key_guards_everything_but_health(http: aiohttp.ClientSession) -> None:
    """With a key set: health is open; the rest needs Bearer or X-API-Key."""
    async with running_emulator(EmulatorSettings.isolated(api_key="s3cret")) as url:
        body = predict_body(forecast_request("auth"))
        async with http.get(url + HEALTH_PATH) as resp:
            assert resp.status == 200
        assert (await _post(http, url, body))[0] == 401
        assert (await _post(http, url, body, {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await _post(http, url, body, {"Authorization": "Bearer s3cret"}))[0] == 200
        assert (await _post(http, url, body, {"X-API-Key": "s3cret"}))[0] == 200
        for path in (ANOMALIES, LOGS):
            async with http.get(url + path) as resp:
                assert resp.status == 401
            async with http.get(url + path, headers={"X-API-Key": "s3cret"}) as resp:
                assert resp.status == 200
        async with http.post(url + "/admin/health", params={"ok": "false"}) as resp:
            assert resp.status == 401


def test_forecast_request_fixture_is_realistic() -> None:
    """The sample load used above has a daily cycle (guards the tests' assumptions)."""
    load = np.asarray(synthetic_load(7 * 24))
    daily = load.reshape(7, 24).mean(axis=0)
    assert daily.max() - daily.min() > 300
