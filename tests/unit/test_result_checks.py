"""Strict checks on QNN answers, and the tolerant reading of response bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from contracts.qnn import MalformedResponse, build_predict_body, parse_predict_response
from contracts.requests import AnyRequest, OptimizationRequest
from producers.sample import generate_requests
from worker.core.result_checks import InvalidResult, _close_enough_le, _within, check_result

ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(OptimizationRequest)


def _request(kind: str) -> AnyRequest:
    doc = next(r for r in generate_requests(8, seed=11) if r["request_type"] == kind)
    return ADAPTER.validate_python(doc)


def _forecast_result(n: int, **over: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"forecast": [100.0] * n, "lower": [90.0] * n, "upper": [110.0] * n}
    result.update(over)
    return result


def test_prd_shape_and_inputs_are_sent() -> None:
    """The body carries the PRD's fields plus the structured inputs."""
    request = _request("forecast")
    body = build_predict_body(request, model_id="M", mode="quantum", optimization_level=1)
    assert {"code", "model_id", "mode", "optimization_level", "inputs"} <= body.keys()
    assert body["code"].startswith(f"Region={request.region}; Date=")
    assert body["inputs"]["payload"]["horizon_steps"] == request.payload.horizon_steps  # type: ignore[union-attr]


@pytest.mark.parametrize("wrapped", [True, False])
def test_wrapper_and_bare_bodies_parse_alike(wrapped: bool) -> None:
    """`{"success", "data"}` wrappers and bare objects give the same result."""
    inner = {"prediction": {"predicted_loads": [1.0, 2.0]}, "execution": {"qubits": 8}}
    body = orjson.dumps({"success": True, "data": inner} if wrapped else inner)
    result, meta = parse_predict_response("forecast", body)
    assert result == {"predicted_loads": [1.0, 2.0]}
    assert meta["qubits"] == 8


@pytest.mark.parametrize("body", [b"<html>502</html>", b"[1,2]", b'{"success": false, "data": {}}'])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    """Non-JSON, non-object and failed-wrapper bodies are malformed, not results."""
    with pytest.raises(MalformedResponse):
        parse_predict_response("forecast", body)


def test_forecast_aliases_and_metadata_aliases_normalise() -> None:
    """Documented aliases land on canonical names."""
    request = _request("forecast")
    n = request.payload.horizon_steps  # type: ignore[union-attr]
    result, meta = check_result(
        request,
        {"predicted_loads": [5.0] * n},
        {"device_used": "qpu", "quantum_cost_usd": 0.5, "qubits": 4},
    )
    assert result["forecast"] == [5.0] * n
    assert (meta.device, meta.cost_usd, meta.n_qubits) == ("qpu", 0.5, 4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda n: _forecast_result(n - 1), "steps"),
        (lambda n: _forecast_result(n, forecast=[-1.0] * n), "negative"),
        (lambda n: _forecast_result(n, forecast=[200.0] * n), "interval"),
        (lambda n: _forecast_result(n, forecast=["x"] * n), "forecast"),
    ],
)
def test_invalid_forecasts_are_refused(mutate: Any, message: str) -> None:
    """Wrong length, negative load, out-of-interval and non-numeric forecasts fail."""
    request = _request("forecast")
    with pytest.raises(InvalidResult, match=message):
        check_result(request, mutate(request.payload.horizon_steps), {})  # type: ignore[union-attr]


def test_storage_over_power_limit_is_refused() -> None:
    """A schedule charging faster than the battery allows is not a valid result."""
    request = _request("storage")
    p = request.payload
    n = len(p.price_schedule)  # type: ignore[union-attr]
    raw = {
        "charge_kw": [p.max_charge_kw * 2] * n,
        "discharge_kw": [0.0] * n,  # type: ignore[union-attr]
        "soc_kwh": [p.soc_min_kwh] * n,
    }  # type: ignore[union-attr]
    with pytest.raises(InvalidResult, match="max_charge_kw"):
        check_result(request, raw, {})


def test_grid_switch_must_meet_load() -> None:
    """Supply plus unserved must equal the load at every step."""
    request = _request("grid_switch")
    p = request.payload
    n = len(p.load_forecast)  # type: ignore[union-attr]
    raw = {"dispatch_kw": {s.name: [0.0] * n for s in p.sources}}  # type: ignore[union-attr]
    with pytest.raises(InvalidResult, match="does not meet load"):
        check_result(request, raw, {})


def test_negative_cost_metadata_is_invalid() -> None:
    """Metadata is checked too: a negative cost is not a valid answer."""
    request = _request("forecast")
    n = request.payload.horizon_steps  # type: ignore[union-attr]
    with pytest.raises(InvalidResult, match="cost"):
        check_result(request, _forecast_result(n), {"cost_usd": -1})


def test_empty_envelope_is_malformed_not_invalid() -> None:
    """`{"success": true, "data": {"prediction": null}}` holds no result: retried, not failed."""
    with pytest.raises(MalformedResponse, match="no result"):
        parse_predict_response("forecast", b'{"success": true, "data": {"prediction": null}}')


def test_simulation_scenarios_are_stored_under_canonical_names() -> None:
    """A scenario answered with an alias (`predictions`) is stored as `forecast`."""
    docs = generate_requests(40, seed=11)
    doc = next(
        r
        for r in docs
        if r["request_type"] == "simulation" and r["payload"]["base"]["request_type"] == "forecast"
    )
    request = ADAPTER.validate_python(doc)
    n = request.payload.base.payload.horizon_steps  # type: ignore[union-attr]
    scenarios = [
        {"name": s.name, "result": {"predictions": [5.0] * n}}
        for s in request.payload.scenarios  # type: ignore[union-attr]
    ]
    result, _ = check_result(request, {"scenarios": scenarios}, {})
    assert all(s["result"] == {"forecast": [5.0] * n} for s in result["scenarios"])


def test_grid_switch_without_any_dispatch_must_still_meet_load() -> None:
    """No source dispatched at all: the unserved load alone has to match the load."""
    request = _request("grid_switch")
    load = request.payload.load_forecast  # type: ignore[union-attr]
    with pytest.raises(InvalidResult, match="step 0: supply 0 kW does not meet load"):
        check_result(request, {"dispatch_kw": {}}, {})
    stored, _ = check_result(request, {"dispatch_kw": {}, "unserved_kw": list(load)}, {})
    assert stored["unserved_kw"] == list(load)


_VALUES = st.lists(
    st.floats(min_value=-2.0, max_value=12.0, allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 10.0, 10.0 + 5e-6, 10.0 + 2e-5, -1e-300]),
    max_size=30,
)


@given(_VALUES)
def test_range_check_by_extremes_is_the_per_value_check(values: list[float]) -> None:
    """The bounds are tested on the min and max only; that has to be the per-value definition
    (every value >= 0 and within the limit, with the solver's slack)."""
    per_value = all(v >= 0 and _close_enough_le(v, 10.0) for v in values)
    assert _within(values, 0.0, 10.0) is per_value
