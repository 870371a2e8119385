"""The operator console: server-rendered pages under /console, served by `eglo api`.

No JavaScript and nothing from the internet: HTML forms and the run's PNG plot. A browser signs
in with an API token once; it is kept in an HttpOnly, SameSite=Strict cookie scoped to /console,
and every form that changes state also carries a token derived from it (CSRF). The same roles
apply as to the JSON routes; the operator actions are the same audited functions.
"""

import hashlib
import hmac
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from contracts.vocabulary import REQUEST_TYPES, RUN_STATUSES, RequestType
from producers.sample import generate_requests
from worker.analytics import accuracy as scoring
from worker.analytics import similarity
from worker.api import actions, queries
from worker.api.actions import ApiError
from worker.api.auth import Principal, Role, TokenTable
from worker.api.state import ApiState

COOKIE: Final = "eglo_console"
PREFIX: Final = "/console"
FORM_LIMIT: Final = 4 << 20
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_SUBMIT_TYPES: Final[dict[str, RequestType]] = {t: t for t in REQUEST_TYPES}


def utc_time(value: datetime | str | None) -> str:
    """A stored instant in UTC with the zone marked, `2026-12-05 22:46:01 UTC` (the `utc`
    filter of the templates). The database's columns are timestamptz, so every value carries its
    offset; one without (never expected) is shown as it is, unmarked, rather than guessed."""
    if value is None or value == "":
        return "\u2013"  # an en dash, as the templates show a missing value
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_TEMPLATES.filters["utc"] = utc_time

Submit = Callable[..., Awaitable[Response]]
RunView = Callable[[Request, ApiState, Any], Awaitable[dict[str, Any]]]


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_LABEL = re.compile(r"^[^\u0000-\u001f\u007f]{1,64}$")


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"eglo-console-csrf", hashlib.sha256).hexdigest()


def _example(request_type: str) -> str:
    for doc in generate_requests(8, 1, id_prefix="console"):
        if doc["request_type"] == request_type:
            doc.pop("request_id")
            return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    return "{}"


def mount(app: FastAPI, *, tokens: TokenTable, submit: Submit, run_view: RunView) -> None:
    def state_of(request: Request) -> ApiState:
        value: ApiState = request.app.state.api
        return value

    def page(
        request: Request,
        template: str,
        *,
        who: Principal | None = None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        token = request.cookies.get(COOKIE, "")
        html = _TEMPLATES.get_template(template).render(
            who=who,
            csrf=csrf_token(token) if who else "",
            prefix=PREFIX,
            flash=request.query_params.get("flash"),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def signed_in(request: Request, role: Role) -> Principal | Response:
        token = request.cookies.get(COOKIE)
        who = tokens.lookup(token) if token else None
        if who is None:
            target = quote(
                request.url.path + (f"?{request.url.query}" if request.url.query else "")
            )
            return RedirectResponse(f"{PREFIX}/login?next={target}", status_code=303)
        if not who.may(role):
            return page(
                request,
                "error.html",
                who=who,
                status=403,
                title="Not allowed",
                detail=f"{who.name} has role {who.role}; this needs {role} or above.",
            )
        return who

    async def form(request: Request) -> dict[str, str]:
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > FORM_LIMIT:
                raise ApiError(422, "body_too_large", "form too large")
        return {k: v[0] for k, v in parse_qs(chunks.decode("utf-8", "replace")).items()}

    def csrf_ok(request: Request, fields: dict[str, str]) -> bool:
        token = request.cookies.get(COOKIE, "")
        return bool(token) and hmac.compare_digest(fields.get("csrf", ""), csrf_token(token))

    def refused(request: Request, who: Principal) -> HTMLResponse:
        return page(
            request,
            "error.html",
            who=who,
            status=403,
            title="Form expired",
            detail="The form did not carry this session's token; reload the page and try again.",
        )

    def go(path: str, flash: str | None = None) -> RedirectResponse:
        suffix = f"?{urlencode({'flash': flash})}" if flash else ""
        return RedirectResponse(f"{PREFIX}{path}{suffix}", status_code=303)

    # --- signing in -----------------------------------------------------------------------

    @app.get(PREFIX, include_in_schema=False)
    async def console_home() -> Response:
        return go("/runs")

    @app.get(f"{PREFIX}/login", include_in_schema=False)
    async def login_page(request: Request) -> Response:
        return page(request, "login.html", next=request.query_params.get("next", ""), error=None)

    @app.post(f"{PREFIX}/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = await form(request)
        token = fields.get("token", "").strip()
        target = fields.get("next", "")
        if not target.startswith(f"{PREFIX}/"):
            target = f"{PREFIX}/runs"
        if tokens.lookup(token) is None:
            return page(request, "login.html", next=target, error="Unknown token.", status=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=PREFIX,
            max_age=12 * 3600,
        )
        return response

    @app.post(f"{PREFIX}/logout", include_in_schema=False)
    async def logout() -> Response:
        response = go("/login")
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # --- runs -----------------------------------------------------------------------------

    @app.get(f"{PREFIX}/runs", include_in_schema=False)
    async def runs_page(request: Request) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        q = request.query_params
        filters = {k: q.get(k) or None for k in ("type", "region", "status", "from", "to")}
        error = None
        items: list[Any] = []
        next_cursor = None
        if filters["region"] and not _LABEL.fullmatch(filters["region"]):
            filters["region"] = None
            error = "A region has 1 to 64 characters, no control ones. "
        try:
            items, next_cursor = await queries.list_runs(
                state_of(request).pool,
                request_type=filters["type"] if filters["type"] in REQUEST_TYPES else None,
                region=filters["region"],
                status=filters["status"] if filters["status"] in RUN_STATUSES else None,
                forecast_from=_date(filters["from"]),
                forecast_to=_date(filters["to"]),
                created_from=None,
                created_to=None,
                cursor=q.get("cursor") or None,
                limit=50,
            )
        except (queries.InvalidCursor, ValueError) as exc:
            error = (error or "") + str(exc)
        next_url = None
        if next_cursor:
            kept = {k: v for k, v in filters.items() if v}
            next_url = f"{PREFIX}/runs?{urlencode({**kept, 'cursor': next_cursor})}"
        return page(
            request,
            "runs.html",
            who=who,
            runs=items,
            filters=filters,
            types=REQUEST_TYPES,
            statuses=RUN_STATUSES,
            next_url=next_url,
            error=error,
        )

    @app.get(f"{PREFIX}/runs/{{request_id}}", include_in_schema=False)
    async def run_page(request: Request, request_id: str) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        state = state_of(request)
        row = (
            await queries.run_row(state.pool, request_id)
            if _REQUEST_ID.fullmatch(request_id)
            else None
        )
        if row is None:
            pending = (
                await queries.pending(state.pool, request_id)
                if _REQUEST_ID.fullmatch(request_id)
                else None
            )
            if pending is None:
                return page(
                    request,
                    "error.html",
                    who=who,
                    status=404,
                    title="No such run",
                    detail=f"No run with request_id {request_id}.",
                )
            return page(request, "pending.html", who=who, pending=pending)
        run = await run_view(request, state, row)
        similar: list[Any] = []
        similar_note = None
        try:
            similar = await similarity.similar_runs(state.pool, row["run_id"], k=5)
        except similarity.EmbeddingNotFound:
            similar_note = "Not embedded yet (eglo embedder)."
        return page(
            request,
            "run.html",
            who=who,
            run=run,
            similar=similar,
            similar_note=similar_note,
            result_json=orjson.dumps(run["result"], option=orjson.OPT_INDENT_2).decode()
            if run["result"] is not None
            else None,
        )

    @app.get(f"{PREFIX}/runs/{{request_id}}/plot.png", include_in_schema=False)
    async def run_plot(request: Request, request_id: str) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        state = state_of(request)
        if not _REQUEST_ID.fullmatch(request_id):
            return Response(status_code=404)
        row = await queries.run_row(state.pool, request_id)
        if row is None:
            return Response(status_code=404)
        try:
            png = await actions.run_plot(state, row["run_id"], request_id)
        except ApiError as exc:
            return Response(status_code=exc.status)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    # --- submitting -----------------------------------------------------------------------

    @app.get(f"{PREFIX}/submit", include_in_schema=False)
    async def submit_page(request: Request) -> Response:
        who = signed_in(request, "submitter")
        if isinstance(who, Response):
            return who
        request_type = request.query_params.get("type", "forecast")
        if request_type not in REQUEST_TYPES:
            request_type = "forecast"
        return page(
            request,
            "submit.html",
            who=who,
            types=REQUEST_TYPES,
            request_type=request_type,
            body=_example(request_type),
            problem=None,
        )

    @app.post(f"{PREFIX}/submit", include_in_schema=False)
    async def submit_form(request: Request) -> Response:
        who = signed_in(request, "submitter")
        if isinstance(who, Response):
            return who
        fields = await form(request)
        if not csrf_ok(request, fields):
            return refused(request, who)
        request_type = _SUBMIT_TYPES.get(fields.get("type", ""), "forecast")
        body = fields.get("body", "")
        state = state_of(request)
        try:
            response = await submit(
                request,
                state,
                who,
                request_type,
                min(10.0, state.settings.api_max_wait_s),
                None,
                raw=body.encode(),
            )
        except ApiError as exc:
            return page(
                request,
                "submit.html",
                who=who,
                types=REQUEST_TYPES,
                request_type=request_type,
                body=body,
                problem=exc.problem,
                status=exc.status,
            )
        request_id = orjson.loads(bytes(response.body))["request_id"]
        return go(f"/runs/{quote(request_id)}")

    # --- dead letters, anomalies, accuracy ------------------------------------------------

    @app.get(f"{PREFIX}/dead-letters", include_in_schema=False)
    async def dead_letters_page(request: Request) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        letters = await actions.dead_letters(state_of(request), 200)
        reasons = sorted({d.reason for d in letters})
        return page(request, "dead_letters.html", who=who, letters=letters, reasons=reasons)

    @app.post(f"{PREFIX}/dead-letters/replay", include_in_schema=False)
    async def replay_form(request: Request) -> Response:
        who = signed_in(request, "operator")
        if isinstance(who, Response):
            return who
        fields = await form(request)
        if not csrf_ok(request, fields):
            return refused(request, who)
        reason = fields.get("reason") or None
        limit = int(fields["limit"]) if fields.get("limit", "").isdigit() else 100
        result = await actions.replay_dead_letters(
            state_of(request), who, reason=reason, limit=max(1, min(limit, 10_000))
        )
        return go(
            "/dead-letters",
            f"Replayed {result.replayed} dead letter(s); {result.kept} left in the queue.",
        )

    @app.get(f"{PREFIX}/anomalies", include_in_schema=False)
    async def anomalies_page(request: Request) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        show = request.query_params.get("show", "unresolved")
        rows = await queries.list_anomalies(
            state_of(request).pool,
            resolved=False if show == "unresolved" else None,
            severity=None,
            source=None,
            limit=200,
        )
        return page(request, "anomalies.html", who=who, anomalies=rows, show=show)

    @app.post(f"{PREFIX}/anomalies/{{anomaly_id}}/resolve", include_in_schema=False)
    async def resolve_form(request: Request, anomaly_id: uuid.UUID) -> Response:
        who = signed_in(request, "operator")
        if isinstance(who, Response):
            return who
        fields = await form(request)
        if not csrf_ok(request, fields):
            return refused(request, who)
        try:
            await actions.resolve_anomaly(state_of(request), who, anomaly_id)
        except ApiError as exc:
            return go("/anomalies", f"Not resolved: {exc.problem.detail}")
        return go("/anomalies", f"Resolved {anomaly_id}.")

    @app.get(f"{PREFIX}/accuracy", include_in_schema=False)
    async def accuracy_page(request: Request) -> Response:
        who = signed_in(request, "reader")
        if isinstance(who, Response):
            return who
        rows = await scoring.accuracy_report(state_of(request).pool)
        return page(request, "accuracy.html", who=who, rows=[dict(r) for r in rows])


def _date(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None
