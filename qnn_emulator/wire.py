"""The predict endpoint's request body and the JSON envelopes of every answer."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.requests import (
    ForecastPayload,
    GridSwitchPayload,
    SimulationPayload,
    StoragePayload,
)

MAX_ERROR_DETAILS = 10


class _Inputs(BaseModel):
    # Lenient on the envelope (the worker may add fields); the payload models are strict.
    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str = Field(min_length=1, max_length=128)
    region: str | None = Field(default=None, max_length=64)
    forecast_date: date | None = None


class ForecastInputs(_Inputs):
    request_type: Literal["forecast"]
    payload: ForecastPayload


class StorageInputs(_Inputs):
    request_type: Literal["storage"]
    payload: StoragePayload


class GridSwitchInputs(_Inputs):
    request_type: Literal["grid_switch"]
    payload: GridSwitchPayload


class SimulationInputs(_Inputs):
    request_type: Literal["simulation"]
    payload: SimulationPayload


Inputs = Annotated[
    ForecastInputs | StorageInputs | GridSwitchInputs | SimulationInputs,
    Field(discriminator="request_type"),
]


class PredictBody(BaseModel):
    """What `contracts.qnn.build_predict_body` sends."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str = Field(max_length=10_000)
    model_id: str = Field(min_length=1, max_length=128)
    mode: str = Field(default="quantum", min_length=1, max_length=32)
    optimization_level: int = Field(default=1, ge=0, le=3)
    inputs: Inputs


def describe_validation_error(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    """A one-line message and the first few `{loc, msg}` details."""
    details = [
        {"loc": ".".join(str(p) for p in err["loc"]), "msg": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)[:MAX_ERROR_DETAILS]
    ]
    first = details[0] if details else {"loc": "", "msg": "invalid request"}
    more = exc.error_count() - 1
    suffix = f" (and {more} more)" if more > 0 else ""
    where = f"{first['loc']}: " if first["loc"] else ""
    return f"{where}{first['msg']}{suffix}", details


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json"
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return json_response({"success": False, "error": error}, status=status, headers=headers)
