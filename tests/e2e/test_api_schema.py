"""The API's OpenAPI 3.1 document fuzzed by schemathesis against the real thing (uvicorn on a
loopback port, the real broker, database, worker and QNN emulator): no 5xx, and every response's
status, content type and body match the document."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support.api_support import OPERATOR, empty_api_tables, serving
from tests.support.harness import make_settings, running_worker

ROOT = Path(__file__).resolve().parents[2]
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


@pytest.fixture
def workdirs(tmp_path: Path) -> Path:
    """Working directories for the two schemathesis runs: their caches (.schemathesis/) go
    there, not into the repository."""
    for name in ("reading", "submitting"):
        (tmp_path / name).mkdir()
    return tmp_path


async def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str, workdirs: Path
) -> None:
    await empty_api_tables(pool)
    # ?wait is bounded at 0.5 s here: fuzzed requests the QNN emulator fails on are retried for
    # seconds, and a wait for each would stall the run.
    settings = make_settings(amqp_url, database_url, emulator, api_max_wait_s=0.5)
    async with running_worker(settings), serving(settings) as base_url:
        # Two runs side by side: the reading and operator routes, and the submitting ones. The
        # coverage phase (boundary and negative values of every keyword: about 500 more cases,
        # 25 s) runs with EGLO_API_FUZZ_FULL=1; the suite's default keeps to ~20 s.
        full = bool(os.environ.get("EGLO_API_FUZZ_FULL"))
        reading, submitting = await asyncio.gather(
            _schemathesis(
                base_url,
                workdirs / "reading",
                "examples,coverage,fuzzing" if full else "examples,fuzzing",
                "--exclude-tag",
                "submit",
                "--max-examples",
                "15",
            ),
            _schemathesis(
                base_url,
                workdirs / "submitting",
                "examples,fuzzing",
                "--include-tag",
                "submit",
                "--max-examples",
                "15",
            ),
        )
    out = ROOT / ".eglo" / "conformance"
    out.mkdir(parents=True, exist_ok=True)
    (out / "schemathesis.txt").write_text(reading[1] + "\n" + submitting[1])
    # One line to read in the log (pytest -s shows it): what was checked.
    print(
        f"\nschemathesis: reading+operator {_summary(reading[1])}; "
        f"submitting {_summary(submitting[1])}"
    )
    assert reading[0] == 0, reading[1][-6000:]
    assert submitting[0] == 0, submitting[1][-6000:]


def _summary(output: str) -> str:
    """`12/16 operations tested, 138 cases generated, 138 passed` from a run's SUMMARY."""
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    cases = re.search(r"Test cases:\s*\n\s*(.+)", output)
    operations = (
        f"{tested.group(1)} of {selected.group(2)} operations tested"
        if selected and tested
        else "operations: ?"
    )
    return f"{operations}, cases: {cases.group(1).strip() if cases else '?'}"


async def _schemathesis(
    base_url: str, workdir: Path, phases: str, *selection: str
) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{base_url}/openapi.json",
        *selection,
        "--checks",
        ",".join(CHECKS),
        "--header",
        f"Authorization: Bearer {OPERATOR}",
        "--phases",
        phases,
        "--seed",
        "14",
        "--generation-database",
        "none",
        "--request-timeout",
        "15",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=workdir,
    )
    output, _ = await process.communicate()
    return process.returncode, output.decode(errors="replace")
