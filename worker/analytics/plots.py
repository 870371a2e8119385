"""Pictures of stored runs (PNG, matplotlib's Agg backend, no display needed).

* forecast: the last days of history, the forecast and its interval band, and the actual load
  once `energy_datasets` holds it (with the MAPE against it in the subtitle);
* storage: the price, charge/discharge power and the state of charge on one time axis;
* grid_switch: supply stacked by source against the load line, with unserved load on top;
* simulation: the base type's picture for each scenario as small multiples (the first six).

Steps are drawn from `forecast_date` 00:00 at the run's resolution, the same alignment scoring
uses; inline history is assumed to end where the forecast starts. Times are the data's own: a
request's dates and its datasets' days carry no time zone and none is converted (accuracy.py), so
the axes name none.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import matplotlib
import numpy as np
import orjson
from numpy.typing import NDArray

matplotlib.use("Agg")  # before anything pulls in pyplot: never look for a display

from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from worker.analytics.accuracy import Unscorable, align_actuals, mape
from worker.core.history import MINUTES_PER_DAY

HISTORY_DAYS: Final = 3  # enough to see the daily shape the forecast continues
MAX_PANELS: Final = 6
DPI: Final = 110
KINDS: Final = ("forecast", "storage", "grid_switch", "simulation")

C_HISTORY = "#6b7280"
C_FORECAST = "#2563eb"
C_ACTUAL = "#111827"
C_CHARGE = "#16a34a"
C_DISCHARGE = "#ea580c"
C_PRICE = "#7c3aed"
C_SOC = "#0f766e"
C_UNSERVED = "#dc2626"
SOURCE_COLOURS = {
    "solar": "#facc15",
    "wind": "#38bdf8",
    "hydro": "#1d4ed8",
    "nuclear": "#a855f7",
    "gas": "#f97316",
    "coal": "#57534e",
    "grid": "#94a3b8",
    "storage": "#22c55e",
    "other": "#d4d4d8",
}
FALLBACK_COLOURS = ("#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#64748b")


TimeArray = NDArray[np.datetime64]


class RunNotPlottable(LookupError):
    """No such run, or it has no result to draw."""


@dataclass(frozen=True)
class RunData:
    run_id: str
    request_type: str
    region: str
    forecast_date: date
    model_id: str | None
    payload: dict[str, Any]
    result: dict[str, Any]
    actuals: dict[date, tuple[int, list[float]]]


# --- small helpers -----------------------------------------------------------------------------


def _doc(value: Any) -> dict[str, Any]:
    if isinstance(value, str | bytes):
        value = orjson.loads(value)
    return value if isinstance(value, dict) else {}


def _times(start: datetime, n: int, resolution: int, offset: int = 0) -> TimeArray:
    first = np.datetime64(start, "m") + np.timedelta64(offset * resolution, "m")
    return first + np.arange(n) * np.timedelta64(resolution, "m")


def _x(moment: datetime) -> float:
    """A datetime as a matplotlib x coordinate (for the APIs typed to take floats)."""
    return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]


def _power_unit(peak: float, unit: str) -> tuple[float, str]:
    """kW/kWh become MW/MWh when the numbers would otherwise need five digits."""
    if unit in ("kW", "kWh") and peak >= 10_000:
        return 1e-3, "M" + unit[1:]
    return 1.0, unit


def _thousands(ax: Axes) -> None:
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def _time_axis(ax: Axes, *, compact: bool = False) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=6 if compact else 10)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    # Hourly ticks: the offset is only the year. By default it was the last tick's day, the day
    # after the run's ("2025-Dec-06" under a 2025-12-04 schedule); the ticks at midnight name
    # their days anyway.
    offsets = ["", "%Y", "%Y-%b", "%Y", "%Y-%b-%d", "%Y-%b-%d %H:%M"]
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, offset_formats=offsets))  # type: ignore[no-untyped-call]


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _money(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "?"


def _steps_label(n: int, resolution: int) -> str:
    unit = "hourly" if resolution == 60 else f"{resolution}-min"
    return f"{n} {unit} steps"


def _actual_series(
    forecast_date: date,
    steps: int,
    resolution: int,
    actuals: Mapping[date, tuple[int, Sequence[float]]],
) -> list[float]:
    """Actual load per forecast step, NaN where a day is missing or cannot be lined up."""
    per_day = MINUTES_PER_DAY // resolution
    values = [math.nan] * steps
    for i in range(math.ceil(steps / per_day)):
        day = forecast_date + timedelta(days=i)
        if day not in actuals:
            continue
        count = min(per_day, steps - i * per_day)
        try:
            values[i * per_day : i * per_day + count] = align_actuals(
                day, count, resolution, {day: actuals[day]}
            )
        except Unscorable:
            continue
    return values


def _floats(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else []


# --- forecast ----------------------------------------------------------------------------------


def _draw_forecast(
    ax: Axes,
    start: datetime,
    payload: Mapping[str, Any],
    result: Mapping[str, Any],
    actual: Sequence[float] | None,
    *,
    compact: bool = False,
) -> None:
    resolution = int(result.get("resolution_minutes") or payload.get("resolution_minutes") or 60)
    forecast = _floats(result.get("forecast"))
    lower, upper = _floats(result.get("lower")), _floats(result.get("upper"))
    history = _floats(payload.get("historical_loads"))
    per_day = MINUTES_PER_DAY // resolution
    shown = history[-max(HISTORY_DAYS * per_day, len(forecast)) :] if history else []
    if shown:
        ax.plot(
            _times(start, len(shown), resolution, offset=-len(shown)),
            shown,
            color=C_HISTORY,
            linewidth=1.2,
            label="history" if compact else f"history (last {len(shown) // per_day} days)",
        )
    t = _times(start, len(forecast), resolution)
    if lower and upper and len(lower) == len(upper) == len(forecast):
        level = result.get("interval_level")
        ax.fill_between(
            t,
            lower,
            upper,
            color=C_FORECAST,
            alpha=0.18,
            linewidth=0,
            label=f"{level:.0%} interval" if isinstance(level, float) else "interval",
        )
    ax.plot(t, forecast, color=C_FORECAST, linewidth=2.0, label="forecast")
    if actual is not None and any(not math.isnan(v) for v in actual):
        ax.plot(t, actual, color=C_ACTUAL, linewidth=1.4, linestyle="--", label="actual")
    ax.axvline(_x(start), color="#9ca3af", linewidth=1, linestyle=":")
    if not compact:
        ax.annotate(
            "forecast start",
            xy=(_x(start), 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="#6b7280",
        )
    ax.set_ylabel("Load (MW)")
    _thousands(ax)
    _time_axis(ax, compact=compact)
    _style(ax)


def forecast_xlabel(forecast_date: date, history_shown: bool) -> str:
    """What the forecast plot's time axis shows: the data's own clock (no zone is known), the
    history before the dotted line when there is one, the forecast from `forecast_date` 00:00."""
    where = (
        f"history up to the dotted line, forecast from {forecast_date} 00:00"
        if history_shown
        else f"forecast from {forecast_date} 00:00"
    )
    return f"Time, as the data gives it (no time zone): {where}"


def forecast_figure(run: RunData) -> Figure:
    start = datetime.combine(run.forecast_date, time())
    result = run.result
    forecast = _floats(result.get("forecast"))
    resolution = int(result.get("resolution_minutes") or run.payload.get("resolution_minutes", 60))
    actual = _actual_series(run.forecast_date, len(forecast), resolution, run.actuals)
    known = [(a, f) for a, f in zip(actual, forecast, strict=True) if not math.isnan(a)]
    fig = Figure(figsize=(11, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _draw_forecast(ax, start, run.payload, result, actual)
    details = [f"model {run.model_id or 'unknown'}", _steps_label(len(forecast), resolution)]
    if known:
        err = mape([a for a, _ in known], [f for _, f in known])
        part = "" if len(known) == len(forecast) else f" ({len(known)} of {len(forecast)} steps)"
        details.append(f"MAPE vs actual {err:.2f}%{part}" if err is not None else "actual known")
    else:
        details.append("actual load not stored yet")
    fig.suptitle(f"Load forecast: {run.region}, {run.forecast_date}", fontweight="bold")
    ax.set_title(" · ".join(details), fontsize=10, color="#4b5563")
    ax.legend(loc="upper left", frameon=False, ncols=4, fontsize=9)
    ax.set_xlabel(
        forecast_xlabel(run.forecast_date, bool(_floats(run.payload.get("historical_loads"))))
    )
    return fig


def _render_forecast(run: RunData, out: Path) -> None:
    forecast_figure(run).savefig(out)


# --- storage -----------------------------------------------------------------------------------


def _draw_storage_compact(
    ax: Axes, start: datetime, payload: Mapping[str, Any], result: Mapping[str, Any]
) -> Axes:
    """Net battery power as bars with the state of charge on a second axis (small multiples)."""
    resolution = int(payload.get("resolution_minutes", 60))
    charge, discharge = _floats(result.get("charge_kw")), _floats(result.get("discharge_kw"))
    soc = _floats(result.get("soc_kwh"))
    t = _times(start, len(charge), resolution)
    width = resolution / MINUTES_PER_DAY
    ax.bar(t, charge, width=width, align="edge", color=C_CHARGE, label="charge")
    ax.bar(
        t, [-d for d in discharge], width=width, align="edge", color=C_DISCHARGE, label="discharge"
    )
    ax.axhline(0, color="#9ca3af", linewidth=0.8)
    ax.set_ylabel("Battery power (kW)")
    _thousands(ax)
    soc_ax = ax.twinx()
    soc_ax.plot(
        _times(start, len(soc) + 1, resolution),
        [payload.get("soc_initial_kwh", soc[0] if soc else 0), *soc],
        color=C_SOC,
        linewidth=1.6,
        label="state of charge",
    )
    soc_ax.set_ylim(0, float(payload.get("capacity_kwh", max(soc or [1]))) * 1.05)
    soc_ax.set_ylabel("State of charge (kWh)")
    soc_ax.spines["top"].set_visible(False)
    _thousands(soc_ax)
    _time_axis(ax, compact=True)
    _style(ax)
    return soc_ax


def _render_storage(run: RunData, out: Path) -> None:
    p, r = run.payload, run.result
    start = datetime.combine(run.forecast_date, time())
    resolution = int(p.get("resolution_minutes", 60))
    prices = _floats(p.get("price_schedule"))
    charge, discharge = _floats(r.get("charge_kw")), _floats(r.get("discharge_kw"))
    soc = _floats(r.get("soc_kwh"))
    fig = Figure(figsize=(11, 8), dpi=DPI, layout="constrained")
    price_ax, power_ax, soc_ax = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.3, 1.2]}
    )
    n = len(prices)
    t_edges = _times(start, n + 1, resolution)
    price_ax.step(
        t_edges, [*prices, prices[-1]] if prices else [], where="post", color=C_PRICE, linewidth=1.6
    )
    price_ax.set_ylabel("Price (per kWh)")
    price_ax.set_title("Energy price", loc="left", fontsize=10)

    t = _times(start, len(charge), resolution)
    width = resolution / MINUTES_PER_DAY
    power_ax.bar(t, charge, width=width, align="edge", color=C_CHARGE, label="charge")
    power_ax.bar(
        t, [-d for d in discharge], width=width, align="edge", color=C_DISCHARGE, label="discharge"
    )
    power_ax.axhline(0, color="#6b7280", linewidth=0.8)
    for limit, name in (
        (p.get("max_charge_kw"), "max charge"),
        (-(p.get("max_discharge_kw") or 0), "max discharge"),
    ):
        if limit:
            power_ax.axhline(limit, color="#9ca3af", linewidth=0.8, linestyle="--")
            power_ax.annotate(
                name,
                xy=(1, limit),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=8,
                color="#6b7280",
            )
    power_ax.set_ylabel("Battery power (kW)\ncharge + / discharge -")
    power_ax.set_title("Charge and discharge", loc="left", fontsize=10)
    power_ax.legend(loc="lower right", bbox_to_anchor=(1, 1), frameon=False, ncols=2, fontsize=9)
    _thousands(power_ax)

    soc_ax.plot(
        _times(start, len(soc) + 1, resolution),
        [p.get("soc_initial_kwh", soc[0] if soc else 0), *soc],
        color=C_SOC,
        linewidth=2,
    )
    # Capacity is labelled on the left: soc_max is often just below it and the labels would
    # collide on one side.
    for key, name, side in (
        ("soc_min_kwh", "min", 1),
        ("soc_max_kwh", "max", 1),
        ("capacity_kwh", "capacity", 0),
    ):
        value = p.get(key)
        if value:
            soc_ax.axhline(value, color="#9ca3af", linewidth=0.8, linestyle="--")
            soc_ax.annotate(
                f"{name} {value:,.0f}",
                xy=(side, value),
                xycoords=("axes fraction", "data"),
                ha="right" if side else "left",
                va="bottom",
                fontsize=8,
                color="#6b7280",
            )
    soc_ax.set_ylim(0, float(p.get("capacity_kwh") or max(soc or [1])) * 1.08)
    soc_ax.set_ylabel("State of charge (kWh)")
    soc_ax.set_title("State of charge (end of step)", loc="left", fontsize=10)
    _thousands(soc_ax)
    soc_ax.set_xlabel("Time")
    for ax in (price_ax, power_ax, soc_ax):
        _style(ax)
        _time_axis(ax)
    fig.suptitle(f"Battery schedule: {run.region}, {run.forecast_date}", fontweight="bold")
    fig.text(
        0.5,
        0.955,
        f"cost {_money(r.get('baseline_cost'))} without the battery → "
        f"{_money(r.get('optimized_cost'))} with it (saves {_money(r.get('savings'))}) · "
        f"{_steps_label(len(charge), resolution)} · capacity {p.get('capacity_kwh', 0):,.0f} kWh",
        ha="center",
        fontsize=10,
        color="#4b5563",
    )
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.96))  # type: ignore[union-attr, call-arg]
    fig.savefig(out)


# --- grid switch -------------------------------------------------------------------------------


def _source_colours(payload: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    kinds = {s.get("name"): s.get("kind", "other") for s in payload.get("sources", [])}
    used: dict[str, int] = {}
    colours = []
    for i, name in enumerate(names):
        kind = kinds.get(name, "other")
        count = used.get(kind, 0)
        used[kind] = count + 1
        # Two sources of one kind must not share a colour.
        colours.append(
            SOURCE_COLOURS.get(kind, "#d4d4d8")
            if count == 0
            else FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)]
        )
    return colours


def _draw_grid(
    ax: Axes,
    start: datetime,
    payload: Mapping[str, Any],
    result: Mapping[str, Any],
    *,
    load_scale: float = 1.0,
    scale: float | None = None,
    unit: str | None = None,
    compact: bool = False,
) -> tuple[float, str, float]:
    resolution = int(payload.get("resolution_minutes", 60))
    dispatch = {k: _floats(v) for k, v in (result.get("dispatch_kw") or {}).items()}
    load = [v * load_scale for v in _floats(payload.get("load_forecast"))]
    unserved = _floats(result.get("unserved_kw"))
    if scale is None or unit is None:
        scale, unit = _power_unit(max(load or [0]), "kW")
    n = len(load) or max((len(v) for v in dispatch.values()), default=0)
    edges = _times(start, n + 1, resolution)

    def stepped(values: Sequence[float]) -> list[float]:
        # Each value holds for its whole step: repeat the last so the final step is drawn.
        vals = [v * scale for v in values[:n]]
        return [*vals, vals[-1]] if vals else []

    # Cheapest at the bottom: the stack then reads as the merit order, base load first.
    costs = {s.get("name"): s.get("cost_per_kwh", 0) for s in payload.get("sources", [])}
    names = sorted(dispatch, key=lambda name: costs.get(name, 0))
    layers = [stepped(dispatch[name]) for name in names]
    colours = _source_colours(payload, names)
    if unserved and any(v > 0 for v in unserved):
        names.append("unserved")
        layers.append(stepped(unserved))
        colours.append(C_UNSERVED)
    if layers:
        ax.stackplot(
            edges, layers, labels=names, colors=colours, step="post", alpha=0.9, linewidth=0
        )
    if load:
        ax.step(edges, stepped(load), where="post", color=C_ACTUAL, linewidth=1.8, label="load")
    ax.set_ylabel(f"Power ({unit})")
    top = max([*(sum(col) for col in zip(*layers, strict=True)), *stepped(load), 0.0])
    ax.set_ylim(0, top * 1.05 or 1)
    _thousands(ax)
    _time_axis(ax, compact=compact)
    _style(ax)
    return scale, unit, top


def _render_grid(run: RunData, out: Path) -> None:
    p, r = run.payload, run.result
    start = datetime.combine(run.forecast_date, time())
    resolution = int(p.get("resolution_minutes", 60))
    fig = Figure(figsize=(11, 5.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _draw_grid(ax, start, p, r)
    hours = resolution / 60
    unserved_kwh = sum(_floats(r.get("unserved_kw"))) * hours
    served_kwh = sum(sum(_floats(v)) for v in (r.get("dispatch_kw") or {}).values()) * hours
    fig.suptitle(f"Supply by source: {run.region}, {run.forecast_date}", fontweight="bold")
    ax.set_title(
        f"total cost {_money(r.get('total_cost'))} · served {served_kwh / 1000:,.0f} MWh · "
        f"unserved {unserved_kwh / 1000:,.1f} MWh · "
        f"{_steps_label(len(_floats(p.get('load_forecast'))), resolution)}",
        fontsize=10,
        color="#4b5563",
    )
    # Listed top-down as stacked, so the legend reads like the picture.
    handles, labels = ax.get_legend_handles_labels()
    order = [*range(len(labels) - 1, -1, -1)]
    if "load" in labels:
        order.remove(labels.index("load"))
        order.insert(0, labels.index("load"))
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        frameon=False,
        fontsize=9,
    )
    ax.set_xlabel("Time")
    fig.savefig(out)


# --- simulation --------------------------------------------------------------------------------


def _summary_line(base_type: str, summary: Mapping[str, Any]) -> str:
    if base_type == "forecast":
        return f"peak {summary.get('peak_mw', 0):,.0f} MW"
    if base_type == "storage":
        return f"saves {_money(summary.get('savings'))}"
    return (
        f"cost {_money(summary.get('total_cost'))}, "
        f"unserved {summary.get('unserved_kwh', 0) / 1000:,.0f} MWh"
    )


def _render_simulation(run: RunData, out: Path) -> None:
    base = run.payload.get("base", {})
    base_type = str(base.get("request_type", "forecast"))
    base_payload = base.get("payload", {})
    scenarios = {s.get("name"): s for s in run.payload.get("scenarios", [])}
    outcomes = list(run.result.get("scenarios", []))
    shown = outcomes[:MAX_PANELS]
    cols = 3 if len(shown) > 4 else min(2, len(shown)) or 1
    rows = math.ceil(len(shown) / cols) or 1
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows + 1.0), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    start = datetime.combine(run.forecast_date, time())
    scale, unit = 1.0, "kW"
    if base_type == "grid_switch":
        peak = max(_floats(base_payload.get("load_forecast")) or [0])
        top = max((float(s.get("load_scale", 1)) for s in scenarios.values()), default=1.0)
        scale, unit = _power_unit(peak * top, "kW")
    twins = []
    top = 0.0
    for ax, outcome in zip(axes, shown, strict=False):
        result = _doc(outcome.get("result"))
        scenario = scenarios.get(outcome.get("name"), {})
        if base_type == "forecast":
            _draw_forecast(ax, start, base_payload, result, None, compact=True)
        elif base_type == "storage":
            twins.append(_draw_storage_compact(ax, start, base_payload, result))
        else:
            *_, panel_top = _draw_grid(
                ax,
                start,
                base_payload,
                result,
                load_scale=float(scenario.get("load_scale", 1.0)),
                scale=scale,
                unit=unit,
                compact=True,
            )
            top = max(top, panel_top)
        ax.set_title(
            f"{outcome.get('name')}\n{_summary_line(base_type, _doc(outcome.get('summary')))}",
            fontsize=10,
        )
    if top:
        axes[0].set_ylim(0, top * 1.05)  # shared: one limit that fits every scenario
    for i, ax in enumerate(axes):
        if i >= len(shown):
            ax.set_visible(False)
            # The panel above an empty slot is the bottom of its column: it needs the time axis.
            if i - cols >= 0:
                axes[i - cols].xaxis.set_tick_params(labelbottom=True)
        elif i % cols:
            ax.set_ylabel("")
    for twin in twins[:-1]:
        twin.sharey(twins[-1])
    for i, twin in enumerate(twins):
        if (i + 1) % cols and i + 1 != len(twins):
            twin.set_ylabel("")
            twin.tick_params(labelright=False)
    handles, labels = axes[0].get_legend_handles_labels()
    if twins:
        more_h, more_l = twins[0].get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 6),
        frameon=False,
        fontsize=9,
    )
    kind = {
        "forecast": "load forecast",
        "storage": "battery schedule",
        "grid_switch": "supply by source",
    }.get(base_type, base_type)
    more = f" (first {len(shown)} of {len(outcomes)})" if len(outcomes) > len(shown) else ""
    fig.suptitle(
        f"Scenarios for the {kind}: {run.region}, {run.forecast_date}{more}",
        fontweight="bold",
    )
    fig.savefig(out)


RENDERERS = {
    "forecast": _render_forecast,
    "storage": _render_storage,
    "grid_switch": _render_grid,
    "simulation": _render_simulation,
}


def render(run: RunData, out: Path) -> Path:
    """Draw a run to `out` (PNG); CPU-bound, so callers on an event loop use a thread."""
    out.parent.mkdir(parents=True, exist_ok=True)
    RENDERERS[run.request_type](run, out)
    return out


# --- reading runs ------------------------------------------------------------------------------

_RUN = """
SELECT id::text AS run_id, request_type, region, forecast_date, qnn_model_id, status,
       input_payload -> 'payload' AS payload, result_payload
FROM optimization_runs WHERE id = $1
"""

_ACTUALS = """
SELECT data_date, resolution_minutes, historical_loads FROM energy_datasets
WHERE region = $1 AND data_date BETWEEN $2 AND $3 AND historical_loads IS NOT NULL
"""

_LATEST = """
SELECT id FROM optimization_runs
WHERE request_type = $1 AND status = 'completed'
ORDER BY created_at DESC LIMIT 1
"""


async def fetch_run(pool: asyncpg.Pool | asyncpg.Connection, run_id: str) -> RunData:
    """A completed run with, for a forecast, the actuals of the days it covers."""
    row = await pool.fetchrow(_RUN, run_id)
    if row is None:
        raise RunNotPlottable(f"no run {run_id}")
    if row["status"] != "completed" or row["result_payload"] is None:
        raise RunNotPlottable(f"run {run_id} is {row['status']}: there is no result to plot")
    payload, result = _doc(row["payload"]), _doc(row["result_payload"])
    actuals: dict[date, tuple[int, list[float]]] = {}
    if row["request_type"] == "forecast":
        resolution = int(result.get("resolution_minutes") or payload.get("resolution_minutes", 60))
        steps = len(_floats(result.get("forecast")))
        last = row["forecast_date"] + timedelta(
            days=max(1, math.ceil(steps * resolution / MINUTES_PER_DAY)) - 1
        )
        for a in await pool.fetch(_ACTUALS, row["region"], row["forecast_date"], last):
            actuals[a["data_date"]] = (a["resolution_minutes"], list(a["historical_loads"]))
    return RunData(
        run_id=row["run_id"],
        request_type=row["request_type"],
        region=row["region"],
        forecast_date=row["forecast_date"],
        model_id=row["qnn_model_id"],
        payload=payload,
        result=result,
        actuals=actuals,
    )


async def plot_run(pool: asyncpg.Pool | asyncpg.Connection, run_id: str, out: Path) -> Path:
    """Draw a completed run to `out` (PNG). Raises RunNotPlottable for a missing or failed run."""
    run = await fetch_run(pool, str(run_id))
    return await asyncio.to_thread(render, run, Path(out))


async def save_demo_plots(pool: asyncpg.Pool | asyncpg.Connection, out_dir: Path) -> list[Path]:
    """The latest completed run of each kind drawn to `out_dir/<kind>.png` (kinds with no
    completed run are skipped): forecast, storage, grid_switch and, if any, simulation."""
    paths = []
    for kind in KINDS:
        run_id = await pool.fetchval(_LATEST, kind)
        if run_id is not None:
            paths.append(await plot_run(pool, str(run_id), Path(out_dir) / f"{kind}.png"))
    return paths
