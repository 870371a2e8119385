"""A request's `dataset_ref` made inline: the referenced days' loads become its history.

Pure: the stored days are read by runtime/history.py and handed in.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any, Final

from contracts.requests import (
    MIN_HISTORY,
    AnyRequest,
    BaseForecast,
    DatasetRef,
    ForecastPayload,
    ForecastRequest,
    SimulationRequest,
)

MINUTES_PER_DAY: Final = 1440


class DatasetError(ValueError):
    """Stored data cannot serve a request (missing or inconsistent days)."""


class DatasetNotFound(DatasetError):
    """Some days a dataset_ref names have no stored loads."""

    def __init__(self, ref: DatasetRef, missing: Sequence[date]) -> None:
        self.ref = ref
        self.missing = list(missing)
        super().__init__(
            f"energy_datasets has no loads for region {ref.region!r} on "
            f"{date_ranges(self.missing)} (dataset_ref {ref.start_date}..{ref.end_date}, "
            f"{len(self.missing)} of {span_days(ref)} days missing)"
        )


def span_days(ref: DatasetRef) -> int:
    return (ref.end_date - ref.start_date).days + 1


def date_ranges(days: Sequence[date]) -> str:
    """2000-06-07, 2000-06-09..2000-06-12 — short even when weeks are missing."""
    parts: list[str] = []
    for _, group in itertools.groupby(
        enumerate(sorted(days)), key=lambda iv: iv[1] - timedelta(days=iv[0])
    ):
        run = [d for _, d in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return ", ".join(parts)


def _downsample(values: Sequence[float], factor: int) -> list[float]:
    return [sum(values[i : i + factor]) / factor for i in range(0, len(values), factor)]


def _resolved_payload(
    payload: ForecastPayload, loads: Sequence[float], temps: Sequence[float] | None, resolution: int
) -> dict[str, Any]:
    doc = payload.model_dump()
    # The request's resolution_minutes is the forecast's, as for inline history (default 60).
    # Whether it was set explicitly is not used: a published request carries every default, so
    # that distinction does not survive the trip through the broker.
    target = payload.resolution_minutes
    if target % resolution:
        raise DatasetError(
            f"the stored days are at {resolution} minutes; a {target}-minute forecast cannot "
            "be made from them"
        )
    factor = target // resolution
    history = list(loads) if factor == 1 else _downsample(loads, factor)
    if payload.temperature_c:
        temperatures: list[float] | None = list(payload.temperature_c)
    elif temps is not None:
        temperatures = list(temps) if factor == 1 else _downsample(temps, factor)
    else:
        temperatures = None
    # The contract waives the minimum for a reference; the resolved history must still meet it.
    if len(history) < MIN_HISTORY:
        raise DatasetError(
            f"the referenced period gives {len(history)} values at {target} minutes; "
            f"a forecast needs at least {MIN_HISTORY}"
        )
    doc.update(historical_loads=history, temperature_c=temperatures, resolution_minutes=target)
    return doc


def dataset_ref_of(request: AnyRequest) -> DatasetRef | None:
    """The dataset_ref a request still needs resolved (a forecast's, or a simulation base's)."""
    if isinstance(request, ForecastRequest) and request.payload.needs_history:
        return request.payload.dataset_ref
    if (
        isinstance(request, SimulationRequest)
        and isinstance(request.payload.base, BaseForecast)
        and request.payload.base.payload.needs_history
    ):
        return request.payload.base.payload.dataset_ref
    return None


def resolve_dataset_ref(
    request: AnyRequest,
    loads: Sequence[float],
    temps: Sequence[float] | None,
    resolution: int,
) -> AnyRequest:
    """A new, validated request whose forecast payload carries the referenced history inline.

    Works for a forecast and for a simulation whose base is a forecast (replaying a stored
    period); any other request, or one already carrying history, comes back unchanged. The
    dataset_ref stays in the payload so the stored input says where the history came from.
    Data finer than the request's `resolution_minutes` is averaged to it (15-minute days, hourly
    forecast); data coarser than it is refused.
    Raises ValueError (pydantic's ValidationError or DatasetError) if the result is invalid.
    """
    if dataset_ref_of(request) is None:
        return request
    doc = request.model_dump()
    if isinstance(request, ForecastRequest):
        doc["payload"] = _resolved_payload(request.payload, loads, temps, resolution)
        return ForecastRequest.model_validate(doc)
    assert isinstance(request, SimulationRequest)
    assert isinstance(request.payload.base, BaseForecast)
    doc["payload"]["base"]["payload"] = _resolved_payload(
        request.payload.base.payload, loads, temps, resolution
    )
    return SimulationRequest.model_validate(doc)
