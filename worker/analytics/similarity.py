"""Similar past runs: nearest neighbours of a run's scenario embedding, through the HNSW indexes.

Each model's partial index (db/migrations/0002_embeddings.sql) is only used when the query repeats
its expression `embedding::vector(N)`, the cosine operator `<=>` and the predicate `model = '...'`
literally, so the SQL is built per model rather than parameterised on it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

import asyncpg

from worker.embedder.backends import (
    FEATURES_DIMENSIONS,
    FEATURES_MODEL,
    MINILM_DIMENSIONS,
    MINILM_MODEL,
    OPENAI_DIMENSIONS,
    OPENAI_MODEL,
)
from worker.settings import Settings

# Models the migration indexes; any other model is still searchable, exactly (sequential scan).
INDEXED_MODELS: Final = {
    FEATURES_MODEL: FEATURES_DIMENSIONS,
    MINILM_MODEL: MINILM_DIMENSIONS,
    OPENAI_MODEL: OPENAI_DIMENSIONS,
}
# Recall@10 >= 0.95 at 100,000 features-v1 vectors with the type filter (docs/similarity.md).
DEFAULT_EF_SEARCH: Final = 100
_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


class EmbeddingNotFound(LookupError):
    """The run has no embedding of the requested model (unknown run, or not embedded yet)."""


@dataclass(frozen=True, slots=True)
class SimilarRun:
    run_id: uuid.UUID
    request_id: str
    request_type: str
    region: str
    forecast_date: date
    distance: float
    result_payload: dict[str, Any] | None


def _literal(model: str) -> str:
    # The model name is spliced into SQL (partial index predicates need a literal), so it must
    # be a plain identifier-like name; quotes are doubled anyway.
    if not _MODEL_NAME.fullmatch(model):
        raise ValueError(f"not a valid model name: {model!r}")
    return "'" + model.replace("'", "''") + "'"


def distance_expression(dimensions: int, parameter: str = "$1") -> str:
    """The indexed expression's cosine distance to a query vector parameter."""
    d = int(dimensions)
    return f"e.embedding::vector({d}) <=> {parameter}::vector({d})"


def search_sql(model: str, dimensions: int, *, k: int, same_type: bool) -> str:
    """The k runs nearest to $1 (a vector), excluding run $2, of type $3 when same_type.

    The CTE is materialised and re-sorted because an iterative index scan in relaxed order may
    return neighbours slightly out of order. k is inlined: with LIMIT as a parameter a generic
    plan cannot tell that only a few rows are wanted, and may prefer a full sort.
    """
    distance = distance_expression(dimensions)
    type_filter = "AND r.request_type = $3" if same_type else ""
    return f"""
WITH nearest AS MATERIALIZED (
    SELECT e.optimization_run_id AS run_id, {distance} AS distance
    FROM optimization_embeddings e
    JOIN optimization_runs r ON r.id = e.optimization_run_id
    WHERE e.model = {_literal(model)} AND e.optimization_run_id <> $2 {type_filter}
    ORDER BY {distance}
    LIMIT {int(k)}
)
SELECT r.id AS run_id, r.request_id, r.request_type, r.region, r.forecast_date, n.distance,
       r.result_payload
FROM nearest n JOIN optimization_runs r ON r.id = n.run_id
ORDER BY n.distance, r.id
"""


_TARGET = """
SELECT e.dimensions, e.embedding, r.request_type
FROM optimization_embeddings e JOIN optimization_runs r ON r.id = e.optimization_run_id
WHERE e.optimization_run_id = $1 AND e.model = $2
"""


async def configure_search(conn: asyncpg.Connection, *, ef_search: int) -> None:
    """Transaction-local HNSW settings: candidate list size, and iterative scans so that a
    selective filter (the run type) keeps the index scanning instead of returning too few rows."""
    await conn.execute(
        "SELECT set_config('hnsw.ef_search', $1, true),"
        " set_config('hnsw.iterative_scan', 'relaxed_order', true)",
        str(int(ef_search)),
    )


async def similar_runs(
    pool: asyncpg.Pool,
    run_id: uuid.UUID | str,
    *,
    k: int = 5,
    model: str = FEATURES_MODEL,
    same_type: bool = True,
    ef_search: int | None = None,
) -> list[SimilarRun]:
    """The k runs nearest to `run_id` by cosine distance of their `model` embeddings, closest
    first, the run itself excluded; only runs of its request type when same_type."""
    if k < 1:
        raise ValueError("k must be at least 1")
    target_id = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
    _literal(model)
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await configure_search(conn, ef_search=ef_search or max(DEFAULT_EF_SEARCH, 2 * k))
        target = await conn.fetchrow(_TARGET, target_id, model)
        if target is None:
            raise EmbeddingNotFound(f"run {target_id} has no {model} embedding")
        args: list[Any] = [target["embedding"], target_id]
        if same_type:
            args.append(target["request_type"])
        sql = search_sql(model, target["dimensions"], k=k, same_type=same_type)
        rows = await conn.fetch(sql, *args)
    return [
        SimilarRun(
            run_id=row["run_id"],
            request_id=row["request_id"],
            request_type=row["request_type"],
            region=row["region"],
            forecast_date=row["forecast_date"],
            distance=float(row["distance"]),
            result_payload=row["result_payload"],
        )
        for row in rows
    ]


def _result_summary(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    for key in ("savings", "total_cost", "optimized_cost"):
        if isinstance(result.get(key), int | float):
            return f"{key} {result[key]:,.2f}"
    forecast = result.get("forecast")
    if isinstance(forecast, list) and forecast:
        numbers = [x for x in forecast if isinstance(x, int | float)]
        if numbers:
            return f"forecast {len(forecast)} steps, mean {sum(numbers) / len(numbers):,.1f}"
    scenarios = result.get("scenarios")
    if isinstance(scenarios, list):
        return f"{len(scenarios)} scenarios"
    return ", ".join(sorted(result))[:40]


def format_similar(
    results: Sequence[SimilarRun], *, run_id: uuid.UUID | str | None = None, model: str = ""
) -> str:
    """A plain-text table of similar runs for the terminal."""
    title = "similar runs" + (f" to {run_id}" if run_id else "") + (f" ({model})" if model else "")
    if not results:
        return f"{title}: none found"
    header = ("#", "distance", "run_id", "request_id", "type", "region", "date", "result")
    rows = [
        (
            str(i),
            f"{r.distance:.4f}",
            str(r.run_id),
            r.request_id,
            r.request_type,
            r.region,
            r.forecast_date.isoformat(),
            _result_summary(r.result_payload),
        )
        for i, r in enumerate(results, start=1)
    ]
    widths = [max(len(row[c]) for row in (header, *rows)) for c in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


async def run_similar(
    settings: Settings,
    run_id: str,
    *,
    k: int = 5,
    model: str = FEATURES_MODEL,
    same_type: bool = True,
) -> int:
    """The `eglo similar RUN_ID` entrypoint: prints the table; exit code 1 if there is nothing to
    compare with (bad id, or the run has no embedding of that model)."""
    import sys

    from worker.runtime.connections import database_url, open_pool

    try:
        target = uuid.UUID(run_id)
    except ValueError:
        print(f"not a run id: {run_id!r}", file=sys.stderr)
        return 1
    pool = await open_pool(database_url(settings), size=1)
    try:
        results = await similar_runs(pool, target, k=k, model=model, same_type=same_type)
    except EmbeddingNotFound as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        await pool.close()
    print(format_similar(results, run_id=target, model=model))
    return 0
