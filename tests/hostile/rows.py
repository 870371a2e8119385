"""Rows of the hostile-world table (docs/reliability.md), written by the suite's tests.

Each test records what it sent and what eglo did; `python -m tests.hostile.rows` prints the
table of the last run from .eglo/hostile/rows.jsonl.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROWS = Path(__file__).resolve().parents[2] / ".eglo" / "hostile" / "rows.jsonl"


@dataclass(frozen=True)
class Row:
    attack: str  # what was sent or broken, e.g. "429 with Retry-After: NaN"
    eglo_did: str  # what eglo did about it, in a few words
    peak_rss_mb: float | None  # the worker's peak RSS during the attack, if measured
    lost: int  # requests lost (must be 0)
    dead_lettered: int  # requests dead-lettered
    ready_again_s: float | None  # seconds until /readyz was 200 again, if it went 503
    before: str = ""  # the same attack against main before the fix, when measured


def record(row: Row) -> None:
    """Replace this attack's row (a rerun overwrites it)."""
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in _read() if r["attack"] != row.attack]
    rows.append(asdict(row))
    ROWS.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read() -> list[dict[str, object]]:
    if not ROWS.exists():
        return []
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def table() -> str:
    head = (
        "| attack | eglo did | peak RSS MB | lost | dead-lettered | ready again s | before |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        "| "
        + " | ".join(
            _cell(r.get(k))
            for k in (
                "attack",
                "eglo_did",
                "peak_rss_mb",
                "lost",
                "dead_lettered",
                "ready_again_s",
                "before",
            )
        )
        + " |\n"
        for r in sorted(_read(), key=lambda r: str(r["attack"]))
    )
    return head + body


if __name__ == "__main__":
    sys.stdout.write(table())
