"""The FastAPI application: routes, access control and the OpenAPI 3.1 document.

Submitting takes the AMQP request body and reads it with the worker's own intake
(`core.intake.parse_request`, the strict wire validation): a body the worker would dead-letter
is refused here with `422` and the same `reason` and `rule`. An accepted request is published to
`eglo.requests` with a publisher confirm, exactly as any other producer would.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, datetime
from typing import Annotated, Any, Final

import orjson
import structlog
from fastapi import Body, Depends, FastAPI, Header, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts import wire
from contracts.requests import (
    ForecastRequest,
    GridSwitchRequest,
    SimulationRequest,
    StorageRequest,
    request_fingerprint,
)
from contracts.schemas import PublishedSchema
from contracts.topology import request_routing_key
from contracts.vocabulary import RequestType, RunStatus, Severity
from db.migrate import schema_problem
from worker.analytics import accuracy as scoring
from worker.analytics import similarity
from worker.api import actions, console, queries
from worker.api.actions import ApiError
from worker.api.auth import Principal, Role, TokenTable
from worker.api.models import (
    Accepted,
    AccuracyRow,
    AnomalyView,
    Component,
    DeadLetterView,
    Health,
    PendingRun,
    Problem,
    ReplayCommand,
    ReplayResult,
    Resolved,
    Run,
    RunPage,
    SimilarRunView,
)
from worker.api.state import ApiState, ReplyMessage
from worker.core.intake import Rejection, identify, parse_request
from worker.embedder.backends import FEATURES_MODEL
from worker.settings import Settings

log = structlog.get_logger(__name__)

# The submitting routes: path → request_type (the backlog's names, plus /simulate).
SUBMIT_ROUTES: Final[dict[str, RequestType]] = {
    "/forecast": "forecast",
    "/storage-optimize": "storage",
    "/grid-switch-optimize": "grid_switch",
    "/simulate": "simulation",
}
_REQUEST_MODELS: Final[dict[RequestType, type[BaseModel]]] = {
    "forecast": ForecastRequest,
    "storage": StorageRequest,
    "grid_switch": GridSwitchRequest,
    "simulation": SimulationRequest,
}
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9._:\-]+$"
LABEL_PATTERN: Final = r"^[^\u0000-\u001f\u007f]+$"
HEALTH_TIMEOUT_S: Final = 3.0
QNN_HEALTH_PATH: Final = "/api/v1/health/simple"

RequestIdPath = Annotated[
    str,
    PathParam(min_length=1, max_length=128, pattern=REQUEST_ID_PATTERN, description="request_id"),
]


def _problem_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error.problem.model_dump(mode="json"), status_code=error.status, headers=error.headers
    )


def _doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


AUTH_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: _doc("No bearer token, or an unknown one."),
    403: _doc("The token's role may not do this."),
    422: _doc("A parameter or body that does not validate."),
}


def _request_components() -> tuple[dict[RequestType, str], dict[str, Any]]:
    """Each request type's JSON Schema (the published one) as OpenAPI components; `request_id`
    and `request_type` are optional over HTTP (the API fills them in)."""
    names: dict[RequestType, str] = {}
    components: dict[str, Any] = {}
    for request_type, model in _REQUEST_MODELS.items():
        schema = TypeAdapter(model).json_schema(
            ref_template="#/components/schemas/{model}", schema_generator=PublishedSchema
        )
        components.update(schema.pop("$defs", {}))
        schema["required"] = [
            f for f in schema.get("required", []) if f not in ("request_id", "request_type")
        ]
        name = f"{model.__name__}Body"
        schema["title"] = name
        components[name] = schema
        names[request_type] = name
    return names, components


def _new_request_id() -> str:
    return f"api-{uuid.uuid4().hex}"


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _complete(
    body: bytes, request_type: RequestType, idempotency_key: str | None
) -> tuple[bytes, str | None]:
    """Fill in what HTTP lets a client leave out: `request_type` (the route says it) and
    `request_id` (the Idempotency-Key, or a new one). Bodies that are not a JSON object are left
    alone for the intake to refuse with its own reason."""
    try:
        doc = wire.loads(body)
    except orjson.JSONDecodeError:
        return body, None
    if not isinstance(doc, dict):
        return body, None
    doc.setdefault("request_type", request_type)
    if "request_id" not in doc:
        doc["request_id"] = idempotency_key or _new_request_id()
    elif idempotency_key is not None and doc["request_id"] != idempotency_key:
        raise ApiError(
            422,
            "idempotency_key_mismatch",
            "the Idempotency-Key header and the body's request_id differ",
            request_id=str(doc["request_id"])[:128],
        )
    request_id = doc["request_id"] if isinstance(doc["request_id"], str) else None
    return orjson.dumps(doc), request_id


def create_app(settings: Settings, tokens: TokenTable, *, state: ApiState | None = None) -> FastAPI:
    """The API. With `state`, it uses those connections (tests); without, it opens its own in
    the ASGI lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is not None:
            yield
            return
        async with ApiState.open(settings) as opened:
            app.state.api = opened
            yield

    app = FastAPI(
        title="eglo API",
        version="1",
        summary="Submit grid optimization requests, watch them run, read the results.",
        description=(
            "The request bodies are the AMQP contract's (docs/schemas/request.v1.json), read as "
            "strictly. `request_id` and `request_type` may be left out. Errors are `Problem`s; a "
            "refused body carries the dead letter's `reason` and `rule`."
        ),
        lifespan=lifespan,
        redoc_url=None,
    )
    if state is not None:
        app.state.api = state
    bearer = HTTPBearer(
        auto_error=False,
        description="A token from EGLO_API_TOKENS_FILE (reader/submitter/operator)",
    )

    def api(request: Request) -> ApiState:
        value: ApiState = request.app.state.api
        return value

    def requires(role: Role) -> Callable[..., Principal]:
        def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> Principal:
            challenge = {"WWW-Authenticate": "Bearer"}
            if credentials is None:
                raise ApiError(
                    401, "unauthorized", "send Authorization: Bearer <token>", headers=challenge
                )
            principal = tokens.lookup(credentials.credentials)
            if principal is None:
                raise ApiError(401, "unauthorized", "unknown bearer token", headers=challenge)
            if not principal.may(role):
                raise ApiError(
                    403,
                    "forbidden",
                    f"{principal.name} has role {principal.role}; this needs {role} or above",
                )
            return principal

        return dependency

    State = Annotated[ApiState, Depends(api)]
    Reader = Annotated[Principal, Depends(requires("reader"))]
    Submitter = Annotated[Principal, Depends(requires("submitter"))]
    Operator = Annotated[Principal, Depends(requires("operator"))]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return _problem_response(ApiError(422, "invalid_parameter", detail[:2000]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a JSON body it cannot decode: a body that does not validate.
            return _problem_response(ApiError(422, "invalid_json", str(exc.detail)))
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _problem_response(
            ApiError(exc.status_code, reason or f"http_{exc.status_code}", str(exc.detail))
        )

    async def run_view(request: Request, state: ApiState, row: Any) -> dict[str, Any]:
        request_id = row["request_id"]
        links = {
            "self": str(request.url_for("get_run", request_id=request_id)),
            "plot": str(request.url_for("plot_run", request_id=request_id)),
            "similar": str(request.url_for("similar_runs", request_id=request_id)),
        }
        details = await queries.run_details(state.pool, row, links)
        return Run.model_validate(details).model_dump(mode="json")

    async def stored_run(state: ApiState, request_id: str) -> Any:
        row = await queries.run_row(state.pool, request_id)
        if row is None:
            raise ApiError(404, "not_found", f"no run with request_id {request_id}")
        return row

    # --- submitting -----------------------------------------------------------------------

    request_schema_names, request_components = _request_components()
    max_wait = settings.api_max_wait_s

    async def submit(
        request: Request,
        state: ApiState,
        principal: Principal,
        request_type: RequestType,
        wait: float,
        idempotency_key: str | None,
        raw: bytes | None = None,
    ) -> Response:
        """Publish one request. `raw` is the body (the console's form); None: the request's."""
        limit = settings.max_body_bytes
        content_type = (
            "application/json" if raw is not None else request.headers.get("content-type")
        )
        if raw is None:
            raw = await _read_body(request, limit)
        if raw is None:
            raise ApiError(422, "body_too_large", f"more than {limit} bytes, limit {limit}")
        body, request_id = _complete(raw, request_type, idempotency_key)
        parsed = parse_request(
            body,
            content_type,
            max_bytes=limit,
            routing_key=request_routing_key(request_type),
        )
        if isinstance(parsed, Rejection):
            raise ApiError(
                422,
                parsed.reason,
                parsed.detail,
                rule=parsed.rule,
                request_id=request_id or identify(body)[0],
            )
        request_id = parsed.request_id
        existing = await queries.run_row(state.pool, request_id)
        if existing is not None:
            if existing["request_fingerprint"] != request_fingerprint(parsed):
                raise ApiError(
                    409,
                    "request_id_conflict",
                    f"request_id {request_id} was already used for a different request",
                    request_id=request_id,
                )
            return JSONResponse(await run_view(request, state, existing), status_code=200)
        correlation_id = uuid.uuid4().hex
        reply = state.replies.expect(correlation_id) if wait > 0 else None
        try:
            try:
                await state.publisher.publish(
                    parsed,
                    reply_to=state.replies.queue_name if reply is not None else None,
                    correlation_id=correlation_id if reply is not None else None,
                )
            except Exception as exc:  # noqa: BLE001 - any publish failure is the broker's
                log.warning("api.publish.failed", request_id=request_id, error=repr(exc)[:300])
                raise ApiError(
                    503,
                    "broker_unavailable",
                    "the broker did not confirm the request; send it again (same request_id)",
                    request_id=request_id,
                ) from None
            # Recorded once the broker has it: a refused publish leaves no "pending" behind.
            await queries.record_submission(state.pool, request_id, request_type, principal)
            log.info("api.submitted", request_id=request_id, by=principal.name, wait=wait)
            if reply is not None:
                with contextlib.suppress(TimeoutError):
                    message = await asyncio.wait_for(reply, timeout=wait)
                    return await _answer_reply(request, state, request_id, message)
        finally:
            if reply is not None:
                state.replies.forget(correlation_id)
        status_url = str(request.url_for("get_run", request_id=request_id))
        accepted = Accepted(request_id=request_id, request_type=request_type, status_url=status_url)
        return JSONResponse(
            accepted.model_dump(mode="json"), status_code=202, headers={"Location": status_url}
        )

    async def _answer_reply(
        request: Request, state: ApiState, request_id: str, message: ReplyMessage
    ) -> Response:
        if message.event_type == "request.dead_lettered":
            reason = str(message.body.get("reason"))
            raise ApiError(
                409 if reason == "request_id_conflict" else 422,
                reason,
                str(message.body.get("detail", "")),
                rule=message.body.get("rule"),
                request_id=request_id,
            )
        row = await stored_run(state, request_id)
        return JSONResponse(await run_view(request, state, row), status_code=200)

    def add_submit_route(path: str, request_type: RequestType) -> None:
        async def endpoint(
            request: Request,
            state: State,
            principal: Submitter,
            wait: Annotated[
                float,
                Query(
                    ge=0,
                    le=max_wait,
                    description="Seconds to wait for the outcome (200 with the run); 202 after.",
                ),
            ] = 0,
            idempotency_key: Annotated[
                str | None,
                Header(
                    alias="Idempotency-Key",
                    min_length=1,
                    max_length=128,
                    pattern=REQUEST_ID_PATTERN,
                    description="The request_id, when the body has none (or must equal it).",
                ),
            ] = None,
        ) -> Response:
            return await submit(request, state, principal, request_type, wait, idempotency_key)

        schema_ref = {"$ref": f"#/components/schemas/{request_schema_names[request_type]}"}
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            name=f"submit_{request_type}",
            summary=f"Submit a {request_type} request",
            tags=["submit"],
            status_code=202,
            response_model=None,
            responses={
                200: {"model": Run, "description": "Stored: the run (already, or within wait)."},
                202: {"model": Accepted, "description": "Published and confirmed; not stored yet."},
                **AUTH_ERRORS,
                409: _doc("The request_id was used for a different request."),
                422: _doc("The body is not a valid request: the dead letter's reason and rule."),
                503: _doc("The broker did not confirm the publish."),
            },
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schema_ref}},
                }
            },
        )

    for path, request_type in SUBMIT_ROUTES.items():
        add_submit_route(path, request_type)

    # --- reading --------------------------------------------------------------------------

    @app.get(
        "/runs/{request_id}",
        name="get_run",
        tags=["runs"],
        response_model=Run | PendingRun,
        responses={**AUTH_ERRORS, 404: _doc("Neither stored nor submitted here.")},
    )
    async def get_run(
        request: Request, request_id: RequestIdPath, state: State, _: Reader
    ) -> Response:
        """A stored run (status, request, result, execution metrics, anomalies, events), or
        `pending` when this API accepted it and no worker has stored it yet."""
        row = await queries.run_row(state.pool, request_id)
        if row is not None:
            return JSONResponse(await run_view(request, state, row))
        waiting = await queries.pending(state.pool, request_id)
        if waiting is None:
            raise ApiError(404, "not_found", f"no run with request_id {request_id}")
        return JSONResponse(waiting.model_dump(mode="json"))

    @app.get(
        "/runs",
        tags=["runs"],
        response_model=RunPage,
        responses={**AUTH_ERRORS},
    )
    async def list_runs(
        state: State,
        _: Reader,
        type: Annotated[RequestType | None, Query(description="request_type")] = None,
        region: Annotated[
            str | None, Query(min_length=1, max_length=64, pattern=LABEL_PATTERN)
        ] = None,
        status: RunStatus | None = None,
        forecast_from: Annotated[date | None, Query(description="forecast_date ≥")] = None,
        forecast_to: Annotated[date | None, Query(description="forecast_date ≤")] = None,
        created_from: Annotated[datetime | None, Query(description="stored at ≥")] = None,
        created_to: Annotated[datetime | None, Query(description="stored at <")] = None,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> RunPage:
        """Stored runs, newest first, `limit` per page; follow `next_cursor`."""
        try:
            items, next_cursor = await queries.list_runs(
                state.pool,
                request_type=type,
                region=region,
                status=status,
                forecast_from=forecast_from,
                forecast_to=forecast_to,
                created_from=created_from,
                created_to=created_to,
                cursor=cursor,
                limit=limit,
            )
        except queries.InvalidCursor as exc:
            raise ApiError(422, "invalid_cursor", str(exc)) from None
        return RunPage(items=items, next_cursor=next_cursor)

    @app.get(
        "/runs/{request_id}/similar",
        name="similar_runs",
        tags=["runs"],
        response_model=list[SimilarRunView],
        responses={**AUTH_ERRORS, 404: _doc("No such run, or it has no embedding (yet).")},
    )
    async def similar(
        request_id: RequestIdPath,
        state: State,
        _: Reader,
        k: Annotated[int, Query(ge=1, le=50)] = 5,
        model: Annotated[
            str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
        ] = FEATURES_MODEL,
    ) -> list[SimilarRunView]:
        """The k nearest past runs of the same type by cosine distance of their embeddings."""
        row = await stored_run(state, request_id)
        try:
            found = await similarity.similar_runs(state.pool, row["run_id"], k=k, model=model)
        except similarity.EmbeddingNotFound as exc:
            raise ApiError(404, "no_embedding", str(exc), request_id=request_id) from None
        return [
            SimilarRunView(
                run_id=s.run_id,
                request_id=s.request_id,
                request_type=s.request_type,
                region=s.region,
                forecast_date=s.forecast_date,
                distance=s.distance,
                result=s.result_payload,
            )
            for s in found
        ]

    @app.get(
        "/runs/{request_id}/plot.png",
        name="plot_run",
        tags=["runs"],
        response_class=Response,
        responses={
            200: {
                "description": "The run drawn (forecast, storage, grid switch or simulation).",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
            **AUTH_ERRORS,
            404: _doc("No such run."),
            409: _doc("The run has no result to draw (failed or expired)."),
            501: _doc("This installation cannot draw: matplotlib, a dependency, is missing."),
        },
    )
    async def plot_run(request_id: RequestIdPath, state: State, _: Reader) -> Response:
        row = await stored_run(state, request_id)
        png = await actions.run_plot(state, row["run_id"], request_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get(
        "/anomalies",
        tags=["anomalies"],
        response_model=list[AnomalyView],
        responses={**AUTH_ERRORS},
    )
    async def list_anomalies(
        state: State,
        _: Reader,
        resolved: bool | None = None,
        severity: Severity | None = None,
        source: Annotated[str | None, Query(pattern="^(eglo|qnn)$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[AnomalyView]:
        """eglo's and the QNN's anomalies, newest first."""
        return await queries.list_anomalies(
            state.pool, resolved=resolved, severity=severity, source=source, limit=limit
        )

    @app.post(
        "/anomalies/{anomaly_id}/resolve",
        tags=["anomalies"],
        response_model=Resolved,
        responses={
            **AUTH_ERRORS,
            404: _doc("No such anomaly."),
            502: _doc("The QNN refused to resolve its anomaly."),
        },
    )
    async def resolve_anomaly(anomaly_id: uuid.UUID, state: State, principal: Operator) -> Resolved:
        """Mark an anomaly resolved (on the QNN too when it is the QNN's). Audited."""
        return await actions.resolve_anomaly(state, principal, anomaly_id)

    @app.get(
        "/dead-letters",
        tags=["dead letters"],
        response_model=list[DeadLetterView],
        responses={**AUTH_ERRORS, 503: _doc("The broker is unreachable.")},
    )
    async def list_dead_letters(
        state: State, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[DeadLetterView]:
        """A look at `eglo.requests.dlq`; the letters stay where they are."""
        return await actions.dead_letters(state, limit)

    @app.post(
        "/dead-letters/replay",
        tags=["dead letters"],
        response_model=ReplayResult,
        responses={**AUTH_ERRORS, 503: _doc("The broker is unreachable.")},
    )
    async def replay_dead_letters(
        command: Annotated[ReplayCommand, Body()], state: State, principal: Operator
    ) -> ReplayResult:
        """Re-publish dead letters (of one reason, or all) to `eglo.requests`. Audited."""
        return await actions.replay_dead_letters(
            state, principal, reason=command.reason, limit=command.limit
        )

    @app.get(
        "/accuracy",
        tags=["accuracy"],
        response_model=list[AccuracyRow],
        responses={**AUTH_ERRORS},
    )
    async def accuracy(
        state: State,
        _: Reader,
        region: Annotated[
            str | None, Query(min_length=1, max_length=64, pattern=LABEL_PATTERN)
        ] = None,
        model: Annotated[
            str | None, Query(min_length=1, max_length=128, pattern=LABEL_PATTERN)
        ] = None,
    ) -> list[AccuracyRow]:
        """Forecast accuracy per model and region (MAPE, RMSE, MAE, R², coverage)."""
        rows = await scoring.accuracy_report(state.pool, region, model)
        return [AccuracyRow.model_validate(dict(r)) for r in rows]

    @app.get(
        "/health",
        tags=["health"],
        response_model=Health,
        responses={503: {"model": Health, "description": "The broker or the database is down."}},
    )
    async def health(state: State) -> Response:
        """The broker, the database and the QNN's /api/v1/health/simple, each with its state.
        No token needed (probes)."""
        broker, database, qnn = await asyncio.gather(
            _probe(lambda: _broker_check(state)),
            _probe(lambda: _database_check(state)),
            _probe(lambda: _qnn_check(state)),
        )
        if broker.state == "down" or database.state == "down":
            status = "down"
        else:
            status = "ok" if qnn.state == "up" else "degraded"
        report = Health(status=status, broker=broker, database=database, qnn=qnn)
        return JSONResponse(
            report.model_dump(mode="json"), status_code=503 if status == "down" else 200
        )

    console.mount(app, tokens=tokens, submit=submit, run_view=run_view)

    @app.get("/healthz", tags=["health"], response_model=dict[str, str])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no token, no dependencies)."""
        return {"status": "alive"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=dict[str, str],
        responses={503: {"model": dict[str, str], "description": "Broker or database down."}},
    )
    async def readyz(state: State) -> Response:
        """Readiness: the broker connection is open and the database answers."""
        broker, database = await asyncio.gather(
            _probe(lambda: _broker_check(state)), _probe(lambda: _database_check(state))
        )
        ready = broker.state == database.state == "up"
        return JSONResponse(
            {"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                request_components
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _probe(check: Callable[[], Awaitable[str | None]]) -> Component:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), timeout=HEALTH_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure is the component's state
        return Component(state="down", detail=f"{type(exc).__name__}: {exc}"[:300])
    return Component(
        state="up", detail=detail, latency_ms=round((time.perf_counter() - started) * 1000, 2)
    )


async def _broker_check(state: ApiState) -> str | None:
    if state.connection.is_closed:
        raise ConnectionError("not connected")
    channel = await state.connection.channel()  # a round trip: the broker answers
    await channel.close()
    return None


# What the API needs of each table it touches (db/worker_role.sql grants these and more).
API_PRIVILEGES: Final[dict[str, tuple[str, ...]]] = {
    "optimization_runs": ("SELECT",),
    "qnn_execution_metrics": ("SELECT",),
    "anomalies": ("SELECT", "UPDATE"),
    "outbox": ("SELECT",),
    "api_submissions": ("SELECT", "INSERT"),
    "audit_log": ("INSERT",),
}


async def _database_check(state: ApiState) -> str | None:
    """The database answers, its schema is the code's (0005_api applied), privileges held."""
    async with state.pool.acquire() as conn:
        problem = await schema_problem(conn, API_PRIVILEGES)
    if problem is not None:
        raise RuntimeError(problem)
    return None


async def _qnn_check(state: ApiState) -> str | None:
    response = await state.qnn.get(QNN_HEALTH_PATH)
    response.raise_for_status()
    return response.text[:200]
