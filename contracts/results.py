"""What a run produces: type-specific results and the QNN's execution metadata."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

from contracts.wire import Integer, integral

Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0), BeforeValidator(integral)]


class Result(BaseModel):
    """Tolerant of extra fields (the QNN's response shape is unpublished), strict on numbers."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class ForecastResult(Result):
    forecast: list[Finite] = Field(
        validation_alias=AliasChoices("forecast", "predicted_loads", "predictions", "values"),
        description="Forecast load in MW per step.",
    )
    lower: list[Finite] | None = Field(
        default=None, validation_alias=AliasChoices("lower", "lower_bound", "forecast_lower")
    )
    upper: list[Finite] | None = Field(
        default=None, validation_alias=AliasChoices("upper", "upper_bound", "forecast_upper")
    )
    interval_level: float | None = Field(default=None, gt=0, lt=1)
    resolution_minutes: Integer | None = None


class StorageResult(Result):
    charge_kw: list[Finite] = Field(validation_alias=AliasChoices("charge_kw", "charge"))
    discharge_kw: list[Finite] = Field(validation_alias=AliasChoices("discharge_kw", "discharge"))
    soc_kwh: list[Finite] = Field(
        validation_alias=AliasChoices("soc_kwh", "state_of_charge_kwh", "soc"),
        description="State of charge at the end of each step.",
    )
    baseline_cost: Finite | None = None
    optimized_cost: Finite | None = None
    savings: Finite | None = Field(default=None, validation_alias=AliasChoices("savings", "saving"))


class GridSwitchResult(Result):
    dispatch_kw: dict[str, list[Finite]] = Field(
        validation_alias=AliasChoices("dispatch_kw", "dispatch", "allocation"),
        description="Supply per source name, kW per step.",
    )
    unserved_kw: list[Finite] | None = Field(
        default=None, validation_alias=AliasChoices("unserved_kw", "unserved")
    )
    total_cost: Finite | None = Field(
        default=None, validation_alias=AliasChoices("total_cost", "cost")
    )


class ScenarioOutcome(Result):
    name: str
    result: dict[str, object]
    summary: dict[str, Finite] = Field(default_factory=dict)


class SimulationResult(Result):
    scenarios: list[ScenarioOutcome]


AnyResult = ForecastResult | StorageResult | GridSwitchResult | SimulationResult
RESULT_MODELS: dict[str, type[Result]] = {
    "forecast": ForecastResult,
    "storage": StorageResult,
    "grid_switch": GridSwitchResult,
    "simulation": SimulationResult,
}


class ExecutionMetadata(Result):
    """What the QNN says it did; every field is optional because the API does not promise them."""

    # Read from the QNN ignoring extras, but what eglo publishes has exactly these fields.
    model_config = ConfigDict(json_schema_extra={"additionalProperties": False})

    model_id: str | None = Field(default=None, validation_alias=AliasChoices("model_id", "model"))
    device: str | None = Field(
        default=None, validation_alias=AliasChoices("device", "device_used", "backend")
    )
    n_qubits: Count | None = Field(
        default=None, validation_alias=AliasChoices("n_qubits", "qubits", "num_qubits")
    )
    circuit_depth: Count | None = Field(
        default=None, validation_alias=AliasChoices("circuit_depth", "depth")
    )
    execution_time_ms: Finite | None = Field(
        default=None,
        ge=0,
        validation_alias=AliasChoices("execution_time_ms", "latency_ms", "duration_ms"),
    )
    cost_usd: Finite | None = Field(
        default=None,
        ge=0,
        validation_alias=AliasChoices("cost_usd", "quantum_cost_usd", "cost"),
    )
