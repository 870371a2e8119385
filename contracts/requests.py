"""Optimization requests as published to `eglo.requests` (schema version 1)."""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from contracts.rules import violation
from contracts.vocabulary import REQUEST_TYPES as REQUEST_TYPES
from contracts.vocabulary import RequestType as RequestType
from contracts.wire import (
    Integer,
    Resolution,
    SchemaVersion,
    WireDate,
    WireDateTime,
    on_wire,
)

SCHEMA_VERSION: Final = 1

MAX_STEPS = 2016  # two weeks at 10-minute resolution; bounds memory per message
MAX_HISTORY = 8 * 7 * 96  # eight weeks of 15-minute readings
MAX_SOURCES = 32
MAX_SCENARIOS = 50

NonNegative = Annotated[float, Field(ge=0)]
# Names and regions: no control characters (PostgreSQL cannot store NUL in text or jsonb).
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\u0000-\u001f\u007f]+$")]


class Contract(BaseModel):
    """Strict base: unknown fields are rejected and NaN/Infinity never validate.

    An optional field is left out when unset; on the wire an explicit `null` is an error, as the
    schema says (it lists no null type, so that generated clients get plain optional fields).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any, info: ValidationInfo) -> Any:
        if on_wire(info) and isinstance(data, dict):
            for name, value in data.items():
                if value is None and name in cls.model_fields:
                    raise ValueError(f"{name} is null: leave an unset optional field out")
        return data


MIN_HISTORY = 24
MAX_DATASET_DAYS = 56


class DatasetRef(Contract):
    """A stored period of `energy_datasets` to use as history instead of sending it inline."""

    region: Label
    start_date: WireDate
    end_date: WireDate = Field(description="Inclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> DatasetRef:
        days = (self.end_date - self.start_date).days + 1
        if not 1 <= days <= MAX_DATASET_DAYS:
            raise violation(
                "dataset_ref.span", f"a dataset_ref spans 1 to {MAX_DATASET_DAYS} days, not {days}"
            )
        return self


class ForecastPayload(Contract):
    """History of a region's load and what to forecast.

    The history comes inline (`historical_loads`) or by reference (`dataset_ref`); the worker
    resolves a reference from `energy_datasets` before calling the QNN, and stores both.
    """

    # Without a dataset_ref, at least MIN_HISTORY inline values: stated in the schema itself.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {
                "type": "object",
                "properties": {"dataset_ref": {"type": "object"}},
                "required": ["dataset_ref"],
            },
            "else": {
                "type": "object",
                "required": ["historical_loads"],
                "properties": {"historical_loads": {"type": "array", "minItems": MIN_HISTORY}},
            },
        }
    )

    historical_loads: list[NonNegative] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description=f"Past load in MW, oldest first; at least {MIN_HISTORY} unless dataset_ref.",
    )
    dataset_ref: DatasetRef | None = None
    resolution_minutes: Resolution = 60
    horizon_steps: Integer = Field(default=24, ge=1, le=MAX_STEPS)
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
            raise violation(
                "forecast.temperature_aligned",
                "temperature_c must have one value per historical_loads value",
            )
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
    resolution_minutes: Resolution = 60
    load_forecast: list[NonNegative] | None = Field(
        default=None, max_length=MAX_STEPS, description="Site load in kW per step."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StoragePayload:
        if not self.soc_min_kwh <= self.soc_max_kwh <= self.capacity_kwh:
            raise violation("storage.soc_bounds", "need soc_min_kwh <= soc_max_kwh <= capacity_kwh")
        if not self.soc_min_kwh <= self.soc_initial_kwh <= self.soc_max_kwh:
            raise violation(
                "storage.soc_initial", "need soc_min_kwh <= soc_initial_kwh <= soc_max_kwh"
            )
        if self.load_forecast is not None and len(self.load_forecast) != len(self.price_schedule):
            raise violation(
                "storage.load_forecast_aligned",
                "load_forecast must have one value per price_schedule step",
            )
        return self


class SupplySource(Contract):
    """One source a grid operator can dispatch."""

    name: Label
    kind: Literal["grid", "solar", "wind", "hydro", "gas", "coal", "nuclear", "storage", "other"]
    capacity_kw: float = Field(ge=0, le=1e8)
    cost_per_kwh: float = Field(ge=-10, le=100)


class GridSwitchPayload(Contract):
    """A load forecast to cover from a set of sources at least cost."""

    load_forecast: list[NonNegative] = Field(
        min_length=1, max_length=MAX_STEPS, description="Load in kW per step."
    )
    resolution_minutes: Resolution = 60
    sources: list[SupplySource] = Field(min_length=1, max_length=MAX_SOURCES)

    @model_validator(mode="after")
    def _unique_sources(self) -> GridSwitchPayload:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise violation("grid_switch.unique_source_names", "source names must be unique")
        return self


class Scenario(Contract):
    """One what-if variation applied to the base request."""

    name: Label
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
            raise violation("simulation.unique_scenario_names", "scenario names must be unique")
        return self


class _RequestEnvelope(Contract):
    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="Idempotency key: one request_id is processed and stored once.",
    )
    region: Label
    forecast_date: WireDate
    deadline: WireDateTime | None = Field(
        default=None,
        description="RFC 3339 with an offset; after this instant the request is stored as expired.",
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
