"""Datasets: CSV/NDJSON import with per-row errors, upserts, listing, and history by reference."""

from __future__ import annotations

import gzip
import io
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import ValidationError

from contracts.requests import (
    DatasetRef,
    ForecastRequest,
    SimulationRequest,
    StorageRequest,
)
from worker.core.history import DatasetError, DatasetNotFound, resolve_dataset_ref
from worker.ops.datasets import DatasetFormatError, format_datasets, import_datasets, list_datasets
from worker.runtime.history import load_history, resolve_request

DAY = date(2025, 6, 1)


def day_loads(day: int, resolution: int = 60, base: float = 100.0) -> list[float]:
    """A distinguishable day: value = base + 1000*day + step."""
    return [base + 1000 * day + i for i in range(1440 // resolution)]


def nd_row(day: int, *, region: str = "North", resolution: int = 60, **extra: Any) -> bytes:
    doc = {
        "region": region,
        "date": (DAY + timedelta(days=day)).isoformat(),
        "resolution_minutes": resolution,
        "loads": day_loads(day, resolution),
        **extra,
    }
    return orjson.dumps(doc)


def csv_line(
    day: int, *, loads: list[float] | None = None, temps: str = "", extra: str = ""
) -> str:
    values = ";".join(f"{v:g}" for v in (loads if loads is not None else day_loads(day)))
    return f"North,{DAY + timedelta(days=day)},60,{values},{temps},{extra}\n"


CSV_HEADER = "region,date,resolution_minutes,loads,temperature_c,storage_state\n"


async def stored(pool: asyncpg.Pool) -> dict[tuple[str, date], asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM energy_datasets")
    return {(r["region"], r["data_date"]): r for r in rows}


async def test_csv_import_stores_good_rows_and_reports_bad_ones(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Good CSV rows land in energy_datasets; bad ones are named by line and field and skipped."""
    temps = " ".join(str(10 + i % 5) for i in range(24))
    text = (
        CSV_HEADER
        + csv_line(0, temps=temps, extra='"{""soc_kwh"": 120}"')
        + csv_line(1, loads=[100.0] * 23)  # line 3: a day short
        + csv_line(2, loads=[-5.0] + [100.0] * 23)  # line 4: negative load
        + "North,2025-06-0x,60,1;2,,\n"  # line 5: bad date (and short)
        + csv_line(4)
        + "\n"
        + csv_line(5, temps="1;2;3")  # line 8: temperatures not aligned
        + csv_line(6, loads=[float("nan")] + [1.0] * 23)  # line 9: NaN
    )
    path = tmp_path / "days.csv"
    path.write_text(text)
    report = await import_datasets(pool, path)
    assert (report.rows, report.inserted, report.rejected) == (7, 2, 5)
    messages = [str(e) for e in report.errors]
    assert "line 3: loads: 23 values; a day at 60 minutes has 24" in messages
    assert "line 4: loads[0]: Input should be greater than or equal to 0" in messages
    assert any(m.startswith("line 5: date: ") for m in messages)
    assert "line 8: temperature_c: 3 values, loads has 24; one per step" in messages
    assert "line 9: loads[0]: Input should be a finite number" in messages
    rows = await stored(pool)
    assert set(rows) == {("North", DAY), ("North", DAY + timedelta(days=4))}
    first = rows[("North", DAY)]
    assert list(first["historical_loads"]) == day_loads(0)
    assert first["resolution_minutes"] == 60
    assert first["weather_data"] == {"temperature_c": [float(10 + i % 5) for i in range(24)]}
    assert first["storage_state"] == {"soc_kwh": 120}
    assert rows[("North", DAY + timedelta(days=4))]["weather_data"] is None


async def test_ndjson_import_with_bad_lines(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """NDJSON: invalid JSON, unknown fields and wrong lengths are reported; the rest is stored."""
    prices = [0.1 + i / 100 for i in range(96)]
    lines = [
        nd_row(0, resolution=15, prices=prices),
        b"{not json",
        nd_row(1, colour="blue"),
        nd_row(2, resolution=45),
        b"[1, 2, 3]",
        nd_row(3, region="South", temperature_c=[20.0] * 24, storage_state={"soc_kwh": 5}),
        nd_row(4, prices=[1.0] * 12),
    ]
    path = tmp_path / "days.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = await import_datasets(pool, path)
    assert (report.rows, report.inserted, report.rejected) == (7, 2, 5)
    by_line = {e.line: str(e) for e in report.errors}
    assert by_line[2].startswith("line 2: (line): invalid JSON")
    assert by_line[3] == "line 3: colour: unknown field"
    assert by_line[4] == "line 4: resolution_minutes: must be one of 15, 30, 60, not 45"
    assert by_line[5] == "line 5: (line): not a JSON object"
    assert by_line[7] == "line 7: prices: 12 values, loads has 24; one per step"
    rows = await stored(pool)
    assert rows[("North", DAY)]["pricing_schedule"] == {"prices": prices}
    assert len(rows[("North", DAY)]["historical_loads"]) == 96
    assert rows[("South", DAY + timedelta(days=3))]["storage_state"] == {"soc_kwh": 5}


async def test_reimport_updates_instead_of_duplicating(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """Importing the same days again updates them (and bumps updated_at) only if they changed."""
    path = tmp_path / "a.ndjson"
    path.write_bytes(b"\n".join(nd_row(d, temperature_c=[15.0] * 24) for d in range(3)))
    first = await import_datasets(pool, path)
    assert (first.inserted, first.updated, first.unchanged) == (3, 0, 0)
    before = await stored(pool)

    same = await import_datasets(pool, path)
    assert (same.inserted, same.updated, same.unchanged, same.touched) == (0, 0, 3, [])
    assert {k: r["updated_at"] for k, r in (await stored(pool)).items()} == {
        k: r["updated_at"] for k, r in before.items()
    }

    changed = orjson.loads(nd_row(1))
    changed["loads"][5] = 1.5
    path.write_bytes(nd_row(0) + b"\n" + orjson.dumps(changed) + b"\n" + nd_row(7))
    again = await import_datasets(pool, path)
    assert (again.inserted, again.updated, again.unchanged) == (1, 1, 1)
    assert sorted(again.touched) == [("North", DAY + timedelta(days=d)) for d in (1, 7)]
    after = await stored(pool)
    assert len(after) == 4
    assert await pool.fetchval("SELECT count(*) FROM energy_datasets") == 4
    day1 = after[("North", DAY + timedelta(days=1))]
    assert day1["historical_loads"][5] == 1.5
    assert day1["updated_at"] > before[("North", DAY + timedelta(days=1))]["updated_at"]
    # Omitted optional fields keep their stored values.
    assert day1["weather_data"] == {"temperature_c": [15.0] * 24}


async def test_same_day_twice_in_a_file_later_line_wins(pool: asyncpg.Pool) -> None:
    """Two rows for one region and day in one file: one row stored, the later line's values."""
    later = orjson.loads(nd_row(0))
    later["loads"] = [7.0] * 24
    stream = io.StringIO(nd_row(0).decode() + "\n" + orjson.dumps(later).decode() + "\n")
    report = await import_datasets(pool, stream)
    assert (report.inserted, report.superseded) == (1, 1)
    assert list(await pool.fetchval("SELECT historical_loads FROM energy_datasets")) == [7.0] * 24


async def test_chunks_and_progress(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """Small chunks write everything and the progress callback accounts for every row."""
    path = tmp_path / "many.ndjson.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join([*(nd_row(d) for d in range(11)), b"{}"]))
    seen: list[int] = []
    report = await import_datasets(pool, path, progress=seen.append, chunk_rows=3)
    assert report.inserted == 11 and report.rejected == 1
    assert sum(seen) == 12 and len(seen) >= 4
    assert await pool.fetchval("SELECT count(*) FROM energy_datasets") == 11


async def test_format_detection_on_streams_and_bad_header(pool: asyncpg.Pool) -> None:
    """Streams are sniffed (object → NDJSON, else CSV); a CSV header missing columns fails whole."""
    csv_report = await import_datasets(pool, io.StringIO(CSV_HEADER + csv_line(0)))
    nd_report = await import_datasets(pool, io.StringIO("\n" + nd_row(1).decode()))
    assert csv_report.inserted == nd_report.inserted == 1
    with pytest.raises(DatasetFormatError, match=r"lacks loads.*unknown columns load_00"):
        await import_datasets(pool, io.StringIO("region,date,resolution_minutes,load_00\n"))


async def test_list_datasets_shows_periods_and_gaps(pool: asyncpg.Pool) -> None:
    """Listing gives each region's first and last day, day count and missing days."""
    lines = [nd_row(d) for d in (0, 1, 2, 5)] + [nd_row(0, region="South", resolution=30)]
    await import_datasets(pool, io.StringIO(b"\n".join(lines).decode()))
    rows = await list_datasets(pool)
    assert [(r["region"], r["days"], r["missing_days"], r["resolution_minutes"]) for r in rows] == [
        ("North", 4, 2, 60),
        ("South", 1, 0, 30),
    ]
    assert rows[0]["first_date"] == DAY and rows[0]["last_date"] == DAY + timedelta(days=5)
    assert [r["region"] for r in await list_datasets(pool, region="South")] == ["South"]
    assert "North" in format_datasets(rows)


async def test_load_history_concatenates_in_date_order(pool: asyncpg.Pool) -> None:
    """History is the days' loads oldest first; temperatures only when every day has them."""
    lines = [nd_row(d, temperature_c=[10.0 + d] * 24) for d in (2, 0, 1)] + [nd_row(3)]
    await import_datasets(pool, io.StringIO(b"\n".join(lines).decode()))
    async with pool.acquire() as conn:
        loads, temps, res = await load_history(
            conn, DatasetRef(region="North", start_date=DAY, end_date=DAY + timedelta(days=2))
        )
        assert res == 60
        assert loads == day_loads(0) + day_loads(1) + day_loads(2)
        assert temps == [10.0] * 24 + [11.0] * 24 + [12.0] * 24
        _, temps, _ = await load_history(
            conn, DatasetRef(region="North", start_date=DAY, end_date=DAY + timedelta(days=3))
        )
        assert temps is None


async def test_load_history_names_missing_days(pool: asyncpg.Pool) -> None:
    """A reference to days not stored raises DatasetNotFound listing them as ranges."""
    await import_datasets(pool, io.StringIO(b"\n".join(nd_row(d) for d in (0, 3)).decode()))
    ref = DatasetRef(region="North", start_date=DAY, end_date=DAY + timedelta(days=6))
    with pytest.raises(DatasetNotFound) as caught:
        await load_history(pool, ref)
    assert caught.value.missing == [DAY + timedelta(days=d) for d in (1, 2, 4, 5, 6)]
    assert "2025-06-02..2025-06-03, 2025-06-05..2025-06-07" in str(caught.value)
    assert "5 of 7 days missing" in str(caught.value)
    with pytest.raises(DatasetNotFound, match="'Nowhere'"):
        await load_history(pool, DatasetRef(region="Nowhere", start_date=DAY, end_date=DAY))


async def test_load_history_rejects_mixed_resolutions(pool: asyncpg.Pool) -> None:
    """Days stored at different resolutions cannot be concatenated into one series."""
    lines = [nd_row(0), nd_row(1, resolution=15)]
    await import_datasets(pool, io.StringIO(b"\n".join(lines).decode()))
    ref = DatasetRef(region="North", start_date=DAY, end_date=DAY + timedelta(days=1))
    with pytest.raises(DatasetError, match="mixes resolutions: 15 min on 2025-06-02"):
        await load_history(pool, ref)


def forecast_doc(**payload: Any) -> dict[str, Any]:
    return {
        "request_id": "f-1",
        "request_type": "forecast",
        "region": "North",
        "forecast_date": (DAY + timedelta(days=3)).isoformat(),
        "payload": {
            "dataset_ref": {
                "region": "North",
                "start_date": DAY.isoformat(),
                "end_date": (DAY + timedelta(days=2)).isoformat(),
            },
            **payload,
        },
    }


def test_resolve_dataset_ref_fills_a_forecast() -> None:
    """The resolved forecast carries the history and temperatures at the data's resolution."""
    request = ForecastRequest.model_validate(forecast_doc(horizon_steps=96, resolution_minutes=15))
    assert request.payload.needs_history
    loads = [float(i) for i in range(3 * 96)]
    resolved = resolve_dataset_ref(request, loads, [20.0] * len(loads), 15)
    assert isinstance(resolved, ForecastRequest)
    assert resolved.payload.historical_loads == loads
    assert resolved.payload.temperature_c == [20.0] * len(loads)
    assert resolved.payload.resolution_minutes == 15
    assert resolved.payload.dataset_ref == request.payload.dataset_ref
    assert not resolved.payload.needs_history
    assert resolve_dataset_ref(resolved, [1.0], None, 60) is resolved  # nothing left to resolve


def test_resolve_dataset_ref_averages_to_a_coarser_resolution() -> None:
    """Hourly steps (asked for, or the default) from 15-minute data get hourly means."""
    loads = [float(i % 4) for i in range(3 * 96)]
    temps = [float(i % 2) for i in range(3 * 96)]
    for doc in (forecast_doc(resolution_minutes=60), forecast_doc()):
        request = ForecastRequest.model_validate(doc)
        resolved = resolve_dataset_ref(request, loads, temps, 15)
        assert isinstance(resolved, ForecastRequest)
        assert resolved.payload.resolution_minutes == 60
        assert resolved.payload.historical_loads == [1.5] * 72
        assert resolved.payload.temperature_c == [0.5] * 72
    finer = ForecastRequest.model_validate(forecast_doc(resolution_minutes=15))
    with pytest.raises(DatasetError, match="15-minute forecast cannot"):
        resolve_dataset_ref(finer, [1.0] * 72, None, 60)


def test_resolve_dataset_ref_validates_the_result() -> None:
    """Too little or invalid history is refused like an inline request would be."""
    request = ForecastRequest.model_validate(forecast_doc())
    with pytest.raises(DatasetError, match="at least 24"):
        resolve_dataset_ref(request, [1.0] * 10, None, 60)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        resolve_dataset_ref(request, [-1.0] * 24, None, 60)


def test_resolve_dataset_ref_replays_a_period_in_a_simulation() -> None:
    """A simulation whose base forecast names a stored period gets the history in its base."""
    base = forecast_doc(horizon_steps=24)
    doc = {
        **{k: base[k] for k in ("region", "forecast_date")},
        "request_id": "sim-1",
        "request_type": "simulation",
        "payload": {
            "base": {"request_type": "forecast", "payload": base["payload"]},
            "scenarios": [{"name": "hot", "temperature_delta_c": 5}],
        },
    }
    request = SimulationRequest.model_validate(doc)
    resolved = resolve_dataset_ref(request, [100.0] * 72, None, 60)
    assert isinstance(resolved, SimulationRequest)
    assert resolved.payload.base.payload.historical_loads == [100.0] * 72  # type: ignore[union-attr]
    assert resolved.payload.scenarios == request.payload.scenarios
    storage = StorageRequest.model_validate(
        {
            "request_id": "s-1",
            "request_type": "storage",
            "region": "North",
            "forecast_date": "2025-06-04",
            "payload": {
                "capacity_kwh": 10,
                "max_charge_kw": 5,
                "max_discharge_kw": 5,
                "soc_initial_kwh": 5,
                "soc_max_kwh": 10,
                "price_schedule": [0.1] * 24,
            },
        }
    )
    assert resolve_dataset_ref(storage, [1.0] * 24, None, 60) is storage


async def test_resolve_request_reads_the_stored_period(pool: asyncpg.Pool) -> None:
    """resolve_request = load_history + resolve_dataset_ref against the database."""
    await import_datasets(pool, io.StringIO(b"\n".join(nd_row(d) for d in range(3)).decode()))
    request = ForecastRequest.model_validate(forecast_doc())
    resolved = await resolve_request(pool, request)
    assert isinstance(resolved, ForecastRequest)
    assert resolved.payload.historical_loads == day_loads(0) + day_loads(1) + day_loads(2)
