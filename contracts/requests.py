"""Optimization requests as published to `eglo.requests` (schema version 1)."""

from __future__ import annotations

import functools
import hashlib
from datetime import date, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Final = 1
REQUEST_TYPES = ("forecast", "storage", "grid_switch", "simulation")
RequestType = Literal["forecast", "storage", "grid_switch", "simulation"]

MAX_STEPS = 2016  # two weeks at 10-minute resolution; bounds memory per message
MAX_HISTORY = 8 * 7 * 96  # eight weeks of 15-minute readings
MAX_SOURCES = 32
MAX_SCENARIOS = 50

NonNegative = Annotated[float, Field(ge=0)]


class Contract(BaseModel):
    """Strict base: unknown fields are rejected and NaN/Infinity never validate."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


MIN_HISTORY = 24
MAX_DATASET_DAYS = 56


class DatasetRef(Contract):
    """A stored period of `energy_datasets` to use as history instead of sending it inline."""

    region: str = Field(min_length=1, max_length=64)
    start_date: date
    end_date: date = Field(description="Inclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> DatasetRef:
        days = (self.end_date - self.start_date).days + 1
        if not 1 <= days <= MAX_DATASET_DAYS:
            raise ValueError(f"a dataset_ref spans 1 to {MAX_DATASET_DAYS} days, not {days}")
        return self


class ForecastPayload(Contract):
    """History of a region's load and what to forecast.

    The history comes inline (`historical_loads`) or by reference (`dataset_ref`); the worker
    resolves a reference from `energy_datasets` before calling the QNN, and stores both.
    """

    historical_loads: list[NonNegative] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description=f"Past load in MW, oldest first; at least {MIN_HISTORY} unless dataset_ref.",
    )
    dataset_ref: DatasetRef | None = None
    resolution_minutes: Literal[15, 30, 60] = 60
    horizon_steps: int = Field(default=24, ge=1, le=MAX_STEPS)
    temperature_c: list[Annotated[float, Field(ge=-80, le=70)]] | None = Field(
        default=None, max_length=MAX_HISTORY, description="Aligned with historical_loads."
    )

    @model_validator(mode="after")
    def _history_present_and_aligned(self) -> ForecastPayload:
        if self.dataset_ref is None and len(self.historical_loads) < MIN_HISTORY:
            raise ValueError(
                f"historical_loads needs at least {MIN_HISTORY} values (or give a dataset_ref)"
            )
        if self.temperature_c is not None and len(self.temperature_c) != len(self.historical_loads):
            raise ValueError("temperature_c must have one value per historical_loads value")
        return self

    @property
    def needs_history(self) -> bool:
        """A dataset_ref not resolved into historical_loads yet."""
        return self.dataset_ref is not None and not self.historical_loads


class StoragePayload(Contract):
    """A battery and a price schedule to optimise its charge/discharge against."""

    capacity_kwh: float = Field(gt=0, le=1e7)
    max_charge_kw: float = Field(gt=0, le=1e7)
    max_discharge_kw: float = Field(gt=0, le=1e7)
    efficiency: float = Field(default=0.9, gt=0, le=1, description="Round-trip efficiency.")
    soc_initial_kwh: NonNegative
    soc_min_kwh: NonNegative = 0.0
    soc_max_kwh: NonNegative
    price_schedule: list[float] = Field(
        min_length=1, max_length=MAX_STEPS, description="Energy price per step, currency/kWh."
    )
    resolution_minutes: Literal[15, 30, 60] = 60
    load_forecast: list[NonNegative] | None = Field(
        default=None, max_length=MAX_STEPS, description="Site load in kW per step."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StoragePayload:
        if not self.soc_min_kwh <= self.soc_max_kwh <= self.capacity_kwh:
            raise ValueError("need soc_min_kwh <= soc_max_kwh <= capacity_kwh")
        if not self.soc_min_kwh <= self.soc_initial_kwh <= self.soc_max_kwh:
            raise ValueError("need soc_min_kwh <= soc_initial_kwh <= soc_max_kwh")
        if self.load_forecast is not None and len(self.load_forecast) != len(self.price_schedule):
            raise ValueError("load_forecast must have one value per price_schedule step")
        return self


class SupplySource(Contract):
    """One source a grid operator can dispatch."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["grid", "solar", "wind", "hydro", "gas", "coal", "nuclear", "storage", "other"]
    capacity_kw: float = Field(ge=0, le=1e8)
    cost_per_kwh: float = Field(ge=-10, le=100)


class GridSwitchPayload(Contract):
    """A load forecast to cover from a set of sources at least cost."""

    load_forecast: list[NonNegative] = Field(
        min_length=1, max_length=MAX_STEPS, description="Load in kW per step."
    )
    resolution_minutes: Literal[15, 30, 60] = 60
    sources: list[SupplySource] = Field(min_length=1, max_length=MAX_SOURCES)

    @model_validator(mode="after")
    def _unique_sources(self) -> GridSwitchPayload:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("source names must be unique")
        return self


class Scenario(Contract):
    """One what-if variation applied to the base request."""

    name: str = Field(min_length=1, max_length=64)
    load_scale: float = Field(default=1.0, gt=0, le=10)
    price_scale: float = Field(default=1.0, gt=0, le=10)
    temperature_delta_c: float = Field(default=0.0, ge=-30, le=30)


class BaseForecast(Contract):
    request_type: Literal["forecast"]
    payload: ForecastPayload


class BaseStorage(Contract):
    request_type: Literal["storage"]
    payload: StoragePayload


class BaseGridSwitch(Contract):
    request_type: Literal["grid_switch"]
    payload: GridSwitchPayload


BaseRequest = Annotated[
    BaseForecast | BaseStorage | BaseGridSwitch, Field(discriminator="request_type")
]


class SimulationPayload(Contract):
    """A base request of another type swept over a bounded list of scenarios."""

    base: BaseRequest
    scenarios: list[Scenario] = Field(min_length=1, max_length=MAX_SCENARIOS)

    @model_validator(mode="after")
    def _unique_names(self) -> SimulationPayload:
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError("scenario names must be unique")
        return self


class _RequestEnvelope(Contract):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="Idempotency key: one request_id is processed and stored once.",
    )
    region: str = Field(min_length=1, max_length=64)
    forecast_date: date
    deadline: datetime | None = Field(
        default=None, description="After this instant the request is stored as expired."
    )

    @functools.cached_property
    def as_json(self) -> dict[str, Any]:
        """The request as JSON-ready data, computed once: hashing, the QNN body and storage
        all need it, and dumping a long history is not free."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _deadline_has_timezone(self) -> _RequestEnvelope:
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("deadline must carry a UTC offset")
        return self


class ForecastRequest(_RequestEnvelope):
    request_type: Literal["forecast"]
    payload: ForecastPayload


class StorageRequest(_RequestEnvelope):
    request_type: Literal["storage"]
    payload: StoragePayload


class GridSwitchRequest(_RequestEnvelope):
    request_type: Literal["grid_switch"]
    payload: GridSwitchPayload


class SimulationRequest(_RequestEnvelope):
    request_type: Literal["simulation"]
    payload: SimulationPayload


OptimizationRequest = Annotated[
    ForecastRequest | StorageRequest | GridSwitchRequest | SimulationRequest,
    Field(discriminator="request_type"),
]
AnyRequest = ForecastRequest | StorageRequest | GridSwitchRequest | SimulationRequest


def request_fingerprint(request: AnyRequest) -> str:
    """Hash of what the request asks for, to tell a redelivery from a reused request_id."""
    doc = {k: v for k, v in request.as_json.items() if k != "deadline"}
    canonical = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
