"""The emulator's HTTP API (aiohttp): health, predict, monitoring and test-only admin routes.

Faults are injected on predict only. Health stays truthful unless a test flips the whole API
down via `POST /admin/health?ok=false`, which makes every non-admin route answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from pydantic import ValidationError

from contracts.qnn import HEALTH_PATH, PREDICT_PATH
from qnn_emulator.execution import execution_report
from qnn_emulator.faults import Fault, FaultInjector
from qnn_emulator.monitoring import (
    AnomalyStore,
    PredictionLog,
    load_anomalies,
    shortfall_anomaly,
    slow_execution_anomaly,
)
from qnn_emulator.predictors import (
    AnyPayload,
    Prediction,
    circuits,
    predict,
    problem_size,
    runs_inline,
)
from qnn_emulator.settings import EmulatorSettings, FaultKnobs
from qnn_emulator.wire import (
    ForecastInputs,
    PredictBody,
    describe_validation_error,
    error_response,
    json_response,
)

logger = logging.getLogger("qnn_emulator")

ANOMALIES_PATH = "/api/v1/monitoring/anomalies"
MAX_BODY_BYTES = 8 * 1024 * 1024  # eight weeks of 15-minute history with temperatures fits
SHUTDOWN_TIMEOUT_S = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class EmulatorState:
    """Everything the handlers share; one per application."""

    settings: EmulatorSettings
    faults: FaultInjector
    anomalies: AnomalyStore
    logs: PredictionLog
    models: frozenset[str]
    healthy: bool
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="qnn-emu")
    )


STATE = web.AppKey("qnn_emulator_state", EmulatorState)


class BadQuery(ValueError):
    """A query parameter that cannot be understood; answered with 422."""


def _authorized(request: web.Request, key: str) -> bool:
    auth = request.headers.get("Authorization", "")
    offered = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("X-API-Key", "")
    return hmac.compare_digest(offered.encode(), key.encode())


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Health is always open; a down API refuses the rest; the API key guards the rest."""
    if request.path == HEALTH_PATH:
        return await handler(request)
    state = request.app[STATE]
    if not state.healthy and not request.path.startswith("/admin/"):
        return error_response(503, "service_unavailable", "the API is down (admin switch)")
    key = state.settings.api_key
    if key is not None and not _authorized(request, key.get_secret_value()):
        return error_response(
            401,
            "unauthorized",
            "missing or wrong API key",
            headers={"WWW-Authenticate": 'Bearer realm="qnn"'},
        )
    try:
        return await handler(request)
    except BadQuery as exc:
        return error_response(422, "validation_error", str(exc))


async def health(request: web.Request) -> web.Response:
    if request.app[STATE].healthy:
        return json_response({"status": "ok"})
    return json_response({"status": "unavailable"}, status=503)


def _record_anomalies(
    state: EmulatorState, body: PredictBody, prediction: Prediction, elapsed_ms: float
) -> None:
    ids = {"model_id": body.model_id, "request_id": body.inputs.request_id}
    if prediction.load_residuals is not None and isinstance(body.inputs, ForecastInputs):
        history = len(body.inputs.payload.historical_loads)
        for anomaly in load_anomalies(prediction.load_residuals, history_length=history, **ids):
            state.anomalies.add(anomaly)
    for maybe in (
        slow_execution_anomaly(elapsed_ms, state.settings.slow_execution_ms, **ids),
        shortfall_anomaly(prediction.unserved_fraction, **ids),
    ):
        if maybe is not None:
            state.anomalies.add(maybe)


async def _injected_failure(
    state: EmulatorState, fault: Fault | None, log: Callable[[int], None]
) -> web.Response | None:
    """The response for a failing fault (throttle, error, hang), or None to go on and compute."""
    knobs = state.faults.knobs
    if fault is None and not state.faults.admit(time.monotonic()):
        fault = Fault.RATE_LIMIT
    headers = {} if fault is None else {"X-Emulator-Fault": fault.value}
    if fault is Fault.THROTTLE or fault is Fault.RATE_LIMIT:
        log(429)
        headers["Retry-After"] = str(knobs.retry_after_s)
        return error_response(429, "rate_limited", "too many requests", headers=headers)
    if fault is Fault.ERROR:
        status = state.faults.error_status()
        log(status)
        code = "internal_error" if status == 500 else "service_unavailable"
        return error_response(status, code, "injected failure", headers=headers)
    if fault is Fault.HANG:
        # Ends early only when the server stops, so shutdown never waits out a hang.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.stopping.wait(), timeout=knobs.hang_s)
        log(504)
        return error_response(504, "timeout", "execution did not finish", headers=headers)
    return None


async def _compute(state: EmulatorState, payload: AnyPayload) -> Prediction:
    """Small problems run on the loop (cheaper than a thread hop); big ones in the executor."""
    if runs_inline(payload):
        return predict(payload)
    return await asyncio.get_running_loop().run_in_executor(state.executor, predict, payload)


async def predict_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = PredictBody.model_validate_json(await request.read(), strict=True)
    except ValidationError as exc:
        message, details = describe_validation_error(exc)
        return error_response(422, "validation_error", message, details=details)
    if body.model_id not in state.models:
        return error_response(404, "model_not_found", f"unknown model_id {body.model_id!r}")
    inputs = body.inputs
    fault = state.faults.draw()

    def log(status: int, elapsed_ms: float | None = None, cost: float | None = None) -> None:
        state.logs.record(
            body.model_id,
            request_id=inputs.request_id,
            request_type=inputs.request_type,
            status_code=status,
            execution_time_ms=elapsed_ms,
            cost_usd=cost,
            fault=None if fault is None else fault.value,
        )

    failure = await _injected_failure(state, fault, log)
    if failure is not None:
        return failure

    started = time.perf_counter()
    latency_ms = state.faults.knobs.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000.0)
    try:
        prediction = await _compute(state, inputs.payload)
    except (ValueError, ArithmeticError) as exc:
        # Valid input the model cannot solve (values at the float range's ends overflow the
        # solvers): a 4xx, so the caller records a failed run instead of retrying for minutes.
        logger.info("unsolvable input for request %s: %s", inputs.request_id, exc)
        log(422)
        return error_response(422, "unsolvable_input", f"the model cannot solve this input: {exc}")
    except Exception:
        logger.exception("prediction failed for request %s", inputs.request_id)
        log(500)
        return error_response(500, "internal_error", "the model failed on this input")
    report = execution_report(
        model_id=body.model_id,
        mode=body.mode,
        problem_size=problem_size(inputs.payload),
        circuits=circuits(inputs.payload),
        optimization_level=body.optimization_level,
        execution_time_ms=(time.perf_counter() - started) * 1000.0,
    )
    data = orjson.dumps(
        {
            "success": True,
            "data": {
                "prediction": prediction.result,
                "model_id": body.model_id,
                "execution": report.to_json(),
            },
        }
    )
    _record_anomalies(state, body, prediction, report.execution_time_ms)
    log(200, report.execution_time_ms, report.cost_usd)
    if fault is Fault.GARBAGE:
        garbled, content_type = state.faults.garble(data)
        headers = {"X-Emulator-Fault": fault.value}
        return web.Response(body=garbled, content_type=content_type, headers=headers)
    return web.Response(body=data, content_type="application/json")


def _flag(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadQuery(f"{name} must be true or false")


def _limit(request: web.Request, default: int) -> int:
    try:
        return max(0, int(request.query.get("limit", default)))
    except ValueError:
        return default


async def list_anomalies(request: web.Request) -> web.Response:
    state = request.app[STATE]
    found = state.anomalies.list(resolved=_flag(request, "resolved"))
    return json_response([a.to_json() for a in found[: _limit(request, len(found))]])


async def resolve_anomaly(request: web.Request) -> web.Response:
    anomaly = request.app[STATE].anomalies.resolve(request.match_info["anomaly_id"])
    if anomaly is None:
        return error_response(404, "not_found", "no such anomaly")
    return json_response(anomaly.to_json())


async def model_logs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id not in state.models:
        return error_response(404, "model_not_found", f"unknown model_id {model_id!r}")
    return json_response(state.logs.recent(model_id, _limit(request, state.settings.log_buffer)))


async def admin_health(request: web.Request) -> web.Response:
    """Test hook: `?ok=false` takes the whole API down, `?ok=true` brings it back."""
    state = request.app[STATE]
    ok = _flag(request, "ok")
    if ok is not None:
        state.healthy = ok
    return json_response({"healthy": state.healthy})


async def admin_faults(request: web.Request) -> web.Response:
    """Test hook: read (GET) or partially update (POST, JSON object) the fault knobs."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            update = orjson.loads(await request.read() or b"{}")
            if not isinstance(update, dict):
                raise ValueError("body must be a JSON object")
            state.faults.knobs = FaultKnobs.model_validate(
                {**state.faults.knobs.model_dump(), **update}
            )
        except (ValueError, ValidationError) as exc:
            return error_response(422, "validation_error", str(exc))
    return json_response(state.faults.knobs.model_dump())


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].stopping.set()


async def _on_cleanup(app: web.Application) -> None:
    app[STATE].executor.shutdown(wait=False, cancel_futures=True)


def build_app(settings: EmulatorSettings | None = None) -> web.Application:
    """The emulator as an aiohttp application, configured by `settings` (default: env)."""
    settings = settings or EmulatorSettings()
    app = web.Application(middlewares=[_gate], client_max_size=MAX_BODY_BYTES)
    app[STATE] = EmulatorState(
        settings=settings,
        faults=FaultInjector(settings.knobs(), settings.seed),
        anomalies=AnomalyStore(settings.anomaly_buffer),
        logs=PredictionLog(settings.log_buffer),
        models=frozenset(settings.model_ids),
        healthy=not settings.unhealthy,
    )
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_post(PREDICT_PATH, predict_handler)
    app.router.add_get(ANOMALIES_PATH, list_anomalies)
    app.router.add_get(ANOMALIES_PATH + "/", list_anomalies)
    app.router.add_post(ANOMALIES_PATH + "/{anomaly_id}/resolve", resolve_anomaly)
    app.router.add_get("/api/v1/monitoring/models/{model_id}/logs", model_logs)
    app.router.add_post("/admin/health", admin_health)
    app.router.add_get("/admin/health", admin_health)
    app.router.add_get("/admin/faults", admin_faults)
    app.router.add_post("/admin/faults", admin_faults)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


@contextlib.asynccontextmanager
async def running_emulator(
    settings: EmulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the emulator in this event loop; yields its base URL (port 0 picks a free port)."""
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{bound_port}"
        logger.info("qnn emulator listening on %s", url)
        yield url
    finally:
        app[STATE].stopping.set()
        await runner.cleanup()
