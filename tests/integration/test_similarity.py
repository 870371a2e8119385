"""Similar-run search: the per-model HNSW indexes, their use by the query, and the results."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from db.pool import create_pool
from producers.sample import generate_requests
from tests.support.embeddings import perturbed
from tests.support.runs import insert_runs
from worker.analytics.similarity import (
    INDEXED_MODELS,
    EmbeddingNotFound,
    SimilarRun,
    configure_search,
    format_similar,
    search_sql,
    similar_runs,
)
from worker.embedder.backends import FeaturesEmbedder

INDEX_NAMES = {
    "features-v1": "optimization_embeddings_features_v1_hnsw",
    "all-MiniLM-L6-v2": "optimization_embeddings_minilm_hnsw",
    "text-embedding-3-small": "optimization_embeddings_openai_hnsw",
}
MIGRATION = Path(__file__).resolve().parents[2] / "db" / "migrations" / "0002_embeddings.sql"


async def store_vectors(
    pool: asyncpg.Pool, run_ids: list[uuid.UUID], vectors: np.ndarray, model: str = "features-v1"
) -> None:
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "optimization_embeddings",
            records=[
                (i, model, vectors.shape[1], v) for i, v in zip(run_ids, vectors, strict=True)
            ],
            columns=["optimization_run_id", "model", "dimensions", "embedding"],
        )


async def random_runs(pool: asyncpg.Pool, types: list[str]) -> list[uuid.UUID]:
    """Bare runs of the given types (one each), for tests that only need their ids and type."""
    ids = [uuid.uuid4() for _ in types]
    await pool.executemany(
        """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
               input_payload, request_fingerprint, result_payload)
           VALUES ($1, $2, $3, 'Texas', $4, '{}', 'fp', '{}')""",
        [(i, f"bare-{i}", t, date(2024, 6, 1)) for i, t in zip(ids, types, strict=True)],
    )
    return ids


def unit_rows(rng: np.random.Generator, n: int, dimensions: int) -> np.ndarray:
    v = rng.normal(size=(n, dimensions))
    return v / np.linalg.norm(v, axis=1, keepdims=True)  # type: ignore[no-any-return]


async def test_migration_creates_one_partial_hnsw_index_per_model(pool: asyncpg.Pool) -> None:
    """0002 is recorded, each model has an HNSW index cast to its dimension, and re-running the
    file changes nothing."""
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE version = '0002_embeddings'"
        )
        == 1
    )
    rows = await pool.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'optimization_embeddings'"
    )
    definitions = {r["indexname"]: r["indexdef"] for r in rows}
    for model, name in INDEX_NAMES.items():
        definition = definitions[name]
        assert "USING hnsw" in definition
        assert f"vector({INDEXED_MODELS[model]})" in definition
        assert "vector_cosine_ops" in definition
        assert f"WHERE (model = '{model}'::text)" in definition
    await pool.execute(MIGRATION.read_text())
    after = await pool.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'optimization_embeddings'"
    )
    assert {r["indexname"] for r in after} == set(definitions)


@pytest.mark.parametrize("model", sorted(INDEX_NAMES))
async def test_search_query_uses_the_models_index(pool: asyncpg.Pool, model: str) -> None:
    """The query matches the model's own HNSW index: with sequential scans and sorts ruled out
    (200 rows are too few for the planner to want it), the plan scans that index."""
    dimensions = INDEXED_MODELS[model]
    rng = np.random.default_rng(1)
    run_ids = await random_runs(pool, ["forecast", "storage", "grid_switch", "simulation"] * 50)
    await store_vectors(pool, run_ids, unit_rows(rng, len(run_ids), dimensions), model)
    await pool.execute("ANALYZE optimization_runs, optimization_embeddings")
    query = unit_rows(rng, 1, dimensions)[0]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_sort = off")
        await configure_search(conn, ef_search=100)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN " + search_sql(model, dimensions, k=5, same_type=True),
                query,
                uuid.uuid4(),
                "forecast",
            )
        )
    assert f"Index Scan using {INDEX_NAMES[model]}" in plan, plan


async def test_planner_picks_the_index_on_its_own_with_enough_rows(pool: asyncpg.Pool) -> None:
    """At 5,000 stored vectors the planner prefers the HNSW index without being pushed."""
    rng = np.random.default_rng(2)
    types = ["forecast", "storage", "grid_switch", "simulation"] * 1250
    run_ids = await random_runs(pool, types)
    await store_vectors(pool, run_ids, unit_rows(rng, len(run_ids), 64))
    await pool.execute("ANALYZE optimization_runs, optimization_embeddings")
    async with pool.acquire() as conn, conn.transaction():
        await configure_search(conn, ef_search=100)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN " + search_sql("features-v1", 64, k=5, same_type=True),
                unit_rows(rng, 1, 64)[0],
                run_ids[0],
                "forecast",
            )
        )
    assert "Index Scan using optimization_embeddings_features_v1_hnsw" in plan, plan


async def test_similar_runs_are_nearest_of_the_same_type(pool: asyncpg.Pool) -> None:
    """The re-measured twin comes first, only the run's type is returned, itself excluded,
    distances ascending and equal to the cosine distances numpy computes."""
    requests = generate_requests(80, seed=31)
    target = next(r for r in requests if r["request_type"] == "storage")
    twin = perturbed(target, random.Random(1))
    everything = [*requests, twin]
    run_ids = await insert_runs(pool, everything)
    vectors = FeaturesEmbedder().embed_array(everything)
    await store_vectors(pool, run_ids, vectors)
    target_id = run_ids[requests.index(target)]

    results = await similar_runs(pool, target_id, k=5)

    assert len(results) == 5
    assert results[0].run_id == run_ids[-1]
    assert results[0].request_id == twin["request_id"]
    assert {r.request_type for r in results} == {"storage"}
    assert target_id not in {r.run_id for r in results}
    distances = [r.distance for r in results]
    assert distances == sorted(distances)
    index = {run_id: i for i, run_id in enumerate(run_ids)}
    t = vectors[requests.index(target)]
    storage = [i for i, r in enumerate(everything) if r["request_type"] == "storage"]
    exact = sorted(
        (1.0 - float(vectors[i] @ t), run_ids[i]) for i in storage if i != index[target_id]
    )
    assert [r.run_id for r in results] == [run_id for _, run_id in exact[:5]]
    np.testing.assert_allclose(distances, [d for d, _ in exact[:5]], atol=1e-5)
    assert results[0].result_payload == {"ok": True}
    assert results[0].region == target["region"]


async def test_any_type_when_not_same_type(pool: asyncpg.Pool) -> None:
    """same_type=False searches every run of the model."""
    rng = np.random.default_rng(3)
    run_ids = await random_runs(pool, ["forecast", "storage", "grid_switch", "simulation"] * 5)
    await store_vectors(pool, run_ids, unit_rows(rng, len(run_ids), 64))
    results = await similar_runs(pool, run_ids[0], k=19, same_type=False)
    assert {r.run_id for r in results} == set(run_ids[1:])
    assert {r.request_type for r in results} == {"forecast", "storage", "grid_switch", "simulation"}


@pytest.fixture
async def index_only_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose planner never scans sequentially, so small tables still go through HNSW."""
    pool = await create_pool(database_url, size=2, server_settings={"enable_seqscan": "off"})
    yield pool
    await pool.close()


async def test_type_filter_does_not_starve_results(
    pool: asyncpg.Pool, index_only_pool: asyncpg.Pool
) -> None:
    """300 runs of another type nearer than every same-type run still leave k results, thanks to
    the iterative index scan; without it the first ef_search candidates are all filtered out."""
    rng = np.random.default_rng(4)
    base = unit_rows(rng, 1, 64)[0]
    near = base + 0.05 * rng.normal(size=(300, 64))
    far = base + 0.6 * rng.normal(size=(6, 64))
    vectors = np.vstack([base, near, far])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    run_ids = await random_runs(pool, ["forecast"] + ["storage"] * 300 + ["forecast"] * 6)
    await store_vectors(pool, run_ids, vectors)

    results = await similar_runs(index_only_pool, run_ids[0], k=5, ef_search=10)
    assert len(results) == 5
    assert {r.request_type for r in results} == {"forecast"}

    async with index_only_pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL hnsw.ef_search = 10")
        await conn.execute("SET LOCAL hnsw.iterative_scan = off")
        starved = await conn.fetch(
            search_sql("features-v1", 64, k=5, same_type=True), base, run_ids[0], "forecast"
        )
    assert len(starved) < 5


async def test_run_without_embedding_raises(pool: asyncpg.Pool) -> None:
    """Asking about a run that has no embedding of the model is EmbeddingNotFound."""
    [run_id] = await random_runs(pool, ["forecast"])
    with pytest.raises(EmbeddingNotFound, match=str(run_id)):
        await similar_runs(pool, run_id)
    with pytest.raises(EmbeddingNotFound):
        await similar_runs(pool, uuid.uuid4(), model="all-MiniLM-L6-v2")


async def test_model_names_are_checked_before_reaching_sql(pool: asyncpg.Pool) -> None:
    """The model name is spliced into the SQL, so anything but a plain name is refused."""
    with pytest.raises(ValueError, match="model name"):
        await similar_runs(pool, uuid.uuid4(), model="x' OR '1'='1")


def test_format_similar_is_a_table() -> None:
    """One header and one aligned line per run, closest first; a clear line when empty."""
    run = SimilarRun(
        run_id=uuid.UUID(int=1),
        request_id="sample-1-000004",
        request_type="storage",
        region="Texas",
        forecast_date=date(2024, 7, 1),
        distance=0.01234,
        result_payload={"savings": 1234.5},
    )
    text = format_similar([run], run_id=uuid.UUID(int=2), model="features-v1")
    lines = text.splitlines()
    assert lines[0] == f"similar runs to {uuid.UUID(int=2)} (features-v1)"
    assert lines[1].split() == [
        "#",
        "distance",
        "run_id",
        "request_id",
        "type",
        "region",
        "date",
        "result",
    ]
    assert lines[2].split()[:7] == [
        "1",
        "0.0123",
        str(uuid.UUID(int=1)),
        "sample-1-000004",
        "storage",
        "Texas",
        "2024-07-01",
    ]
    assert "savings 1,234.50" in lines[2]
    assert format_similar([]) == "similar runs: none found"
