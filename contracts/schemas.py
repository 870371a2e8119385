"""JSON Schemas of every message, for teams generating clients in other languages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from contracts.events import AnomalyDetected, EmbeddingRequested, RunOutcome
from contracts.requests import OptimizationRequest
from contracts.results import (
    ExecutionMetadata,
    ForecastResult,
    GridSwitchResult,
    SimulationResult,
    StorageResult,
)

SCHEMAS: dict[str, Any] = {
    "request.v1": TypeAdapter(OptimizationRequest),
    "event.run-outcome.v1": TypeAdapter(RunOutcome),
    "event.embedding-requested.v1": TypeAdapter(EmbeddingRequested),
    "event.anomaly-detected.v1": TypeAdapter(AnomalyDetected),
    "result.forecast.v1": TypeAdapter(ForecastResult),
    "result.storage.v1": TypeAdapter(StorageResult),
    "result.grid-switch.v1": TypeAdapter(GridSwitchResult),
    "result.simulation.v1": TypeAdapter(SimulationResult),
    "execution-metadata.v1": TypeAdapter(ExecutionMetadata),
}


def render_schemas() -> dict[str, str]:
    """File name → JSON Schema text, deterministic so a freshness test can compare."""
    out = {}
    for name, adapter in SCHEMAS.items():
        # Results are read leniently (by alias) but documented by their canonical names.
        mode = "serialization" if name.startswith(("result.", "execution")) else "validation"
        schema = adapter.json_schema(mode=mode)
        schema["$id"] = f"https://eglo.dev/schemas/{name}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, text in render_schemas().items():
        path = out_dir / file_name
        path.write_text(text)
        paths.append(path)
    return paths
