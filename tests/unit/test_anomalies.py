"""Anomaly detection on runs: each detector on constructed cases, and quiet on realistic ones."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import TypeAdapter

from contracts.requests import (
    AnyRequest,
    ForecastRequest,
    GridSwitchRequest,
    OptimizationRequest,
    SimulationRequest,
    StorageRequest,
)
from producers.sample import generate_requests
from qnn_emulator.predictors import predict
from worker.core import anomalies as an
from worker.core.anomalies import Anomaly, detect_run_anomalies
from worker.core.result_checks import InvalidResult, check_result

ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(OptimizationRequest)
SEED = 11
RESULT_TYPES = {
    an.FORECAST_OUTSIDE_ENVELOPE,
    an.FORECAST_PEAK_ABOVE_HISTORY,
    an.STORAGE_LIMIT_VIOLATION,
    an.GRID_UNSERVED_LOAD,
}


@functools.cache
def _docs(count: int = 200, seed: int = SEED) -> tuple[dict[str, Any], ...]:
    """Sample requests, generated once per (count, seed): copy before changing one."""
    return tuple(generate_requests(count, seed))


def _doc(kind: str, **want: Any) -> dict[str, Any]:
    """The first sample request of `kind` whose payload has the `want`ed values."""
    for doc in _docs():
        payload = doc["payload"]
        if doc["request_type"] == kind and all(_matches(payload, k, v) for k, v in want.items()):
            return copy.deepcopy(doc)
    raise LookupError(f"no sample {kind} with {want}")


def _matches(payload: dict[str, Any], key: str, value: Any) -> bool:
    if key == "history_days":
        minutes = len(payload["historical_loads"]) * payload["resolution_minutes"]
        return bool(minutes == value * 1440)
    return bool(payload.get(key) == value)


def _request(doc: dict[str, Any]) -> AnyRequest:
    return ADAPTER.validate_python(doc)


def _stored(request: AnyRequest) -> dict[str, Any]:
    """The emulator's answer for `request`, normalised the way the worker stores it."""
    result, _ = check_result(request, predict(request.payload).result, {})
    return result


def _types(found: list[Anomaly]) -> list[str]:
    return [a.anomaly_type for a in found]


def _history_doc() -> dict[str, Any]:
    return _doc("forecast", resolution_minutes=30, history_days=7)


# --------------------------------------------------------------------------- clean samples


def test_clean_sample_histories_have_no_input_anomalies() -> None:
    """Realistic multi-day histories from the sample generator raise no input anomaly."""
    flagged, total = [], 0
    for seed in (1, 2, SEED):
        for doc in _docs(200, seed):
            request = _request(doc)
            payload = request.payload.base.payload if isinstance(request, SimulationRequest) else (
                request.payload
            )
            loads = getattr(payload, "historical_loads", None)
            if loads is None:
                continue
            total += 1
            if found := an.detect_input_anomalies(loads, payload.resolution_minutes):
                flagged.append((doc["request_id"], [a.description for a in found]))
    assert total > 150
    assert flagged == []


def test_clean_sample_load_forecasts_raise_very_few_input_anomalies() -> None:
    """One-day site load forecasts (3 % white noise) are flagged rarely and only mildly."""
    flagged: list[Anomaly] = []
    total = 0
    for seed in (1, 2, SEED):
        for doc in _docs(200, seed):
            request = _request(doc)
            payload = request.payload.base.payload if isinstance(request, SimulationRequest) else (
                request.payload
            )
            loads = getattr(payload, "load_forecast", None)
            if loads is None:
                continue
            total += 1
            flagged += an.detect_input_anomalies(loads, payload.resolution_minutes)
    assert total > 250
    assert len(flagged) <= 0.01 * total
    assert all(a.severity in ("low", "medium") for a in flagged)


@pytest.mark.parametrize("kind", ["forecast", "storage", "grid_switch", "simulation"])
def test_emulator_results_for_samples_raise_no_result_anomalies(kind: str) -> None:
    """The emulator's own answers to sample requests break no limit and stay in the envelope."""
    docs = [d for d in _docs(80) if d["request_type"] == kind]
    assert docs
    for doc in docs:
        request = _request(doc)
        found = detect_run_anomalies(request, _stored(request))
        assert not RESULT_TYPES & set(_types(found)), (doc["request_id"], found)


# --------------------------------------------------------------------------- input anomalies


def test_spike_is_detected_where_injected() -> None:
    """A 30 % one-reading spike in a week of half-hourly history is an input_spike there."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[200] *= 1.3
    found = an.detect_input_anomalies(loads, 30)
    assert _types(found) == [an.INPUT_SPIKE]
    event = found[0].details["events"][0]
    assert event["start_index"] <= 200 <= event["end_index"]
    assert event["peak_z"] >= an.SPIKE_Z_LOW


def test_drop_is_detected_where_injected() -> None:
    """A two-reading 25 % drop is an input_drop covering both readings."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[150:152] *= 0.75
    found = an.detect_input_anomalies(loads, 30)
    assert _types(found) == [an.INPUT_DROP]
    event = found[0].details["events"][0]
    assert event["start_index"] <= 150 and event["end_index"] >= 151


def test_a_drop_casts_no_echo_on_neighbouring_days() -> None:
    """A deep drop does not make the same hours of the days around it look like spikes."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[48 * 3 + 20 : 48 * 3 + 23] *= 0.6
    events = an.find_input_events(loads, 30)
    assert [(e.anomaly_type, e.start <= 164 <= e.end) for e in events] == [(an.INPUT_DROP, True)]


def test_spike_severity_grows_with_its_robust_z() -> None:
    """A small spike grades lower than a large one, and input spikes never grade critical."""
    base = np.array(_history_doc()["payload"]["historical_loads"])
    severities = []
    for factor in (1.15, 1.25, 1.9):
        loads = base.copy()
        loads[100] *= factor
        (found,) = an.detect_input_anomalies(loads, 30)
        severities.append(found.severity)
    assert severities[0] in ("low", "medium")
    assert severities[-1] == "high"


def test_flatline_of_a_stuck_meter_is_detected() -> None:
    """Four hours of a repeated reading is a low-severity input_flatline, and no spike/drop."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[121:129] = loads[120]
    found = an.detect_input_anomalies(loads, 30)
    assert _types(found) == [an.INPUT_FLATLINE]
    assert found[0].severity == "low"
    event = found[0].details["events"][0]
    assert (event["start_index"], event["end_index"], event["hours"]) == (120, 128, 4.5)


def test_long_flatline_grades_high() -> None:
    """Thirteen stuck hours grade high."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[101:127] = loads[100]
    (found,) = an.detect_input_anomalies(loads, 30)
    assert (found.anomaly_type, found.severity) == (an.INPUT_FLATLINE, "high")


def test_constant_load_forecast_is_a_low_placeholder_but_a_constant_history_is_not() -> None:
    """A flat requester forecast grades low; a week of one repeated meter value is critical."""
    (forecast,) = an.detect_input_anomalies([500.0] * 24, 60, field_name="load_forecast",
                                            measured=False)
    assert (forecast.anomaly_type, forecast.severity) == (an.INPUT_FLATLINE, "low")
    assert "constant" in forecast.description
    (history,) = an.detect_input_anomalies([500.0] * 168, 60)
    assert (history.anomaly_type, history.severity) == (an.INPUT_FLATLINE, "critical")


def test_repeats_shorter_than_the_minimum_are_not_a_flatline() -> None:
    """Two hours of repeats at hourly resolution (below three hours) are not flagged."""
    doc = _doc("forecast", resolution_minutes=60, history_days=7)
    loads = np.array(doc["payload"]["historical_loads"])
    loads[51] = loads[50]
    assert an.find_flatlines(loads, 60) == []
    loads[52] = loads[50]
    assert [(e.start, e.end) for e in an.find_flatlines(loads, 60)] == [(50, 52)]


def test_zero_run_is_detected_and_not_also_a_drop_or_flatline() -> None:
    """Two hours of zeros in a regional load are one input_zero_run of medium severity."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[60:64] = 0.0
    found = an.detect_input_anomalies(loads, 30)
    assert _types(found) == [an.INPUT_ZERO_RUN]
    assert found[0].severity == "medium"
    assert found[0].details["events"][0]["steps"] == 4


def test_zeros_are_normal_in_a_load_that_often_reaches_zero() -> None:
    """A load that is zero for hours every night raises no zero-run anomaly."""
    hours = np.arange(7 * 24)
    loads = np.maximum(0.0, np.sin(2 * np.pi * (hours % 24 - 6) / 24)) * 100.0
    assert an.find_zero_runs(loads) == []
    assert an.detect_input_anomalies(loads, 60) == []


def test_spike_in_a_one_day_site_load_forecast_is_detected() -> None:
    """Short series use the harmonic fit: a 40 % spike in a one-day load forecast is found."""
    doc = _doc("grid_switch", resolution_minutes=30)
    loads = np.array(doc["payload"]["load_forecast"])
    assert an.detect_input_anomalies(loads, 30, field_name="load_forecast") == []
    loads[30] *= 1.4
    found = an.detect_input_anomalies(loads, 30, field_name="load_forecast")
    assert _types(found) == [an.INPUT_SPIKE]
    assert found[0].details["field"] == "load_forecast"
    assert found[0].details["events"][0]["start_index"] == 30


def test_series_too_short_to_score_are_skipped() -> None:
    """A handful of readings gets no spike scores rather than a noisy guess."""
    assert not an.spike_scores([100.0, 500.0, 100.0, 100.0], 60).any()
    assert an.find_spikes_and_drops([1.0] * 3, 60) == []


# --------------------------------------------------------------------------- forecast results


def _forecast_request() -> ForecastRequest:
    request = _request(_history_doc())
    assert isinstance(request, ForecastRequest)
    return request


def test_forecast_far_outside_the_history_is_flagged() -> None:
    """A forecast at twice the historical maximum breaks the envelope and the peak check."""
    request = _forecast_request()
    top = max(request.payload.historical_loads)
    result = {"forecast": [2.0 * top] * request.payload.horizon_steps}
    found = an.detect_forecast_result_anomalies(request.payload, result)
    by_type = {a.anomaly_type: a for a in found}
    assert set(by_type) == {an.FORECAST_OUTSIDE_ENVELOPE, an.FORECAST_PEAK_ABOVE_HISTORY}
    assert by_type[an.FORECAST_OUTSIDE_ENVELOPE].severity == "critical"
    assert by_type[an.FORECAST_PEAK_ABOVE_HISTORY].severity == "critical"
    assert by_type[an.FORECAST_OUTSIDE_ENVELOPE].details["steps_above"] == len(
        result["forecast"]
    )


def test_forecast_below_half_the_historical_minimum_is_outside_the_envelope() -> None:
    """A sustained forecast under half the historical minimum is outside the envelope."""
    request = _forecast_request()
    low = min(request.payload.historical_loads)
    steps = request.payload.horizon_steps
    forecast = [low] * steps
    forecast[: steps // 2] = [0.3 * low] * (steps // 2)
    (found,) = an.detect_forecast_result_anomalies(request.payload, {"forecast": forecast})
    assert found.anomaly_type == an.FORECAST_OUTSIDE_ENVELOPE
    assert found.details["steps_below"] == steps // 2
    assert found.severity == "critical"


def test_one_step_peak_is_a_peak_anomaly_but_not_sustained() -> None:
    """A single step at 1.4 x the historical max is a medium peak anomaly, inside the envelope."""
    request = _forecast_request()
    top = max(request.payload.historical_loads)
    forecast = [0.8 * top] * request.payload.horizon_steps
    forecast[5] = 1.4 * top
    (found,) = an.detect_forecast_result_anomalies(request.payload, {"forecast": forecast})
    assert (found.anomaly_type, found.severity) == (an.FORECAST_PEAK_ABOVE_HISTORY, "medium")
    assert found.details["peak_index"] == 5


def test_scenario_load_scale_widens_the_envelope() -> None:
    """A forecast 1.3 x the history is expected under a 1.3 load_scale scenario."""
    request = _forecast_request()
    top = max(request.payload.historical_loads)
    result = {"forecast": [1.3 * top] * request.payload.horizon_steps}
    assert an.detect_forecast_result_anomalies(request.payload, result, load_scale=1.3) == []
    assert an.detect_forecast_result_anomalies(request.payload, result)


def test_forecast_by_dataset_ref_without_history_has_nothing_to_compare_with() -> None:
    """An unresolved dataset_ref has no history: no input or envelope checks."""
    doc = _history_doc()
    doc["payload"]["historical_loads"] = []
    doc["payload"].pop("temperature_c", None)
    doc["payload"]["dataset_ref"] = {
        "region": doc["region"], "start_date": "2024-01-01", "end_date": "2024-01-07",
    }
    request = _request(doc)
    assert isinstance(request, ForecastRequest)
    assert detect_run_anomalies(request, {"forecast": [1e9] * request.payload.horizon_steps}) == []


@pytest.mark.parametrize(
    ("kind", "spoil", "problem"),
    [
        ("forecast", lambda r, p: r["forecast"].__setitem__(0, -1.0), "negative load"),
        ("forecast", lambda r, p: r["forecast"].__setitem__(1, math.nan), "finite"),
        ("storage", lambda r, p: r["charge_kw"].__setitem__(0, 1.2 * p.max_charge_kw), "charge"),
        ("storage", lambda r, p: r["soc_kwh"].__setitem__(0, p.soc_max_kwh * 1.01), "state of"),
        (
            "grid_switch",
            lambda r, p: r["dispatch_kw"][p.sources[0].name].__setitem__(
                0, 1.5 * p.sources[0].capacity_kw
            ),
            "capacity",
        ),
    ],
)
def test_results_no_valid_run_can_have_never_reach_detection(
    kind: str, spoil: Callable[[dict[str, Any], Any], None], problem: str
) -> None:
    """Non-finite and negative values and broken limits are result_checks' to refuse (as a
    failed run): anomaly detection only ever sees results that passed."""
    request = _request(_doc(kind))
    result = copy.deepcopy(_stored(request))
    spoil(result, request.payload)
    with pytest.raises(InvalidResult, match=problem):
        check_result(request, result, {})


# --------------------------------------------------------------------------- storage results


def _storage() -> tuple[StorageRequest, dict[str, Any]]:
    request = _request(_doc("storage", resolution_minutes=60))
    assert isinstance(request, StorageRequest)
    return request, _stored(request)


def test_consistent_storage_schedule_is_quiet() -> None:
    """The emulator's optimal schedule respects power, SoC limits and its own SoC path."""
    request, result = _storage()
    assert any(result["charge_kw"]) and any(result["discharge_kw"])
    assert an.detect_storage_result_anomalies(request.payload, result) == []


def test_reported_soc_that_ignores_the_schedule_is_a_violation() -> None:
    """A flat reported SoC while the battery charges does not match any efficiency convention."""
    request, result = _storage()
    p = request.payload
    steps = len(p.price_schedule)
    charge = [0.0] * steps
    charge[3] = 0.5 * p.max_charge_kw
    result = {
        "charge_kw": charge,
        "discharge_kw": [0.0] * steps,
        "soc_kwh": [p.soc_initial_kwh] * steps,
    }
    (found,) = an.detect_storage_result_anomalies(p, result)
    violation = found.details["violations"]["soc_inconsistent_with_schedule"]
    assert violation["steps"] == steps - 3
    assert violation["max_abs_error_kwh"] > 0


def test_recomputed_soc_beyond_its_limit_is_a_violation() -> None:
    """A reported SoC held at soc_max_kwh while the schedule charges on, by less than the SoC
    tolerance: consistent enough, but the recomputed path leaves the limit."""
    request, _ = _storage()
    p = request.payload
    steps = len(p.price_schedule)
    hours = p.resolution_minutes / 60
    overshoot = 0.001 * p.capacity_kwh  # half of SOC_TOLERANCE_FRACTION
    charge = [0.0] * steps
    charge[0] = (p.soc_max_kwh + overshoot - p.soc_initial_kwh) / (p.efficiency * hours)
    path = p.soc_initial_kwh + p.efficiency * charge[0] * hours  # efficiency on charge
    flat = [p.soc_max_kwh] * steps
    result = {"charge_kw": charge, "discharge_kw": [0.0] * steps, "soc_kwh": flat}
    assert charge[0] <= p.max_charge_kw, "the sample battery must reach its limit in one step"
    assert path > p.soc_max_kwh
    (found,) = an.detect_storage_result_anomalies(p, result)
    assert set(found.details["violations"]) == {"recomputed_soc_above_max"}
    assert found.severity == "low"


def test_other_efficiency_conventions_are_accepted() -> None:
    """A schedule whose SoC charges at full round-trip efficiency loss is not flagged."""
    request, _ = _storage()
    p = request.payload
    steps = len(p.price_schedule)
    hours = p.resolution_minutes / 60
    charge = [0.0] * steps
    charge[0] = 0.1 * p.max_charge_kw
    soc = [p.soc_initial_kwh + p.efficiency * charge[0] * hours] * steps
    result = {"charge_kw": charge, "discharge_kw": [0.0] * steps, "soc_kwh": soc}
    assert an.detect_storage_result_anomalies(p, result) == []


# --------------------------------------------------------------------------- grid results


def _grid() -> tuple[GridSwitchRequest, dict[str, Any]]:
    request = _request(_doc("grid_switch"))
    assert isinstance(request, GridSwitchRequest)
    return request, _stored(request)


def test_emulator_dispatch_is_quiet() -> None:
    """Merit-order dispatch within capacities that serves the load raises nothing."""
    request, result = _grid()
    assert an.detect_grid_switch_result_anomalies(request.payload, result) == []


def test_reported_unserved_load_is_flagged_by_share() -> None:
    """Unserved load reported in the result is graded by its share of the load's energy."""
    request, result = _grid()
    load = request.payload.load_forecast
    unserved = [0.0] * len(load)
    unserved[0] = 0.5 * load[0]
    found = an.detect_grid_switch_result_anomalies(
        request.payload, {**result, "unserved_kw": unserved}
    )
    (anomaly,) = [a for a in found if a.anomaly_type == an.GRID_UNSERVED_LOAD]
    assert anomaly.details["steps"] == 1
    assert anomaly.severity in ("low", "medium")


# --------------------------------------------------------------------------- operational


def _recent(median: float, spread: float, n: int = 50) -> list[float]:
    rng = np.random.default_rng(3)
    return list(median + spread * rng.standard_normal(n))


def test_latency_far_above_its_baseline_is_flagged() -> None:
    """Latency at 4 x the recent median is qnn_latency_high, graded high by the ratio."""
    found = an.detect_latency_anomaly(400.0, _recent(100.0, 10.0))
    assert found is not None
    assert (found.anomaly_type, found.severity) == (an.QNN_LATENCY_HIGH, "high")
    assert found.details["samples"] == 50
    assert found.details["robust_z"] > an.OP_Z_THRESHOLD


def test_latency_within_its_usual_spread_is_quiet() -> None:
    """A slow-ish call inside the recent spread, or with too little history, is not flagged."""
    assert an.detect_latency_anomaly(125.0, _recent(100.0, 10.0)) is None
    assert an.detect_latency_anomaly(1000.0, _recent(100.0, 10.0, n=an.OP_MIN_SAMPLES - 1)) is None
    assert an.detect_latency_anomaly(None, _recent(100.0, 10.0)) is None


def test_identical_recent_values_need_a_material_increase() -> None:
    """With a zero MAD, 5 % more is not an anomaly but 2.5 x is (floored scale, ratio gate)."""
    recent = [0.02] * 30
    assert an.detect_cost_anomaly(0.021, recent) is None
    found = an.detect_cost_anomaly(0.05, recent)
    assert found is not None
    assert (found.anomaly_type, found.severity) == (an.QNN_COST_HIGH, "medium")


def test_only_the_last_window_of_recent_values_counts() -> None:
    """Old values beyond OP_WINDOW and non-finite ones do not shape the baseline."""
    recent = [1000.0] * 500 + [math.nan] * 5 + _recent(100.0, 5.0, n=an.OP_WINDOW)
    found = an.detect_latency_anomaly(300.0, recent)
    assert found is not None
    assert found.details["recent_median"] == pytest.approx(100.0, rel=0.05)


def test_cost_above_a_free_baseline_is_medium() -> None:
    """Any cost when recent runs cost nothing is flagged medium (no ratio to grade by)."""
    found = an.detect_cost_anomaly(0.01, [0.0] * 20)
    assert found is not None
    assert found.severity == "medium"
    assert found.details["ratio"] is None


# --------------------------------------------------------------------------- entry point


def test_run_entry_point_covers_input_result_and_operations() -> None:
    """One call reports the history's spike, the result's peak and the slow QNN call."""
    doc = _history_doc()
    doc["payload"]["historical_loads"][200] *= 1.5
    request = _request(doc)
    assert isinstance(request, ForecastRequest)
    result = _stored(request)
    result["forecast"][3] = 3.0 * max(request.payload.historical_loads)
    found = detect_run_anomalies(
        request, result, latency_ms=900.0, recent_latency_ms=_recent(100.0, 10.0)
    )
    assert _types(found) == [an.INPUT_SPIKE, an.FORECAST_PEAK_ABOVE_HISTORY, an.QNN_LATENCY_HIGH]


def test_simulation_checks_the_base_input_and_each_scenario() -> None:
    """Scenario anomalies name their scenario; the base payload's input is checked once."""
    doc = next(
        d
        for d in _docs()
        if d["request_type"] == "simulation" and d["payload"]["base"]["request_type"] == "storage"
    )
    doc = copy.deepcopy(doc)
    request = _request(doc)
    assert isinstance(request, SimulationRequest)
    result = _stored(request)
    broken = result["scenarios"][0]
    soc = broken["result"]["soc_kwh"]
    broken["result"]["soc_kwh"] = [soc[0]] * len(soc)  # a flat SoC while the schedule works
    assert any(broken["result"]["charge_kw"]) or any(broken["result"]["discharge_kw"])
    found = detect_run_anomalies(request, result)
    violations = [a for a in found if a.anomaly_type == an.STORAGE_LIMIT_VIOLATION]
    assert [a.details["scenario"] for a in violations] == [broken["name"]]
    assert violations[0].description.startswith(f"scenario {broken['name']}: ")


def test_anomalies_are_frozen_hashable_and_json_ready() -> None:
    """Anomalies are immutable values whose details serialise to JSON."""
    loads = np.array(_history_doc()["payload"]["historical_loads"])
    loads[10:14] = 0.0
    loads[200] *= 1.5
    found = an.detect_input_anomalies(loads, 30)
    assert len({hash(a) for a in found}) == len(found) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        found[0].severity = "low"  # type: ignore[misc]
    for anomaly in found:
        assert isinstance(anomaly.suggested_actions, tuple) and anomaly.suggested_actions
        orjson.dumps(dataclasses.asdict(anomaly))


def test_typical_run_is_checked_in_about_a_millisecond() -> None:
    """A 336-reading forecast run is checked well within a few milliseconds (median)."""
    request = _forecast_request()
    assert len(request.payload.historical_loads) == 336
    result = _stored(request)
    recent = _recent(100.0, 10.0, n=100)
    timings = []
    for _ in range(30):
        started = time.perf_counter()
        detect_run_anomalies(
            request, result, latency_ms=105.0, recent_latency_ms=recent,
            cost_usd=0.01, recent_cost_usd=[0.01] * 100,
        )
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.005


# --------------------------------------------------------------------------- fast paths
#
# detect_run_anomalies runs on every completed run, so its building blocks are vectorised and
# take shortcuts. These tests hold them to the straightforward versions (as first written) bit
# for bit, apart from the sign of a zero z-score.


def _reference_rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    if len(x) <= half:
        return np.full(len(x), float(np.median(x)))
    padded = np.pad(x, half, mode="reflect", reflect_type="odd")
    return np.asarray(
        np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)
    )


def _reference_box_sum(values: np.ndarray, half: int) -> np.ndarray:
    rows = values.shape[0]
    padded = np.concatenate([np.zeros((rows, half + 1)), values, np.zeros((rows, half))], axis=1)
    csum = np.cumsum(padded, axis=1)
    return np.asarray(csum[:, 2 * half + 1 :] - csum[:, : -(2 * half + 1)])


def _reference_ring_mean(values: np.ndarray, guard: int, reach: int) -> np.ndarray:
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    counts = finite.astype(np.float64)
    total = _reference_box_sum(filled, reach) - _reference_box_sum(filled, guard)
    count = _reference_box_sum(counts, reach) - _reference_box_sum(counts, guard)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0.5, total / np.maximum(count, 1.0), np.inf)


def _reference_seasonal(
    x: np.ndarray, steps_per_day: int, resolution_minutes: int, imputed: np.ndarray
) -> np.ndarray:
    n = len(x)
    level_window = an._odd(2 * an._steps(an.SPIKE_MAX_HOURS, resolution_minutes) + 1)
    rows: list[np.ndarray] = []
    for days in an.NEIGHBOUR_DAYS:
        shift = days * steps_per_day
        overlap = n - shift
        if overlap < level_window:
            continue
        diff = x[:overlap] - x[shift:]
        resid = diff - _reference_rolling_median(diff, level_window)
        ahead = np.full(n, np.nan)
        ahead[:overlap] = resid
        behind = np.full(n, np.nan)
        behind[shift:] = -resid
        rows += [ahead, behind]
    if not rows:
        return np.zeros(n)
    cand = np.vstack(rows)
    misfit = np.abs(cand)
    misfit[:, imputed] = np.nan
    fit = _reference_ring_mean(
        misfit,
        an._steps(an.MATCH_GUARD_HOURS, resolution_minutes),
        an._steps(an.MATCH_RING_HOURS, resolution_minutes),
    )
    fit = np.where(np.isfinite(cand), fit, np.inf)
    order = np.argsort(fit, axis=0, kind="stable")[: an.NEIGHBOURS_USED]
    chosen = np.take_along_axis(cand, order, axis=0)
    chosen_fit = np.take_along_axis(fit, order, axis=0)
    chosen = np.where(np.isfinite(chosen_fit), chosen, np.nan)
    count = np.isfinite(chosen).sum(axis=0)
    ordered = np.sort(chosen, axis=0)
    first = ordered[0]
    mid = ordered[1] if len(ordered) > 1 else first
    resid = np.where(count >= 3, mid, np.where(count == 2, (first + mid) / 2, first))
    return np.asarray(np.nan_to_num(resid, nan=0.0))


def _reference_harmonic(
    x: np.ndarray, steps_per_day: int, weights: np.ndarray
) -> tuple[np.ndarray, float] | None:
    n = len(x)
    t = np.arange(n, dtype=np.float64)
    columns = [np.ones(n), t / n - 0.5]
    for k in range(1, an.HARMONIC_TERMS + 1):
        angle = 2.0 * np.pi * k * t / steps_per_day
        columns += [np.cos(angle), np.sin(angle)]
    design = np.column_stack(columns)
    params = design.shape[1]
    if int(weights.sum()) < 2 * params:
        return None
    w = weights.astype(np.float64)
    resid = x
    for _ in range(an.HARMONIC_IRLS_ITERATIONS):
        weighted = design.T * w
        gram = weighted @ design + 1e-9 * np.eye(params)
        beta = np.linalg.solve(gram, weighted @ x)
        resid = x - design @ beta
        scale = max(an.MAD_TO_SIGMA * float(np.median(np.abs(resid[weights]))), 1e-9)
        u = resid / (an.BISQUARE_TUNING * scale)
        w = np.where((np.abs(u) < 1.0) & weights, (1.0 - u * u) ** 2, 0.0)
    inflation = (1.0 + an.HARMONIC_SMALL_SAMPLE / math.sqrt(n - params)) / math.sqrt(
        1.0 - params / n
    )
    return resid, inflation


def _reference_spike_scores(
    values: np.ndarray, resolution_minutes: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    y = np.asarray(values, dtype=np.float64)
    n = y.size
    mask = np.zeros(n, dtype=bool) if exclude is None else exclude.copy()
    level = float(np.median(np.abs(y[~mask]))) if (~mask).any() else 0.0
    if n < 5 or level <= 0.0:
        return np.zeros(n)
    if not ((y > an.ZERO_REL_THRESHOLD * level) | mask).all():
        return np.zeros(n)
    steps_per_day = max(1, 1440 // resolution_minutes)
    x = np.log(np.where(mask, level, np.maximum(y, an.ZERO_REL_THRESHOLD * level)))
    x = an._impute(x, mask, steps_per_day)
    if n >= an.MIN_SEASONAL_DAYS * steps_per_day:
        resid = _reference_seasonal(x, steps_per_day, resolution_minutes, mask)
        inflation = 1.0
    else:
        fitted = _reference_harmonic(x, steps_per_day, ~mask)
        if fitted is None:
            return np.zeros(n)
        resid, inflation = fitted
    resid[mask] = np.nan
    finite = resid[np.isfinite(resid)]
    mad = float(np.median(np.abs(finite - np.median(finite)))) if finite.size else 0.0
    z = resid / max(an.MAD_TO_SIGMA * mad * inflation, an.SPIKE_SCALE_FLOOR)
    return np.asarray(np.nan_to_num(z, nan=0.0))


def _score_cases() -> list[tuple[str, np.ndarray, int, np.ndarray | None]]:
    """Series the detectors see: sample histories and load forecasts, clean, with anomalies and
    with masked readings, plus synthetic ones for the rarer paths."""
    rng = np.random.default_rng(5)
    cases: list[tuple[str, np.ndarray, int, np.ndarray | None]] = []
    for doc in _docs(40, 3):
        payload = doc["payload"]
        if doc["request_type"] == "simulation":
            payload = payload["base"]["payload"]
        loads = payload.get("historical_loads") or payload.get("load_forecast")
        if not loads:
            continue
        y = np.array(loads, dtype=np.float64)
        res = payload["resolution_minutes"]
        name = f"{doc['request_id']} ({len(y)} x {res} min)"
        cases.append((name, y, res, None))
        spiked = y.copy()
        for i in rng.integers(0, y.size, 3):
            spiked[i] *= rng.choice([0.6, 1.4])
        mask = np.zeros(y.size, dtype=bool)
        start = int(rng.integers(0, y.size - 4))
        mask[start : start + 4] = True
        cases += [(name + " spiked", spiked, res, None), (name + " masked", spiked, res, mask)]
        per_day = 1440 // res
        for days in (3, 7):  # fewer neighbour days: readings with only two candidates
            if y.size > days * per_day:
                cases.append((f"{name} first {days} days", spiked[: days * per_day], res, None))
    t = np.arange(10 * 96)
    periodic = 100.0 + 30.0 * np.sin(2 * np.pi * t / 96)  # 15 min: other window sizes
    cases.append(("15-min periodic", periodic, 15, None))
    tied = np.tile(periodic[:96], 10)  # days repeat exactly: fits tie
    tied[300] *= 1.5
    cases += [("tied days", tied, 15, None), ("tied days, masked", tied, 15, tied > 125)]
    for res in (120, 240, 1440):  # coarse: readings without any fitting neighbour
        coarse = 100.0 + rng.standard_normal(12 * 1440 // res)
        cases.append((f"{res}-min noise", coarse, res, None))
    return cases


def test_spike_scores_match_the_straightforward_implementation() -> None:
    """Vectorised seasonal and harmonic scores equal the straightforward ones (clean, with
    anomalies, with masked readings, with tied neighbour fits, at each resolution)."""
    cases = _score_cases()
    assert len(cases) > 60
    for name, y, res, mask in cases:
        got = an.spike_scores(y, res, exclude=None if mask is None else mask.copy())
        want = _reference_spike_scores(y, res, mask)
        assert np.array_equal(got, want), name  # (-0.0 == 0.0)
        nonzero = want != 0
        assert np.array_equal(np.signbit(got[nonzero]), np.signbit(want[nonzero])), name


def test_fast_median_is_numpys_median() -> None:
    """The one-partition median equals np.median, NaN and the sign of zero included."""
    rng = np.random.default_rng(7)
    for size in [*range(1, 12), 47, 48, 336]:
        for _ in range(20):
            values = np.round(rng.standard_normal(size), 1) * rng.choice([-1.0, 1.0], size)
            if rng.random() < 0.2:
                values[rng.integers(size)] = np.nan
            want = float(np.median(values))
            got = an._median(values.copy())
            assert (math.isnan(want) and math.isnan(got)) or (
                got == want and math.copysign(1, got) == math.copysign(1, want)
            ), values


@pytest.mark.parametrize("window", [3, 5, 9, 17])
def test_sliding_median_is_numpys_median_of_each_window(window: int) -> None:
    """Selection networks (windows 5 and 9) and the partition fallback give np.median."""
    rng = np.random.default_rng(window)
    for _ in range(200):
        x = rng.integers(-2, 3, int(rng.integers(window, 80))).astype(np.float64)
        x[x == 0] *= rng.choice([-1.0, 1.0], int((x == 0).sum()))  # signed zeros
        if rng.random() < 0.2:
            x[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
        want = np.median(np.lib.stride_tricks.sliding_window_view(x, window), axis=1)
        got = an._sliding_median(x, window)
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))


def test_lapack_solve_is_numpys_solve() -> None:
    """The direct LAPACK call equals np.linalg.solve and raises the same on a singular matrix."""
    rng = np.random.default_rng(1)
    for size in (2, 8):
        a = rng.standard_normal((size, size))
        a = a @ a.T + np.eye(size)
        b = rng.standard_normal(size)
        assert np.array_equal(an._solve(a, b), np.linalg.solve(a, b))
    with pytest.raises(np.linalg.LinAlgError):
        an._solve(np.zeros((3, 3)), np.ones(3))
