"""Tests for producers.sample: realistic, valid, deterministic sample requests."""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import date
from typing import Any

import orjson
import pydantic
import pytest

from contracts.requests import REQUEST_TYPES, OptimizationRequest
from producers.sample import REGIONS, generate_request, generate_requests

ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(OptimizationRequest)
SEEDS = (0, 1, 7, 42, 2024)


@pytest.fixture(scope="module")
def batches() -> dict[int, list[dict[str, Any]]]:
    """Fifty requests per seed, 250 in total, generated once."""
    return {seed: generate_requests(50, seed) for seed in SEEDS}


def _all(batches: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r for batch in batches.values() for r in batch]


def test_all_samples_validate(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Every generated request validates against the contracts, also after a JSON round trip."""
    requests = _all(batches)
    assert len(requests) >= 200
    for request in requests:
        ADAPTER.validate_python(request)
        ADAPTER.validate_json(orjson.dumps(request))


def test_deterministic_per_seed() -> None:
    """The same seed gives identical requests; a different seed gives different ones."""
    assert generate_requests(12, 5) == generate_requests(12, 5)
    assert generate_requests(12, 5) != generate_requests(12, 6)


def test_shorter_run_is_prefix_of_longer_run() -> None:
    """Request i depends only on (seed, i), so a shorter run is a prefix of a longer one."""
    assert generate_requests(9, 3) == generate_requests(20, 3)[:9]
    assert generate_request(3, 13) == generate_requests(20, 3)[13]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("count", [4, 5, 7])
def test_all_types_present_for_small_counts(seed: int, count: int) -> None:
    """Any count of at least four contains all four request types."""
    types = {r["request_type"] for r in generate_requests(count, seed)}
    assert types == set(REQUEST_TYPES)


def test_mix_is_balanced(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Types are mixed round-robin, so counts differ by at most one per batch."""
    for batch in batches.values():
        counts = Counter(r["request_type"] for r in batch)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_request_ids_unique_and_well_formed(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Request ids are unique across seeds and follow prefix-seed-index."""
    ids = [r["request_id"] for r in _all(batches)]
    assert len(ids) == len(set(ids))
    assert generate_requests(3, 9, id_prefix="load-test")[2]["request_id"] == "load-test-9-000002"
    other = {r["request_id"] for r in generate_requests(50, 0, id_prefix="other")}
    assert other.isdisjoint(ids)


def test_count_zero_and_negative() -> None:
    """Zero gives an empty list; a negative count is rejected."""
    assert generate_requests(0, 1) == []
    with pytest.raises(ValueError):
        generate_requests(-1, 1)


def test_bodies_stay_small(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Each serialised request is well under 64 KiB."""
    assert max(len(orjson.dumps(r)) for r in _all(batches)) < 48 * 1024


def test_regions_and_dates_realistic(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Regions come from the known list and several appear; dates are ISO dates."""
    names = {region.name for region in REGIONS}
    requests = _all(batches)
    seen = {r["region"] for r in requests}
    assert seen <= names
    assert len(seen) >= 8
    for r in requests:
        date.fromisoformat(r["forecast_date"])


def _payloads(batches: dict[int, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    """Payloads of `kind`, including those used as the base of a simulation."""
    out = []
    for r in _all(batches):
        if r["request_type"] == kind:
            out.append(r["payload"])
        elif r["request_type"] == "simulation" and r["payload"]["base"]["request_type"] == kind:
            out.append(r["payload"]["base"]["payload"])
    assert out
    return out


def test_forecast_history_has_daily_shape(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Forecast history spans 7-14 days, has MW levels, and peaks by day above night."""
    with_temperature = 0
    for p in _payloads(batches, "forecast"):
        per_day = 24 * 60 // p["resolution_minutes"]
        loads = p["historical_loads"]
        assert len(loads) % per_day == 0
        assert 7 <= len(loads) // per_day <= 14
        assert p["horizon_steps"] in (24, 48)
        assert 300 <= statistics.mean(loads) <= 60_000
        per_hour = per_day // 24
        night = statistics.mean(
            v for i, v in enumerate(loads) if (i % per_day) // per_hour in (2, 3, 4)
        )
        evening = statistics.mean(
            v for i, v in enumerate(loads) if (i % per_day) // per_hour in (17, 18, 19)
        )
        assert evening > 1.15 * night
        if "temperature_c" in p:
            with_temperature += 1
            temps = p["temperature_c"]
            assert len(temps) == len(loads)
            assert max(temps) - min(temps) > 3.0
    assert with_temperature > 0


def test_storage_battery_is_realistic(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Batteries have realistic size, C-rate, efficiency and a peaky price schedule."""
    for p in _payloads(batches, "storage"):
        capacity = p["capacity_kwh"]
        assert 500 <= capacity <= 20_000
        assert 0.25 <= p["max_charge_kw"] / capacity <= 1.0
        assert 0.85 <= p["efficiency"] <= 0.95
        assert p["soc_min_kwh"] <= p["soc_initial_kwh"] <= p["soc_max_kwh"] <= capacity
        prices = p["price_schedule"]
        assert 24 <= len(prices) <= 48
        assert max(prices) > 1.3 * statistics.median(prices)


def test_grid_switch_sources_cover_load(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Grid switches have 3-6 distinct sources whose capacity covers most of the peak."""
    for p in _payloads(batches, "grid_switch"):
        sources = p["sources"]
        assert 3 <= len(sources) <= 6
        assert len({s["kind"] for s in sources}) >= 2
        assert len({s["cost_per_kwh"] for s in sources}) >= 2
        assert sum(s["capacity_kw"] for s in sources) >= 0.9 * max(p["load_forecast"])


def test_simulation_scenarios(batches: dict[int, list[dict[str, Any]]]) -> None:
    """Simulations wrap a non-simulation base and 2-6 uniquely named scenarios."""
    bases: Counter[str] = Counter()
    for r in _all(batches):
        if r["request_type"] != "simulation":
            continue
        payload = r["payload"]
        bases[payload["base"]["request_type"]] += 1
        names = [s["name"] for s in payload["scenarios"]]
        assert 2 <= len(names) <= 6
        assert len(set(names)) == len(names)
    assert set(bases) == {"forecast", "storage", "grid_switch"}
