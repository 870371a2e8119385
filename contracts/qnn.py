"""The QNN prediction API's wire format: what eglo sends and how it reads the answer.

The API publishes its request shape (`code`, `model_id`, `mode`, `optimization_level`) but not its
response shape, so responses are read tolerantly: a bare object or a `{"success", "data"}` wrapper,
the result under one of several keys, metadata beside it or nested.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import AliasChoices

from contracts.requests import AnyRequest, SimulationRequest
from contracts.results import RESULT_MODELS

PREDICT_PATH = "/api/v1/predictions/predict"
HEALTH_PATH = "/api/v1/health/simple"
RESULT_KEYS = ("prediction", "result", "predictions", "output")
METADATA_KEYS = ("execution", "metadata", "execution_metadata", "quantum_execution")


class MalformedResponse(ValueError):
    """The body is not a JSON object eglo can find a result in."""


def _describe(request: AnyRequest) -> str:
    """The PRD's human-readable `code` line, e.g. `Region=California; Date=...; PastLoads=[...]`."""
    parts = [f"Region={request.region}", f"Date={request.forecast_date.isoformat()}"]
    payload = request.payload
    if request.request_type == "forecast":
        loads = payload.historical_loads  # type: ignore[union-attr]
        tail = ",".join(f"{v:g}" for v in loads[-3:])
        parts += [f"PastLoads=[...{tail}]", f"ForecastGoal=Next{payload.horizon_steps}Steps"]  # type: ignore[union-attr]
    elif request.request_type == "storage":
        parts += [f"Capacity={payload.capacity_kwh:g}kWh", "Goal=MinimiseEnergyCost"]  # type: ignore[union-attr]
    elif request.request_type == "grid_switch":
        parts += [f"Sources={len(payload.sources)}", "Goal=MinimiseSupplyCost"]  # type: ignore[union-attr]
    else:
        assert isinstance(request, SimulationRequest)
        parts += [
            f"Base={request.payload.base.request_type}",
            f"Scenarios={len(request.payload.scenarios)}",
        ]
    return "; ".join(parts)


def build_predict_body(
    request: AnyRequest, *, model_id: str, mode: str, optimization_level: int
) -> dict[str, Any]:
    """The PRD request shape plus a structured `inputs` object the API can compute from."""
    return {
        "code": _describe(request),
        "model_id": model_id,
        "mode": mode,
        "optimization_level": optimization_level,
        "inputs": {
            "request_id": request.request_id,
            "request_type": request.request_type,
            "region": request.region,
            "forecast_date": request.forecast_date.isoformat(),
            "payload": request.as_json["payload"],
        },
    }


def parse_predict_response(request_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Find the result object and execution metadata in a body; MalformedResponse if there is none.

    Only locates the data; `worker.core.result_checks` decides whether the numbers are valid.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedResponse(f"response is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedResponse("response is not a JSON object")
    if "data" in doc and isinstance(doc["data"], dict):
        if doc.get("success") is False:
            raise MalformedResponse(f"response says success=false: {doc.get('error')!r}")
        doc = doc["data"]
    if request_type not in RESULT_MODELS:
        raise MalformedResponse(f"unknown request type {request_type!r}")
    result = next((doc[k] for k in RESULT_KEYS if isinstance(doc.get(k), dict)), None)
    if result is None:
        # A bare object: the result's fields sit at top level. If none of them is there, there
        # is no result at all (an empty envelope), which is a broken answer, not a wrong one.
        if not _result_field_names(request_type) & doc.keys():
            raise MalformedResponse("response holds no result")
        result = doc
    meta_src: dict[str, Any] = dict(doc)
    for key in METADATA_KEYS:
        if isinstance(doc.get(key), dict):
            meta_src.update(doc[key])
    metadata = {k: v for k, v in meta_src.items() if not isinstance(v, dict | list)}
    return result, metadata


@functools.cache
def _result_field_names(request_type: str) -> frozenset[str]:
    names: set[str] = set()
    for name, info in RESULT_MODELS[request_type].model_fields.items():
        names.add(name)
        if isinstance(info.validation_alias, AliasChoices):
            names.update(a for a in info.validation_alias.choices if isinstance(a, str))
    return frozenset(names)
