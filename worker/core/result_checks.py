"""Strict checks on what the QNN returned: a result that fails them is a failed run, never stored
as a success."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from contracts.requests import (
    AnyRequest,
    BaseForecast,
    BaseStorage,
    ForecastPayload,
    GridSwitchPayload,
    SimulationRequest,
    StoragePayload,
)
from contracts.results import (
    ExecutionMetadata,
    ForecastResult,
    GridSwitchResult,
    SimulationResult,
    StorageResult,
)

# Room for the solver's floating-point slack, relative to the quantity checked.
TOLERANCE = 1e-6


class InvalidResult(ValueError):
    """The QNN answered, but the answer is not a usable result for this request."""


def _close_enough_le(value: float, limit: float) -> bool:
    return value <= limit + TOLERANCE * max(1.0, abs(limit))


def _within(series: list[float], low: float, high: float) -> bool:
    """Every value in [low, high] (high with the solver's slack). The values are finite (the
    result models refuse NaN and infinities) and the test is monotonic, so the extremes decide:
    two C-level passes instead of a comparison per value in Python."""
    return not series or (min(series) >= low and _close_enough_le(max(series), high))


def _non_negative(series: list[float]) -> bool:
    return not series or min(series) >= 0


def _require(condition: bool, problem: str, problems: list[str]) -> None:
    if not condition:
        problems.append(problem)


def check_forecast(payload: ForecastPayload, raw: dict[str, Any]) -> ForecastResult:
    result = ForecastResult.model_validate(raw, strict=True)
    problems: list[str] = []
    n = payload.horizon_steps
    _require(
        len(result.forecast) == n, f"forecast has {len(result.forecast)} steps, want {n}", problems
    )
    _require(_non_negative(result.forecast), "forecast has negative load", problems)
    if result.lower is not None and result.upper is not None:
        _require(
            len(result.lower) == n and len(result.upper) == n,
            "interval bounds have the wrong length",
            problems,
        )
        _require(
            all(
                lo <= f + TOLERANCE * max(1.0, f) and _close_enough_le(f, hi)
                for lo, f, hi in zip(result.lower, result.forecast, result.upper, strict=False)
            ),
            "forecast lies outside its own interval",
            problems,
        )
    _raise_if(problems)
    return result


def check_storage(payload: StoragePayload, raw: dict[str, Any]) -> StorageResult:
    result = StorageResult.model_validate(raw, strict=True)
    problems: list[str] = []
    n = len(payload.price_schedule)
    for name in ("charge_kw", "discharge_kw", "soc_kwh"):
        series = getattr(result, name)
        _require(len(series) == n, f"{name} has {len(series)} steps, want {n}", problems)
    _require(
        _within(result.charge_kw, 0.0, payload.max_charge_kw),
        "charge outside [0, max_charge_kw]",
        problems,
    )
    _require(
        _within(result.discharge_kw, 0.0, payload.max_discharge_kw),
        "discharge outside [0, max_discharge_kw]",
        problems,
    )
    _require(
        not result.soc_kwh
        or (
            _close_enough_le(payload.soc_min_kwh, min(result.soc_kwh))
            and _close_enough_le(max(result.soc_kwh), payload.soc_max_kwh)
        ),
        "state of charge outside [soc_min_kwh, soc_max_kwh]",
        problems,
    )
    _raise_if(problems)
    return result


def check_grid_switch(payload: GridSwitchPayload, raw: dict[str, Any]) -> GridSwitchResult:
    result = GridSwitchResult.model_validate(raw, strict=True)
    problems: list[str] = []
    n = len(payload.load_forecast)
    capacity = {s.name: s.capacity_kw for s in payload.sources}
    unknown = set(result.dispatch_kw) - set(capacity)
    _require(not unknown, f"dispatch names unknown sources {sorted(unknown)}", problems)
    for name, series in result.dispatch_kw.items():
        if name not in capacity:
            continue
        _require(
            len(series) == n, f"dispatch for {name} has {len(series)} steps, want {n}", problems
        )
        _require(
            _within(series, 0.0, capacity[name]),
            f"dispatch for {name} outside [0, capacity_kw]",
            problems,
        )
    unserved = result.unserved_kw or [0.0] * n
    _require(
        len(unserved) == n and _non_negative(unserved),
        "unserved_kw has the wrong length or negative values",
        problems,
    )
    if not problems:
        # Per step, summed across sources in C (map over the columns) rather than indexed.
        columns = list(result.dispatch_kw.values())
        supplies: Iterable[float] = (
            map(sum, zip(*columns, strict=True)) if columns else itertools.repeat(0.0, n)
        )
        for step, (supplied, load) in enumerate(zip(supplies, payload.load_forecast, strict=True)):
            supplied += unserved[step]
            if not math.isclose(supplied, load, rel_tol=1e-4, abs_tol=1e-3):
                problems.append(f"step {step}: supply {supplied:g} kW does not meet load {load:g}")
                break
    _raise_if(problems)
    return result


def check_simulation(request: SimulationRequest, raw: dict[str, Any]) -> SimulationResult:
    result = SimulationResult.model_validate(raw, strict=True)
    scenarios = {s.name: s for s in request.payload.scenarios}
    names = [o.name for o in result.scenarios]
    if sorted(names) != sorted(scenarios):
        raise InvalidResult(f"scenarios {names} do not match the request's {sorted(scenarios)}")
    base = request.payload.base
    normalised = []
    for outcome in result.scenarios:
        checked: ForecastResult | StorageResult | GridSwitchResult
        try:
            # Scenarios scale loads and prices, never limits, so the base's limits still hold.
            if isinstance(base, BaseForecast):
                checked = check_forecast(base.payload, outcome.result)
            elif isinstance(base, BaseStorage):
                checked = check_storage(base.payload, outcome.result)
            else:
                scale = scenarios[outcome.name].load_scale
                scaled = base.payload.model_copy(
                    update={"load_forecast": [v * scale for v in base.payload.load_forecast]}
                )
                checked = check_grid_switch(scaled, outcome.result)
        except InvalidResult as exc:
            raise InvalidResult(f"scenario {outcome.name}: {exc}") from None
        # Stored and announced under the canonical names, whatever alias the QNN used.
        canonical = checked.model_dump(mode="json", exclude_none=True)
        normalised.append(outcome.model_copy(update={"result": canonical}))
    return result.model_copy(update={"scenarios": normalised})


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise InvalidResult("; ".join(problems[:5]))


def check_result(
    request: AnyRequest, raw: dict[str, Any], raw_metadata: dict[str, Any]
) -> tuple[dict[str, Any], ExecutionMetadata]:
    """Validate the QNN's answer for this request; returns the normalised result and metadata."""
    try:
        metadata = ExecutionMetadata.model_validate(raw_metadata, strict=True)
        checked: ForecastResult | StorageResult | GridSwitchResult | SimulationResult
        if request.request_type == "forecast":
            checked = check_forecast(request.payload, raw)
        elif request.request_type == "storage":
            checked = check_storage(request.payload, raw)
        elif request.request_type == "grid_switch":
            checked = check_grid_switch(request.payload, raw)
        else:
            checked = check_simulation(request, raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidResult(f"{loc}: {first['msg']}") from None
    return checked.model_dump(mode="json", exclude_none=True), metadata
