"""Deterministic, realistic sample optimization requests for demos, load tests and fixtures.

`generate_requests(count, seed)` returns JSON-ready dicts that validate against
`contracts.requests.OptimizationRequest`. Request `i` of a seed depends only on
`(seed, i)`, so a shorter run is always a prefix of a longer one, and request ids
(`f"{id_prefix}-{seed}-{i:06d}"`) are unique per `(id_prefix, seed, index)`.

Types are mixed round-robin in blocks of four (each block is a seeded permutation of
forecast/storage/grid_switch/simulation), so any `count >= 4` holds every type.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final

from contracts.requests import REQUEST_TYPES, SCHEMA_VERSION

__all__ = ["REGIONS", "Region", "generate_request", "generate_requests"]

_EPOCH: Final = date(2024, 1, 1)
_DATE_SPAN_DAYS: Final = 2 * 365


@dataclass(frozen=True, slots=True)
class Region:
    """A grid region: typical average load and climate used to shape sample data."""

    name: str
    mean_load_mw: float
    hemisphere: int  # +1 north, -1 south: flips the seasonal temperature cycle
    mean_temp_c: float  # annual mean temperature
    seasonal_amp_c: float  # half the summer/winter difference of daily means
    cooling_driven: bool  # summer (air conditioning) rather than winter peaks


REGIONS: Final[tuple[Region, ...]] = (
    Region("California", 27_000, 1, 16.0, 7.0, True),
    Region("Texas", 40_000, 1, 20.0, 9.0, True),
    Region("Ontario", 15_500, 1, 7.0, 13.0, False),
    Region("Bavaria", 9_500, 1, 8.5, 9.5, False),
    Region("New York", 17_500, 1, 12.5, 11.0, True),
    Region("Alberta", 10_500, 1, 4.0, 13.0, False),
    Region("Queensland", 6_500, -1, 21.0, 5.0, True),
    Region("Victoria", 5_000, -1, 15.0, 5.5, False),
    Region("Denmark", 4_000, 1, 8.5, 7.5, False),
    Region("Ireland", 3_800, 1, 10.0, 4.5, False),
    Region("Scotland", 3_000, 1, 8.5, 5.0, False),
    Region("Catalonia", 5_200, 1, 16.5, 7.5, True),
    Region("Tasmania", 1_150, -1, 11.5, 4.0, False),
    Region("Hawaii", 1_050, 1, 25.0, 1.8, True),
    Region("Iceland", 2_200, 1, 4.5, 5.5, False),
    Region("Kansai", 16_000, 1, 16.5, 10.0, True),
)


def generate_requests(count: int, seed: int, *, id_prefix: str = "sample") -> list[dict[str, Any]]:
    """Return `count` JSON-ready requests of all four types, deterministic for `seed`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [generate_request(seed, i, id_prefix=id_prefix) for i in range(count)]


def generate_request(seed: int, index: int, *, id_prefix: str = "sample") -> dict[str, Any]:
    """Return request number `index` of the sample stream for `seed` (JSON-ready dict)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    block, slot = divmod(index, len(REQUEST_TYPES))
    order = list(REQUEST_TYPES)
    random.Random(f"eglo-sample:{seed}:block:{block}").shuffle(order)
    request_type = order[slot]

    rng = random.Random(f"eglo-sample:{seed}:request:{index}")
    region = rng.choice(REGIONS)
    forecast_date = _EPOCH + timedelta(days=rng.randrange(_DATE_SPAN_DAYS))
    if request_type == "simulation":
        payload = _simulation_payload(rng, region, forecast_date)
    else:
        payload = _PAYLOAD_BUILDERS[request_type](rng, region, forecast_date)
    return {
        "schema_version": SCHEMA_VERSION,
        "request_id": f"{id_prefix}-{seed}-{index:06d}",
        "request_type": request_type,
        "region": region.name,
        "forecast_date": forecast_date.isoformat(),
        "payload": payload,
    }


# --------------------------------------------------------------------------- shapes


def _bump(hour: float, centre: float, width: float) -> float:
    """Gaussian bump on the 24-hour clock (wraps around midnight)."""
    d = min(abs(hour - centre), 24.0 - abs(hour - centre))
    return math.exp(-0.5 * (d / width) ** 2)


def _daily_load_factor(hour: float, weekday: int) -> float:
    """Relative load (about 0.65-1.15) with a night trough, morning and evening peaks."""
    weekend = weekday >= 5
    morning = 0.17 * _bump(hour, 9.5 if weekend else 8.0, 1.8)
    evening = 0.27 * _bump(hour, 18.5, 2.3)
    daytime = (0.07 if weekend else 0.12) * _bump(hour, 13.0, 3.5)
    night = -0.12 * _bump(hour, 3.5, 2.2)
    factor = 0.78 + morning + evening + daytime + night
    return factor * (0.9 if weekend else 1.0)


def _seasonal_temp(region: Region, day: date) -> float:
    """Daily mean temperature: warmest around late July (north) / late January (south)."""
    phase = 2.0 * math.pi * (day.timetuple().tm_yday - 205) / 365.25
    return region.mean_temp_c + region.hemisphere * region.seasonal_amp_c * math.cos(phase)


def _temperature(region: Region, when: datetime, day_offset_c: float) -> float:
    """Hourly temperature with a daily cycle peaking mid-afternoon."""
    hour = when.hour + when.minute / 60.0
    daily = 4.5 * math.cos(2.0 * math.pi * (hour - 15.0) / 24.0)
    return _seasonal_temp(region, when.date()) + day_offset_c + daily


def _weather_load_factor(region: Region, temp_c: float) -> float:
    """Extra load from heating below 15 C and cooling above 22 C."""
    heating = max(0.0, 15.0 - temp_c) * (0.006 if region.cooling_driven else 0.011)
    cooling = max(0.0, temp_c - 22.0) * (0.022 if region.cooling_driven else 0.008)
    return 1.0 + heating + cooling


# --------------------------------------------------------------------------- payloads


def _forecast_payload(rng: random.Random, region: Region, forecast_date: date) -> dict[str, Any]:
    resolution = rng.choice((60, 30))
    steps_per_hour = 60 // resolution
    days = rng.randint(7, 14)
    horizon = rng.choice((24, 48))
    scale = region.mean_load_mw * rng.uniform(0.9, 1.1)
    start = datetime.combine(forecast_date - timedelta(days=days), datetime.min.time())

    loads: list[float] = []
    temps: list[float] = []
    day_offsets = [rng.gauss(0.0, 2.5) for _ in range(days)]
    ar_noise = 0.0
    for k in range(days * 24 * steps_per_hour):
        when = start + timedelta(minutes=k * resolution)
        hour = when.hour + when.minute / 60.0
        temp = _temperature(region, when, day_offsets[k // (24 * steps_per_hour)])
        temp += rng.gauss(0.0, 0.4)
        ar_noise = 0.8 * ar_noise + rng.gauss(0.0, 0.012)  # persistent, not white, noise
        level = scale * _daily_load_factor(hour, when.weekday())
        level *= _weather_load_factor(region, temp) * (1.0 + ar_noise)
        loads.append(round(max(level, 0.0), 1))
        temps.append(round(min(max(temp, -79.0), 69.0), 1))

    payload: dict[str, Any] = {
        "historical_loads": loads,
        "resolution_minutes": resolution,
        "horizon_steps": horizon,
    }
    if rng.random() < 0.7:
        payload["temperature_c"] = temps
    return payload


def _price_schedule(rng: random.Random, steps: int, resolution: int) -> list[float]:
    """Time-of-use tariff (currency/kWh): off-peak night, shoulder, steep evening peak."""
    off_peak = rng.uniform(0.07, 0.14)
    shoulder = off_peak + rng.uniform(0.05, 0.12)
    peak = shoulder + rng.uniform(0.12, 0.35)
    solar_dip = rng.random() < 0.3  # midday surplus pushes prices down (even negative)
    peak_start = rng.choice((16, 17))
    peak_end = peak_start + rng.choice((3, 4, 5))
    prices: list[float] = []
    for k in range(steps):
        hour = (k * resolution / 60.0) % 24.0
        if peak_start <= hour < peak_end:
            price = peak
        elif 7.0 <= hour < peak_start or peak_end <= hour < 22.0:
            price = shoulder
        else:
            price = off_peak
        if solar_dip and 10.0 <= hour < 15.0:
            price = rng.uniform(-0.02, off_peak * 0.6)
        prices.append(round(price * (1.0 + rng.gauss(0.0, 0.03)), 4))
    return prices


def _site_load_kw(
    rng: random.Random, peak_kw: float, steps: int, resolution: int, weekday: int
) -> list[float]:
    """A site/feeder load curve in kW with the regional daily shape."""
    loads: list[float] = []
    for k in range(steps):
        hour = (k * resolution / 60.0) % 24.0
        day = (weekday + int(k * resolution / 1440)) % 7
        level = peak_kw / 1.15 * _daily_load_factor(hour, day) * (1.0 + rng.gauss(0.0, 0.03))
        loads.append(round(max(level, 0.0), 1))
    return loads


def _storage_payload(rng: random.Random, region: Region, forecast_date: date) -> dict[str, Any]:
    resolution, steps = rng.choice(((60, 24), (60, 48), (30, 48)))
    capacity = float(rng.randrange(500, 20_001, 50))
    c_rate = rng.choice((0.25, 0.5, 0.5, 1.0))
    max_charge = round(capacity * c_rate, 1)
    max_discharge = round(capacity * c_rate * rng.choice((1.0, 1.0, 1.2)), 1)
    soc_min = round(capacity * rng.uniform(0.05, 0.15), 1)
    soc_max = round(capacity * rng.uniform(0.9, 1.0), 1)
    soc_initial = round(rng.uniform(soc_min, soc_min + 0.6 * (soc_max - soc_min)), 1)
    payload: dict[str, Any] = {
        "capacity_kwh": capacity,
        "max_charge_kw": max_charge,
        "max_discharge_kw": max_discharge,
        "efficiency": round(rng.uniform(0.85, 0.95), 3),
        "soc_initial_kwh": soc_initial,
        "soc_min_kwh": soc_min,
        "soc_max_kwh": soc_max,
        "price_schedule": _price_schedule(rng, steps, resolution),
        "resolution_minutes": resolution,
    }
    if rng.random() < 0.6:
        peak_kw = capacity * rng.uniform(0.2, 1.5)
        payload["load_forecast"] = _site_load_kw(
            rng, peak_kw, steps, resolution, forecast_date.weekday()
        )
    return payload


# (kind, name stem, cost range in currency/kWh)
_SOURCE_KINDS: Final[tuple[tuple[str, str, float, float], ...]] = (
    ("nuclear", "nuclear", 0.010, 0.030),
    ("hydro", "hydro", 0.015, 0.050),
    ("wind", "wind-farm", 0.000, 0.025),
    ("solar", "solar-park", 0.000, 0.030),
    ("coal", "coal-unit", 0.040, 0.075),
    ("gas", "gas-ccgt", 0.055, 0.095),
    ("gas", "gas-peaker", 0.110, 0.200),
    ("storage", "battery", 0.080, 0.150),
    ("other", "biomass", 0.070, 0.120),
)


def _grid_switch_payload(rng: random.Random, region: Region, forecast_date: date) -> dict[str, Any]:
    resolution = rng.choice((60, 30, 15))
    steps = 24 * 60 // resolution
    peak_kw = rng.uniform(5_000.0, 250_000.0)
    load = _site_load_kw(rng, peak_kw, steps, resolution, forecast_date.weekday())
    actual_peak = max(load)

    n_local = rng.randint(2, 5)
    picked = rng.sample(_SOURCE_KINDS, n_local)
    coverage = rng.uniform(0.75, 1.05)  # local sources cover most of the peak
    weights = [rng.uniform(0.5, 2.0) for _ in picked]
    total_w = sum(weights)
    sources: list[dict[str, Any]] = []
    for (kind, stem, lo, hi), w in zip(picked, weights, strict=True):
        sources.append(
            {
                "name": f"{region.name.lower().replace(' ', '-')}-{stem}",
                "kind": kind,
                "capacity_kw": round(actual_peak * coverage * w / total_w, 1),
                "cost_per_kwh": round(rng.uniform(lo, hi), 4),
            }
        )
    # the interconnector: expensive but large enough to close the gap
    sources.append(
        {
            "name": "grid-import",
            "kind": "grid",
            "capacity_kw": round(actual_peak * rng.uniform(0.3, 0.6), 1),
            "cost_per_kwh": round(rng.uniform(0.15, 0.35), 4),
        }
    )
    rng.shuffle(sources)
    return {"load_forecast": load, "resolution_minutes": resolution, "sources": sources}


# (name, load_scale range, price_scale range, temperature_delta_c range)
_SCENARIOS: Final[
    tuple[tuple[str, tuple[float, float], tuple[float, float], tuple[float, float]], ...]
] = (
    ("heatwave", (1.05, 1.25), (1.1, 1.8), (4.0, 9.0)),
    ("cold-snap", (1.05, 1.3), (1.1, 1.6), (-12.0, -5.0)),
    ("mild-weather", (0.9, 0.98), (0.85, 1.0), (-2.0, 2.0)),
    ("price-spike", (1.0, 1.0), (1.8, 3.5), (0.0, 0.0)),
    ("cheap-renewables", (1.0, 1.0), (0.4, 0.8), (0.0, 0.0)),
    ("demand-growth-5y", (1.08, 1.2), (1.0, 1.15), (0.0, 1.0)),
    ("ev-adoption", (1.1, 1.35), (1.0, 1.1), (0.0, 0.0)),
    ("industrial-shutdown", (0.7, 0.85), (0.8, 0.95), (0.0, 0.0)),
    ("drought", (1.0, 1.05), (1.2, 1.6), (1.0, 3.0)),
)


def _simulation_payload(rng: random.Random, region: Region, forecast_date: date) -> dict[str, Any]:
    base_type = rng.choice(("forecast", "storage", "grid_switch"))
    base = {
        "request_type": base_type,
        "payload": _PAYLOAD_BUILDERS[base_type](rng, region, forecast_date),
    }
    scenarios: list[dict[str, Any]] = [{"name": "baseline"}] if rng.random() < 0.5 else []
    for name, load, price, temp in rng.sample(_SCENARIOS, rng.randint(2, 6) - len(scenarios)):
        scenarios.append(
            {
                "name": name,
                "load_scale": round(rng.uniform(*load), 3),
                "price_scale": round(rng.uniform(*price), 3),
                "temperature_delta_c": round(rng.uniform(*temp), 1),
            }
        )
    return {"base": base, "scenarios": scenarios}


_PAYLOAD_BUILDERS: Final = {
    "forecast": _forecast_payload,
    "storage": _storage_payload,
    "grid_switch": _grid_switch_payload,
}
