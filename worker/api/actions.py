"""What the JSON routes and the console both do: errors as Problems, the audited operator
actions (replay, resolve), dead letters, and a run's plot."""

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any, Final

import aiormq
import httpx
import structlog

from worker.api import queries
from worker.api.auth import Principal
from worker.api.models import DeadLetterView, Problem, ReplayResult, Resolved
from worker.api.state import ApiState
from worker.ops import dlq, monitoring
from worker.runtime import connections

log = structlog.get_logger(__name__)

BROKER_ERRORS: Final = (aiormq.exceptions.AMQPError, OSError, TimeoutError)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        rule: str | None = None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.problem = Problem(reason=reason, rule=rule, detail=detail, request_id=request_id)
        self.headers = headers


def broker_down(exc: BaseException) -> ApiError:
    log.warning("api.broker.unavailable", error=repr(exc)[:300])
    return ApiError(503, "broker_unavailable", f"the broker is unreachable: {type(exc).__name__}")


async def resolve_anomaly(state: ApiState, principal: Principal, anomaly_id: uuid.UUID) -> Resolved:
    """Mark an anomaly resolved (on the QNN too when it is the QNN's); audited, also a failure."""
    outcome = "ok"
    try:
        source = await monitoring.resolve_anomaly(state.pool, state.qnn, str(anomaly_id))
    except monitoring.AnomalyNotFound as exc:
        outcome = "not_found"
        raise ApiError(404, "not_found", str(exc)) from None
    except httpx.HTTPError as exc:
        outcome = f"qnn_error: {type(exc).__name__}"
        raise ApiError(502, "qnn_unavailable", f"the QNN did not resolve it: {exc}") from None
    finally:
        await queries.audit(
            state.pool,
            principal,
            "anomaly.resolve",
            target=str(anomaly_id),
            details={},
            outcome=outcome,
        )
    return Resolved(anomaly_id=anomaly_id, source=source)


async def replay_dead_letters(
    state: ApiState, principal: Principal, *, reason: str | None, limit: int
) -> ReplayResult:
    """Re-publish dead letters to `eglo.requests` (worker.ops.dlq); audited, also a failure."""
    details: dict[str, Any] = {"reason": reason, "limit": limit}
    outcome = "error"
    try:
        # worker.ops.dlq replays a bounded snapshot: the letters in the DLQ now, each at most once,
        # also when a running worker dead-letters a replayed one again at once.
        replayed, kept = await dlq.replay_dead_letters(
            connections.amqp_url(state.settings), reason=reason, limit=limit
        )
        details.update(replayed=replayed, kept=kept)
        outcome = "ok"
    except BROKER_ERRORS as exc:
        outcome = "broker_unavailable"
        raise broker_down(exc) from None
    finally:
        await queries.audit(
            state.pool,
            principal,
            "dead_letters.replay",
            target=reason,
            details=details,
            outcome=outcome,
        )
    return ReplayResult(replayed=replayed, kept=kept)


async def dead_letters(state: ApiState, limit: int) -> list[DeadLetterView]:
    try:
        letters = await dlq.list_dead_letters(connections.amqp_url(state.settings), limit=limit)
    except BROKER_ERRORS as exc:
        raise broker_down(exc) from None
    return [
        DeadLetterView(
            message_id=d.message_id,
            routing_key=d.routing_key,
            reason=d.reason,
            detail=d.detail,
            body_preview=d.body_preview,
            size=d.size,
            dead_lettered_at=d.dead_lettered_at,
        )
        for d in letters
    ]


def plots_module() -> Any:
    """analytics/plots, which needs matplotlib (a runtime dependency, in the image); an install
    without it answers a plot 501 and the rest of the API works."""
    try:
        from worker.analytics import plots
    except ImportError:
        raise ApiError(
            501,
            "plots_unavailable",
            "drawing runs needs matplotlib, a dependency of eglo that this installation lacks:"
            " reinstall eglo with its dependencies (pip install eglo) where eglo api runs",
        ) from None
    return plots


async def run_plot(state: ApiState, run_id: uuid.UUID, request_id: str) -> bytes:
    """A completed run drawn as PNG; 409 for a run with no result to draw."""
    plots = plots_module()
    try:
        run = await plots.fetch_run(state.pool, run_id)
    except plots.RunNotPlottable as exc:
        raise ApiError(409, "not_plottable", str(exc), request_id=request_id) from None
    return await asyncio.to_thread(_render_png, plots, run)


def _render_png(plots: Any, run: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="eglo-plot-") as folder:
        out: Path = plots.render(run, Path(folder) / "run.png")
        return out.read_bytes()
