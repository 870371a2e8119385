"""Stored days of load (`energy_datasets`): import from CSV/NDJSON and list them (`eglo datasets`).

A request's `dataset_ref` is resolved from them by core/history.py and runtime/history.py.

A dataset row is one region's day: `resolution_minutes` and exactly 1440/resolution load values in
MW starting at 00:00, optionally with aligned temperatures, a price per step and a storage state.

File layouts (one row per region and day; a re-import of the same region and day updates it):

* NDJSON — one object per line:
  ``{"region": "North", "date": "2025-06-01", "resolution_minutes": 60, "loads": [..24 MW..],
  "temperature_c": [..24..], "prices": [..24..], "storage_state": {"soc_kwh": 120}}``
* CSV — a header row naming the columns ``region,date,resolution_minutes,loads`` and any of
  ``temperature_c,prices,storage_state``; list columns hold the whole day in one cell, values
  separated by ``;`` or whitespace (``"210;205.5;199"``); ``storage_state`` is a JSON object.

Stored as: ``historical_loads`` = loads, ``weather_data`` = ``{"temperature_c": [...]}``,
``pricing_schedule`` = ``{"prices": [...]}``, ``storage_state`` = the object.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TextIO

import asyncpg
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from worker.core.history import MINUTES_PER_DAY

RESOLUTIONS: Final = (15, 30, 60)
CHUNK_ROWS: Final = 500  # ~50k floats per statement at 15 minutes: one round trip, small memory
MAX_REPORTED_ERRORS: Final = 1000  # a wholly broken file must not hold every message in memory
REQUIRED_COLUMNS: Final = ("region", "date", "resolution_minutes", "loads")
OPTIONAL_COLUMNS: Final = ("temperature_c", "prices", "storage_state")
LIST_COLUMNS: Final = ("loads", "temperature_c", "prices")
_LIST_SEPARATOR = re.compile(r"[;\s]+")

Format = Literal["auto", "csv", "ndjson"]
Progress = Callable[[int], object]


class DatasetFormatError(ValueError):
    """The file as a whole cannot be read (e.g. a CSV header without the required columns)."""


# --- validation of one row ---------------------------------------------------------------------

NonNegative = Annotated[float, Field(ge=0)]
Temperature = Annotated[float, Field(ge=-80, le=70)]


class DatasetRow(BaseModel):
    """One region's day as a file carries it; field order matters (validators read earlier ones)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True
    )

    region: str = Field(min_length=1, max_length=64)
    day: date = Field(alias="date")
    resolution_minutes: int
    loads: list[NonNegative] = Field(description="MW per step from 00:00.")
    temperature_c: list[Temperature] | None = None
    prices: list[float] | None = Field(default=None, description="Energy price per step.")
    storage_state: dict[str, Any] | None = None

    @field_validator("resolution_minutes")
    @classmethod
    def _known_resolution(cls, value: int) -> int:
        if value not in RESOLUTIONS:
            raise ValueError(f"must be one of 15, 30, 60, not {value}")
        return value

    @field_validator("loads")
    @classmethod
    def _one_day(cls, value: list[float], info: ValidationInfo) -> list[float]:
        resolution = info.data.get("resolution_minutes")
        if resolution is not None:
            expected = MINUTES_PER_DAY // resolution
            if len(value) != expected:
                raise ValueError(
                    f"{len(value)} values; a day at {resolution} minutes has {expected}"
                )
        return value

    @field_validator("temperature_c", "prices")
    @classmethod
    def _aligned(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        loads = info.data.get("loads")
        if value is not None and loads is not None and len(value) != len(loads):
            raise ValueError(f"{len(value)} values, loads has {len(loads)}; one per step")
        return value


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.problem}"


def _row_errors(line: int, exc: ValidationError) -> list[RowError]:
    errors = []
    for err in exc.errors(include_url=False):
        parts = [str(p) for p in err["loc"]]
        where = parts[0] if parts else "(row)"
        for p in parts[1:]:
            where += f"[{p}]" if p.isdigit() else f".{p}"
        problem = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problem = "unknown field"
        errors.append(RowError(line, where, problem))
    return errors


# --- reading files -----------------------------------------------------------------------------

Parsed = tuple[int, DatasetRow | list[RowError]]


def _split_list(cell: str) -> list[str]:
    return [v for v in _LIST_SEPARATOR.split(cell.strip()) if v]


def _parse_csv(lines: Iterable[str]) -> Iterator[Parsed]:
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing or unknown:
        raise DatasetFormatError(
            "line 1: CSV header "
            + "; ".join(
                part
                for part in (
                    f"lacks {', '.join(missing)}" if missing else "",
                    f"has unknown columns {', '.join(unknown)}" if unknown else "",
                )
                if part
            )
            + f" (expected {','.join(REQUIRED_COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}])"
        )
    previous_end = reader.line_num
    for record in reader:
        line, previous_end = previous_end + 1, reader.line_num  # a quoted cell may span lines
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            yield line, [RowError(line, "(row)", f"{len(record)} cells, header has {len(header)}")]
            continue
        doc: dict[str, Any] = {}
        problems: list[RowError] = []
        for name, cell in zip(header, record, strict=True):
            cell = cell.strip()
            if name in LIST_COLUMNS:
                if cell or name == "loads":
                    doc[name] = _split_list(cell)
            elif name == "storage_state":
                if cell:
                    try:
                        doc[name] = orjson.loads(cell)
                    except orjson.JSONDecodeError:
                        problems.append(RowError(line, name, "not valid JSON"))
            else:
                doc[name] = cell
        checked = _validate(line, doc)
        if problems:
            yield line, problems + (checked if isinstance(checked, list) else [])
        else:
            yield line, checked


def _parse_ndjson(lines: Iterable[str]) -> Iterator[Parsed]:
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            yield line, [RowError(line, "(line)", f"invalid JSON: {exc}")]
            continue
        if not isinstance(doc, dict):
            yield line, [RowError(line, "(line)", "not a JSON object")]
            continue
        yield line, _validate(line, doc)


def _validate(line: int, doc: dict[str, Any]) -> DatasetRow | list[RowError]:
    try:
        return DatasetRow.model_validate(doc)
    except ValidationError as exc:
        return _row_errors(line, exc)


@contextlib.contextmanager
def _open_source(
    source: str | Path | TextIO, fmt: Format
) -> Iterator[tuple[Iterable[str], Literal["csv", "ndjson"]]]:
    """The source's lines and its format; a path ending in .gz is read decompressed."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, str | Path):
            path = Path(source)
            if path.suffix == ".gz":
                stream: TextIO = stack.enter_context(
                    gzip.open(path, "rt", encoding="utf-8-sig", newline="")
                )
                suffix = Path(path.stem).suffix
            else:
                stream = stack.enter_context(path.open(encoding="utf-8-sig", newline=""))
                suffix = path.suffix
            if fmt == "auto" and suffix.lower() == ".csv":
                fmt = "csv"
            elif fmt == "auto" and suffix.lower() in (".ndjson", ".jsonl"):
                fmt = "ndjson"
        else:
            stream = source
        lines: Iterable[str] = stream
        if fmt == "auto":
            # No telling suffix (stdin, .txt): an NDJSON file starts with an object.
            first = next(iter(stream), "")
            while first and not first.strip():
                first = next(iter(stream), "")
            fmt = "ndjson" if first.lstrip().startswith("{") else "csv"
            lines = itertools.chain([first], stream)
        yield lines, fmt


# --- writing -----------------------------------------------------------------------------------

_UPSERT = """
INSERT INTO energy_datasets AS e (
    region, data_date, resolution_minutes, historical_loads, weather_data, pricing_schedule,
    storage_state)
SELECT t.region, t.data_date, t.resolution, t.loads::float8[], t.weather::jsonb,
       t.pricing::jsonb, t.storage::jsonb
FROM unnest($1::text[], $2::date[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS t(region, data_date, resolution, loads, weather, pricing, storage)
ON CONFLICT (region, data_date) DO UPDATE SET
    resolution_minutes = EXCLUDED.resolution_minutes,
    historical_loads = EXCLUDED.historical_loads,
    -- A file that omits an optional field keeps the stored one, unless the step grid changed
    -- (then the stored per-step values no longer line up and are dropped).
    weather_data = CASE WHEN EXCLUDED.resolution_minutes = e.resolution_minutes
                        THEN coalesce(EXCLUDED.weather_data, e.weather_data)
                        ELSE EXCLUDED.weather_data END,
    pricing_schedule = CASE WHEN EXCLUDED.resolution_minutes = e.resolution_minutes
                            THEN coalesce(EXCLUDED.pricing_schedule, e.pricing_schedule)
                            ELSE EXCLUDED.pricing_schedule END,
    storage_state = coalesce(EXCLUDED.storage_state, e.storage_state),
    updated_at = now()
-- Re-importing identical data must not bump updated_at: that would make every forecast of
-- those days look stale to scoring and re-score it for nothing.
WHERE e.resolution_minutes IS DISTINCT FROM EXCLUDED.resolution_minutes
   OR e.historical_loads IS DISTINCT FROM EXCLUDED.historical_loads
   OR (EXCLUDED.weather_data IS NOT NULL AND EXCLUDED.weather_data IS DISTINCT FROM e.weather_data)
   OR (EXCLUDED.pricing_schedule IS NOT NULL
       AND EXCLUDED.pricing_schedule IS DISTINCT FROM e.pricing_schedule)
   OR (EXCLUDED.storage_state IS NOT NULL
       AND EXCLUDED.storage_state IS DISTINCT FROM e.storage_state)
RETURNING (xmax = 0) AS inserted, region, data_date
"""


def _pg_array(values: Sequence[float]) -> str:
    # repr() of a float is the shortest string that reads back to the same double.
    return "{" + ",".join(repr(float(v)) for v in values) + "}"


def _json_text(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _columns(rows: Sequence[DatasetRow]) -> list[list[Any]]:
    return [
        [r.region for r in rows],
        [r.day for r in rows],
        [r.resolution_minutes for r in rows],
        [_pg_array(r.loads) for r in rows],
        [_json_text({"temperature_c": r.temperature_c} if r.temperature_c else None) for r in rows],
        [_json_text({"prices": r.prices} if r.prices else None) for r in rows],
        [_json_text(r.storage_state) for r in rows],
    ]


@dataclass
class ImportReport:
    """What an import did. `touched` lists the (region, day)s inserted or changed."""

    rows: int = 0  # data rows read (good and bad)
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0  # already stored with identical values
    superseded: int = 0  # the same region and day again later in the file: the later one wins
    rejected: int = 0
    errors: list[RowError] = field(default_factory=list)
    touched: list[tuple[str, date]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"rows {self.rows}: inserted {self.inserted}, updated {self.updated}, "
            f"unchanged {self.unchanged}, superseded {self.superseded}, rejected {self.rejected}"
        )

    def regions(self) -> dict[str, list[date]]:
        """Touched days per region, for `scoring.score_pending(pool, region=..., dates=...)`."""
        out: dict[str, list[date]] = {}
        for region, day in self.touched:
            out.setdefault(region, []).append(day)
        return {r: sorted(d) for r, d in out.items()}


async def import_datasets(
    pool: asyncpg.Pool | asyncpg.Connection,
    source: str | Path | TextIO,
    *,
    fmt: Format = "auto",
    progress: Progress | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportReport:
    """Validate and upsert every row of a CSV or NDJSON file; bad rows are reported and skipped.

    `source` is a path (`.csv`, `.ndjson`/`.jsonl`, optionally `.gz`) or an open text stream;
    `fmt="auto"` decides by suffix, else by whether the first line is a JSON object.
    `progress(n)` is called after each written chunk with the number of rows just handled, so a
    `tqdm.update` fits. Each chunk commits on its own: an interrupted import keeps what it wrote,
    and re-running it is harmless.
    """
    report = ImportReport()
    pending: dict[tuple[str, date], DatasetRow] = {}
    handled = 0

    async def flush() -> None:
        nonlocal handled
        if pending:
            rows = list(pending.values())
            pending.clear()
            written = await pool.fetch(_UPSERT, *_columns(rows))
            for rec in written:
                if rec["inserted"]:
                    report.inserted += 1
                else:
                    report.updated += 1
                report.touched.append((rec["region"], rec["data_date"]))
            report.unchanged += len(rows) - len(written)
        if progress is not None and handled:
            progress(handled)
        handled = 0

    with _open_source(source, fmt) as (lines, resolved):
        parsed = _parse_csv(lines) if resolved == "csv" else _parse_ndjson(lines)
        for _line, item in parsed:
            report.rows += 1
            handled += 1
            if isinstance(item, list):
                report.rejected += 1
                room = MAX_REPORTED_ERRORS - len(report.errors)
                report.errors.extend(item[: max(room, 0)])
            else:
                key = (item.region, item.day)
                # One statement cannot upsert the same key twice, so the later line wins here.
                if pending.pop(key, None) is not None:
                    report.superseded += 1
                pending[key] = item
                if len(pending) >= chunk_rows:
                    await flush()
        await flush()
    return report


# --- reading back ------------------------------------------------------------------------------

_LIST = """
SELECT region, resolution_minutes, min(data_date) AS first_date, max(data_date) AS last_date,
       count(*)::int AS days,
       (max(data_date) - min(data_date) + 1 - count(*))::int AS missing_days,
       count(*) FILTER (WHERE weather_data ? 'temperature_c')::int AS days_with_temperature,
       count(*) FILTER (WHERE pricing_schedule ? 'prices')::int AS days_with_prices,
       max(updated_at) AS updated_at
FROM energy_datasets
WHERE ($1::text IS NULL OR region = $1)
GROUP BY region, resolution_minutes
ORDER BY region, resolution_minutes
"""


async def list_datasets(
    pool: asyncpg.Pool | asyncpg.Connection, region: str | None = None
) -> list[asyncpg.Record]:
    """Stored periods per region and resolution: first_date, last_date, days, missing_days, ..."""
    return list(await pool.fetch(_LIST, region))


def format_datasets(rows: Sequence[asyncpg.Record] | Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'region':<20} {'from':<10} {'to':<10} {'days':>6} {'gaps':>5} {'res':>4} "
        f"{'temp':>5} {'price':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['region']:<20} {r['first_date']!s:<10} {r['last_date']!s:<10} {r['days']:>6} "
            f"{r['missing_days']:>5} {r['resolution_minutes']:>4} "
            f"{r['days_with_temperature']:>5} {r['days_with_prices']:>5}"
        )
    if not rows:
        lines.append("(no datasets)")
    return "\n".join(lines)


def print_errors(report: ImportReport, stream: TextIO, limit: int = 50) -> None:
    """The first `limit` row errors, one `line N: field: problem` per line (for the CLI)."""
    for err in report.errors[:limit]:
        print(err, file=stream)
    if len(report.errors) > limit or report.rejected > len({e.line for e in report.errors}):
        print(f"(first {limit} errors shown; {report.rejected} rows rejected)", file=stream)


__all__ = [
    "DatasetFormatError",
    "DatasetRow",
    "ImportReport",
    "RowError",
    "format_datasets",
    "import_datasets",
    "list_datasets",
    "print_errors",
]
