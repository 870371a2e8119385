"""Recall and latency of the features-v1 HNSW search against exact search (not a test).

    python -m benchmarks.similarity_recall --n 100000

Builds a scratch database on the configured server (EGLO_DATABASE_URL, else the embedded one),
applies the migrations, stores `--n` runs with features-v1 embeddings of varied synthetic
scenarios (perturbations of `producers.sample` requests), builds the HNSW index, then runs
`worker.analytics.similarity.similar_runs` for `--queries` runs at each `--ef-search` and
compares its
top-k with the exact top-k (numpy over the same float32 vectors, checked against a brute-force
SQL scan). The scratch database is dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import numpy.typing as npt

from db.migrate import migrate
from db.pool import connect, create_pool
from producers.sample import generate_requests
from worker.analytics.similarity import search_sql, similar_runs
from worker.embedder.backends import FEATURES_MODEL, FeaturesEmbedder, MiniLMEmbedder, scenario_core
from worker.runtime.connections import database_url
from worker.settings import Settings

INDEX = "optimization_embeddings_features_v1_hnsw"
PROFILE_KEYS = {
    "forecast": "historical_loads",
    "storage": "price_schedule",
    "grid_switch": "load_forecast",
}
_STORAGE_SIZES = ("capacity_kwh", "max_charge_kw", "max_discharge_kw", "soc_initial_kwh")
_STORAGE_SIZES_2 = ("soc_min_kwh", "soc_max_kwh")


def variant(base: Mapping[str, Any], rng: np.random.Generator, index: int) -> dict[str, Any]:
    """Another plausible scenario near `base`: level, noise, timing, size, date and mix varied."""
    request_type = str(base["request_type"])
    payload = dict(base["payload"])
    core_type, _ = scenario_core(base)
    if request_type == "simulation":
        parent = dict(payload["base"])
        core = dict(parent["payload"])
    else:
        core = payload
    key = PROFILE_KEYS[core_type]
    series = np.asarray(core[key], dtype=np.float64)
    series = series * rng.uniform(0.8, 1.25) * (1.0 + rng.normal(0.0, 0.03, series.size))
    series = np.roll(series, int(rng.integers(-2, 3)))
    core[key] = series if core_type == "storage" else np.maximum(series, 0.0)
    if core_type == "storage":
        size = rng.uniform(0.5, 2.0)
        for field in (*_STORAGE_SIZES, *_STORAGE_SIZES_2):
            core[field] = float(core.get(field, 0.0)) * size
        if core.get("load_forecast"):
            core["load_forecast"] = np.asarray(core["load_forecast"]) * size
    elif core_type == "grid_switch":
        core["sources"] = [
            {**s, "capacity_kw": float(s["capacity_kw"]) * rng.uniform(0.6, 1.4)}
            for s in core["sources"]
        ]
    if request_type == "simulation":
        parent["payload"] = core
        payload["base"] = parent
        payload["scenarios"] = [
            {
                **s,
                "load_scale": float(s.get("load_scale", 1.0)) * rng.uniform(0.95, 1.05),
                "price_scale": float(s.get("price_scale", 1.0)) * rng.uniform(0.95, 1.05),
            }
            for s in payload["scenarios"]
        ]
    day = date.fromisoformat(str(base["forecast_date"])) + timedelta(
        days=int(rng.integers(-90, 91))
    )
    return {
        **base,
        "request_id": f"bench-{index:07d}",
        "forecast_date": day.isoformat(),
        "payload": payload,
    }


def exact_top_k(
    vectors: npt.NDArray[np.float32],
    types: npt.NDArray[np.str_],
    query: int,
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Indices and cosine distances of the k nearest of the same type, the query excluded."""
    candidates = np.flatnonzero(types == types[query])
    candidates = candidates[candidates != query]
    q = vectors[query].astype(np.float64)
    block = vectors[candidates].astype(np.float64)
    cosine = block @ q / (np.linalg.norm(block, axis=1) * np.linalg.norm(q))
    distance = 1.0 - cosine
    order = np.argsort(distance, kind="stable")[:k]
    return candidates[order], distance[order]


async def insert_runs(
    conn: asyncpg.Connection, run_ids: list[uuid.UUID], scenarios: list[dict[str, Any]]
) -> None:
    # Payloads are not stored: the search reads vectors and run columns only.
    for start in range(0, len(run_ids), 20_000):
        chunk = scenarios[start : start + 20_000]
        await conn.execute(
            """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
                   input_payload, request_fingerprint, result_payload)
               SELECT id, request_id, request_type, region, forecast_date, '{}', 'bench', '{}'
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::date[])
                    AS t(id, request_id, request_type, region, forecast_date)""",
            run_ids[start : start + 20_000],
            [s["request_id"] for s in chunk],
            [s["request_type"] for s in chunk],
            [s["region"] for s in chunk],
            [date.fromisoformat(s["forecast_date"]) for s in chunk],
        )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    server = args.database_url or database_url(Settings())
    scratch = f"eglo_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{scratch}"')
    # Same server, other database; keeps query parameters such as a socket directory.
    url = urlunsplit(urlsplit(server)._replace(path=f"/{scratch}"))
    print(f"scratch database {scratch}")
    try:
        return await _benchmark(args, url, started)
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        await admin.close()


async def _benchmark(args: argparse.Namespace, url: str, started: float) -> int:
    conn = await connect(url)
    await migrate(conn)
    await conn.close()
    conn = await connect(url)  # again, now that the vector type exists for the codec

    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    bases = generate_requests(min(args.bases, args.n), args.seed, id_prefix="base")
    scenarios = [variant(bases[i % len(bases)], rng, i) for i in range(args.n)]
    generated_s = time.perf_counter() - t

    embedder = FeaturesEmbedder()
    t = time.perf_counter()
    vectors = embedder.embed_array(scenarios).astype(np.float32)
    embed_s = time.perf_counter() - t
    if args.vectors == "random":
        # Control: isotropic unit vectors have no structure, the hardest case for HNSW.
        noise = rng.normal(size=vectors.shape)
        vectors = (noise / np.linalg.norm(noise, axis=1, keepdims=True)).astype(np.float32)
        print("replacing the embeddings with random unit vectors (--vectors random)")
    print(
        f"{args.n} scenarios from {len(bases)} sample requests in {generated_s:.1f} s; "
        f"features-v1 embedded them in {embed_s:.2f} s ({args.n / embed_s:,.0f} per second)"
    )
    if args.minilm and MiniLMEmbedder.available():
        minilm = MiniLMEmbedder()
        await minilm.embed(scenarios[:64])  # model load and first-batch set-up, not counted
        t = time.perf_counter()
        await minilm.embed(scenarios[: args.minilm])
        took = time.perf_counter() - t
        print(
            f"all-MiniLM-L6-v2 embedded {args.minilm} in {took:.2f} s ({args.minilm / took:,.0f}/s)"
        )

    run_ids = [uuid.uuid4() for _ in scenarios]
    types = np.array([s["request_type"] for s in scenarios])
    t = time.perf_counter()
    await insert_runs(conn, run_ids, scenarios)
    # Bulk loads go faster into a table without the index; it is built once afterwards.
    await conn.execute(f"DROP INDEX IF EXISTS {INDEX}")
    await conn.copy_records_to_table(
        "optimization_embeddings",
        records=[
            (run_id, FEATURES_MODEL, embedder.dimensions, v)
            for run_id, v in zip(run_ids, vectors, strict=True)
        ],
        columns=["optimization_run_id", "model", "dimensions", "embedding"],
    )
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    await conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
    await conn.execute(
        f"""CREATE INDEX {INDEX} ON optimization_embeddings
            USING hnsw ((embedding::vector(64)) vector_cosine_ops)
            WITH (m = {int(args.m)}, ef_construction = {int(args.ef_construction)})
            WHERE model = '{FEATURES_MODEL}'"""
    )
    build_s = time.perf_counter() - t
    await conn.execute("ANALYZE optimization_runs, optimization_embeddings")
    size = await conn.fetchval(f"SELECT pg_size_pretty(pg_relation_size('{INDEX}'))")
    print(
        f"stored {args.n} runs and vectors in {load_s:.1f} s; HNSW (m={args.m}, "
        f"ef_construction={args.ef_construction}) built in {build_s:.1f} s, {size}"
    )

    queries = rng.choice(args.n, size=args.queries, replace=False)
    truth = {int(q): exact_top_k(vectors, types, int(q), args.k) for q in queries}

    # The numpy ground truth must be what Postgres itself finds without the index.
    exact_ms: list[float] = []
    for q in queries[:10]:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            t = time.perf_counter()
            rows = await conn.fetch(
                search_sql(FEATURES_MODEL, 64, k=args.k, same_type=True),
                vectors[q],
                run_ids[q],
                str(types[q]),
            )
            exact_ms.append((time.perf_counter() - t) * 1000)
        expected_d = truth[int(q)][1]
        got_d = np.array([r["distance"] for r in rows])
        if not np.allclose(got_d, expected_d, atol=1e-5):
            print(f"ground truth mismatch for query {q}", file=sys.stderr)
            return 1
    print(
        "exact search (sequential scan) agrees with numpy; "
        f"median {statistics.median(exact_ms):.1f} ms per query"
    )

    pool = await create_pool(url, size=2)
    print(f"\n| ef_search | recall@{args.k} | min recall | median ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    results: list[tuple[int, float, float, float]] = []
    try:
        for q in queries[:20]:  # warm the cache and the prepared statements
            await similar_runs(pool, run_ids[q], k=args.k)
        for ef in args.ef_search:
            recalls: list[float] = []
            latencies: list[float] = []
            for q in queries:
                t = time.perf_counter()
                found = await similar_runs(pool, run_ids[q], k=args.k, ef_search=ef)
                latencies.append((time.perf_counter() - t) * 1000)
                _, distances = truth[int(q)]
                # Tie-aware: a neighbour as near as the k-th exact one counts as a hit.
                cutoff = distances[-1] + 1e-6
                hits = sum(1 for r in found if r.distance <= cutoff)
                recalls.append(min(hits, args.k) / args.k)
            recall = float(np.mean(recalls))
            p50, p99 = statistics.median(latencies), percentile(latencies, 99)
            results.append((ef, recall, p50, p99))
            print(f"| {ef} | {recall:.4f} | {min(recalls):.1f} | {p50:.2f} | {p99:.2f} |")
    finally:
        await pool.close()
        await conn.close()
    print(f"\n{args.queries} queries per row, k={args.k}, same request type, run itself excluded.")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.similarity_recall", description=__doc__)
    p.add_argument("--n", type=int, default=100_000, help="runs (vectors) to store")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--ef-search",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[20, 40, 64, 100, 200],
        help="comma-separated hnsw.ef_search values to measure",
    )
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--bases", type=int, default=4000, help="sample requests to vary")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--maintenance-work-mem", default="512MB")
    p.add_argument("--minilm", type=int, default=0, help="also time MiniLM on this many")
    p.add_argument(
        "--vectors",
        choices=("features", "random"),
        default="features",
        help="features-v1 of the scenarios, or random unit vectors as a hard control",
    )
    p.add_argument("--database-url", help="server to create the scratch database on")
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
