"""Plots: every kind of run renders to a PNG, forecasts pick up actuals, failures are refused."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from matplotlib import dates as mdates
from PIL import Image

from contracts.requests import AnyRequest
from producers.sample import generate_requests
from qnn_emulator.predictors import predict
from tests.support.runs import ADAPTER, import_days, insert_run
from worker.analytics.plots import (
    RunNotPlottable,
    fetch_run,
    forecast_figure,
    plot_run,
    save_demo_plots,
)
from worker.core.result_checks import check_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample(kind: str, base: str | None = None, seed: int = 5) -> AnyRequest:
    """The first sample request of a kind (and, for a simulation, of a base type)."""
    for doc in generate_requests(80, seed):
        if doc["request_type"] != kind:
            continue
        if base is not None and doc["payload"]["base"]["request_type"] != base:
            continue
        return ADAPTER.validate_python(doc)
    raise LookupError(kind)


async def store(pool: asyncpg.Pool, request: AnyRequest, **kw: Any) -> uuid.UUID:
    """Run the emulator's model on the request and store the checked result as a completed run."""
    result, _ = check_result(request, predict(request.payload).result, {})
    return await insert_run(
        pool,
        forecast_date=request.forecast_date,
        request_type=request.request_type,
        region=request.region,
        payload=request.payload.model_dump(mode="json"),
        result=result,
        **kw,
    )


def assert_png(path: Path, min_width: int = 800) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    with Image.open(path) as img:
        assert img.width >= min_width and img.height >= 400


@pytest.mark.parametrize(
    ("kind", "base"),
    [
        ("forecast", None),
        ("storage", None),
        ("grid_switch", None),
        ("simulation", "forecast"),
        ("simulation", "storage"),
        ("simulation", "grid_switch"),
    ],
)
async def test_every_kind_renders(
    pool: asyncpg.Pool, tmp_path: Path, kind: str, base: str | None
) -> None:
    """Each request type (and each simulation base) becomes a non-empty PNG."""
    run_id = await store(pool, sample(kind, base))
    out = await plot_run(pool, str(run_id), tmp_path / f"{kind}-{base}.png")
    assert_png(out)


async def test_forecast_plot_includes_actuals_when_stored(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A forecast whose day has been imported is drawn with the actual load."""
    request = sample("forecast")
    run_id = await store(pool, request)
    run = await fetch_run(pool, str(run_id))
    assert run.actuals == {}
    steps = len(run.result["forecast"])
    resolution = run.result["resolution_minutes"]
    per_day = 1440 // resolution
    forecast = run.result["forecast"] + [run.result["forecast"][-1]] * per_day
    days = {
        request.forecast_date + timedelta(days=i): [
            v * (1.03 if k % 2 else 0.98) for k, v in enumerate(forecast[i * per_day :][:per_day])
        ]
        for i in range(-(-steps // per_day))
    }
    await import_days(pool, days, region=request.region, res=resolution)
    run = await fetch_run(pool, str(run_id))
    assert set(run.actuals) == set(days)
    assert_png(await plot_run(pool, str(run_id), tmp_path / "with-actuals.png"))


async def test_forecast_time_axis_says_what_it_shows(pool: asyncpg.Pool) -> None:
    """The axis spans the history before forecast_date 00:00 as well as the forecast: its label
    says so (not "forecast_date 00:00 onwards"), names no time zone the data does not have, and
    the split is drawn where the label says."""
    request = sample("forecast")
    run = await fetch_run(pool, str(await store(pool, request)))
    assert run.payload["historical_loads"]
    ax = forecast_figure(run).axes[0]
    label = ax.get_xlabel()
    assert "onwards" not in label and "local to the data" not in label
    assert label == (
        "Time, as the data gives it (no time zone): history up to the dotted line, "
        f"forecast from {request.forecast_date} 00:00"
    )
    start = mdates.date2num(datetime.combine(request.forecast_date, time()))
    low, high = ax.get_xlim()
    assert low < start - 1 < start < high  # more than a day of history left of the split
    split = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [list(line.get_xdata()) for line in split] == [[start, start]]
    assert "forecast start" in [t.get_text() for t in ax.texts]


async def test_runs_without_results_are_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """A failed run or an unknown id raises RunNotPlottable and writes nothing."""
    failed = await insert_run(pool, forecast_date=date(2025, 6, 1), result={}, status="failed")
    with pytest.raises(RunNotPlottable, match="is failed"):
        await plot_run(pool, str(failed), tmp_path / "x.png")
    with pytest.raises(RunNotPlottable, match="no run"):
        await plot_run(pool, str(uuid.uuid4()), tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


async def test_save_demo_plots_draws_the_latest_of_each_kind(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """One PNG per kind that has a completed run, named after the kind."""
    for kind in ("forecast", "storage", "grid_switch"):
        await store(pool, sample(kind))
    paths = await save_demo_plots(pool, tmp_path / "plots")
    assert [p.name for p in paths] == ["forecast.png", "storage.png", "grid_switch.png"]
    for path in paths:
        assert_png(path)
