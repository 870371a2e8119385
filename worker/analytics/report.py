"""Read-side queries for operators: what has eglo done."""

from __future__ import annotations

import asyncpg

_SUMMARY = """
SELECT r.request_type, r.status, count(*) AS runs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag.s) AS p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag.s) AS p95_s,
       coalesce(sum(m.quantum_cost_usd), 0) AS cost_usd
FROM optimization_runs r
LEFT JOIN qnn_execution_metrics m ON m.optimization_run_id = r.id
CROSS JOIN LATERAL (SELECT extract(epoch FROM r.created_at - r.published_at) AS s) AS lag
WHERE r.request_id LIKE $1
GROUP BY r.request_type, r.status
ORDER BY r.request_type, r.status
"""


async def summary(
    conn: asyncpg.Connection | asyncpg.Pool, request_id_prefix: str = ""
) -> list[asyncpg.Record]:
    """Runs per type and status, publish→stored latency and QNN cost."""
    return list(await conn.fetch(_SUMMARY, request_id_prefix.replace("%", r"\%") + "%"))


def format_summary(rows: list[asyncpg.Record]) -> str:
    header = (
        f"{'type':<12} {'status':<10} {'runs':>6} {'p50 ms':>8} {'p95 ms':>8} {'QNN cost $':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        p50 = f"{r['p50_s'] * 1000:.0f}" if r["p50_s"] is not None else "-"
        p95 = f"{r['p95_s'] * 1000:.0f}" if r["p95_s"] is not None else "-"
        lines.append(
            f"{r['request_type']:<12} {r['status']:<10} {r['runs']:>6} {p50:>8} "
            f"{p95:>8} {r['cost_usd']:>11.4f}"
        )
    total = sum(r["runs"] for r in rows)
    lines.append(f"{'total':<23} {total:>6}")
    return "\n".join(lines)
