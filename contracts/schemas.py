"""JSON Schemas of every message, for teams generating clients in other languages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from contracts.events import AnomalyDetected, EmbeddingRequested, RequestDeadLettered, RunOutcome
from contracts.requests import OptimizationRequest
from contracts.results import (
    ExecutionMetadata,
    ForecastResult,
    GridSwitchResult,
    SimulationResult,
    StorageResult,
)
from contracts.rules import rules_document

SCHEMAS: dict[str, Any] = {
    "request.v1": TypeAdapter(OptimizationRequest),
    "event.run-outcome.v1": TypeAdapter(RunOutcome),
    "event.embedding-requested.v1": TypeAdapter(EmbeddingRequested),
    "event.anomaly-detected.v1": TypeAdapter(AnomalyDetected),
    "event.request-dead-lettered.v1": TypeAdapter(RequestDeadLettered),
    "result.forecast.v1": TypeAdapter(ForecastResult),
    "result.storage.v1": TypeAdapter(StorageResult),
    "result.grid-switch.v1": TypeAdapter(GridSwitchResult),
    "result.simulation.v1": TypeAdapter(SimulationResult),
    "execution-metadata.v1": TypeAdapter(ExecutionMetadata),
}


class PublishedSchema(GenerateJsonSchema):
    """JSON Schema 2020-12 as other languages' validators and code generators read it.

    An optional field is simply not required: `anyOf: [T, {"type": "null"}]` made generators emit
    unusable types, and no message eglo reads or sends carries a null for it. OpenAPI's
    `discriminator` keyword is left out (it is not JSON Schema; ajv's strict mode refuses it): each
    `oneOf` branch pins `request_type` with `const`, which says the same.
    """

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if json_schema.get("default", ...) is None:
            del json_schema["default"]
        return json_schema

    def tagged_union_schema(self, schema: core_schema.TaggedUnionSchema) -> JsonSchemaValue:
        json_schema = super().tagged_union_schema(schema)
        json_schema.pop("discriminator", None)
        return json_schema


class OutboundSchema(PublishedSchema):
    """What eglo sends: an optional scalar is written `type: [T, "null"]`, so that generated Go
    and TypeScript keep a real 0 or "" apart from an absent field (eglo leaves absent ones out)."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if inner.get("type") in ("number", "integer", "string", "boolean"):
            inner["type"] = [inner["type"], "null"]
        return inner


def render_schemas() -> dict[str, str]:
    """File name → JSON Schema text, deterministic so a freshness test can compare."""
    out = {}
    for name, adapter in SCHEMAS.items():
        # Results are read leniently (by alias) but documented by their canonical names.
        mode = "serialization" if name.startswith(("result.", "execution")) else "validation"
        generator = PublishedSchema if name.startswith("request.") else OutboundSchema
        schema = adapter.json_schema(mode=mode, schema_generator=generator)
        schema["$id"] = f"https://eglo.dev/schemas/{name}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}.json"] = _text(schema)
    out["request.rules.v1.json"] = _text(rules_document())
    return out


def _text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, text in render_schemas().items():
        path = out_dir / file_name
        path.write_text(text)
        paths.append(path)
    return paths
