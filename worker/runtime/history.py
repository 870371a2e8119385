"""The stored days a request's `dataset_ref` names, read from `energy_datasets` and made inline."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import orjson

from contracts.requests import AnyRequest, DatasetRef
from worker.core.history import (
    MINUTES_PER_DAY,
    DatasetError,
    DatasetNotFound,
    dataset_ref_of,
    date_ranges,
    resolve_dataset_ref,
    span_days,
)

_HISTORY = """
SELECT data_date, resolution_minutes, historical_loads,
       weather_data -> 'temperature_c' AS temperature_c
FROM energy_datasets
WHERE region = $1 AND data_date BETWEEN $2 AND $3 AND historical_loads IS NOT NULL
ORDER BY data_date
"""



def _as_list(value: object) -> list[float] | None:
    # Connections without eglo's JSON codec hand jsonb back as text.
    if isinstance(value, str):
        value = orjson.loads(value)
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    return None


async def load_history(
    conn: asyncpg.Connection | asyncpg.Pool, ref: DatasetRef
) -> tuple[list[float], list[float] | None, int]:
    """(loads, temperatures, resolution_minutes) of the referenced days, oldest first.

    Temperatures are returned only when every day has an aligned series. Raises DatasetNotFound
    naming the missing days, or DatasetError when the days disagree on resolution.
    """
    rows = await conn.fetch(_HISTORY, ref.region, ref.start_date, ref.end_date)
    have = {r["data_date"] for r in rows}
    wanted = [ref.start_date + timedelta(days=i) for i in range(span_days(ref))]
    missing = [d for d in wanted if d not in have]
    if missing:
        raise DatasetNotFound(ref, missing)
    resolutions = {r["resolution_minutes"] for r in rows}
    if len(resolutions) != 1:
        by_res = {
            res: [r["data_date"] for r in rows if r["resolution_minutes"] == res]
            for res in sorted(resolutions)
        }
        raise DatasetError(
            f"region {ref.region!r} {ref.start_date}..{ref.end_date} mixes resolutions: "
            + "; ".join(f"{res} min on {date_ranges(days)}" for res, days in by_res.items())
        )
    resolution = resolutions.pop()
    per_day = MINUTES_PER_DAY // resolution
    loads: list[float] = []
    temps: list[float] | None = []
    for r in rows:
        day_loads = list(r["historical_loads"])
        if len(day_loads) != per_day:
            raise DatasetError(
                f"region {ref.region!r} {r['data_date']}: {len(day_loads)} loads stored, "
                f"a {resolution}-minute day has {per_day}"
            )
        loads.extend(day_loads)
        day_temps = _as_list(r["temperature_c"])
        if temps is not None and day_temps is not None and len(day_temps) == per_day:
            temps.extend(day_temps)
        else:
            temps = None
    return loads, temps, resolution


async def resolve_request(
    conn: asyncpg.Connection | asyncpg.Pool, request: AnyRequest
) -> AnyRequest:
    """`load_history` + `resolve_dataset_ref` for whatever the request references (if anything)."""
    ref = dataset_ref_of(request)
    if ref is None:
        return request
    loads, temps, resolution = await load_history(conn, ref)
    return resolve_dataset_ref(request, loads, temps, resolution)
