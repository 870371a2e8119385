"""A Node client that knows only the published contract, against the real worker and broker.

tests/node/conformance.mjs reads README's message contract, docs/asyncapi.yaml and
docs/schemas/*.json at run time, publishes valid, invalid and duplicate requests, and checks
every event and reply it gets with Ajv (strict) and against the AMQP properties the AsyncAPI
document promises. It prints one JSON summary line; this test judges it.
Needs `npm ci --prefix tests/node` once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.harness import make_settings, running_worker, save_figures

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
SCRIPT = NODE_DIR / "conformance.mjs"
COUNT = 5
TIMEOUT_S = 30


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node 20+ to run the conformance client")
    for package in ("amqplib", "ajv", "ajv-formats", "yaml"):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            pytest.fail(
                f"tests/node/node_modules/{package} is missing: run `npm ci --prefix tests/node`"
            )
    return node


async def _run_client(amqp_url: str, out_dir: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "EGLO_AMQP_URL": amqp_url,
        "REPO_ROOT": str(ROOT),
        "OUT_DIR": str(out_dir),
        "COUNT": str(COUNT),
        "TIMEOUT_S": str(TIMEOUT_S),
    }
    proc = await asyncio.create_subprocess_exec(
        _node(),
        str(SCRIPT),
        env=env,
        cwd=str(NODE_DIR),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=TIMEOUT_S + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the conformance client did not finish in time")
    err = stderr.decode(errors="replace")
    out = stdout.decode(errors="replace")
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 0, f"conformance client crashed ({proc.returncode}):\n{err}\n{out}"
    assert len(lines) == 1, f"expected one summary line, got {lines!r}\n{err}"
    summary: dict[str, Any] = json.loads(lines[0])
    print(json.dumps(summary, indent=2))  # shown with -s, or on failure
    save_figures("node", summary)
    return summary


async def test_node_client_conforms(
    amqp_url: str, database_url: str, emulator: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Every valid request gets one outcome, every reply_to one reply, and all of it per spec."""
    _node()  # fail fast, before starting anything, when node_modules is missing
    async with running_worker(make_settings(amqp_url, database_url, emulator)):
        s = await _run_client(amqp_url, tmp_path / "received")

    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    assert s["fatal"] is None, s["fatal"]
    assert any((tmp_path / "received").iterdir()), "the client wrote no received messages"
    types = ("forecast", "storage", "grid_switch", "simulation")
    check(s["published"] == dict.fromkeys(types, COUNT), f"published {s['published']}")
    check(s["publish_confirms"]["nacked"] == 0, f"confirms {s['publish_confirms']}")
    check(s["returned_unroutable"] == 0, f"{s['returned_unroutable']} requests were unroutable")
    check(
        s["request_self_check"]["valid_rejected"] == 0,
        f"the client's own requests break the schema: {s['request_self_check']['errors']}",
    )
    # Outcomes: one per valid request, with the status its deadline calls for.
    check(
        s["valid_with_outcome"] == s["valid_requests"] == 4 * COUNT,
        f"{s['valid_with_outcome']}/{s['valid_requests']} valid requests got an outcome event "
        f"(missing {s['missing_outcomes']})",
    )
    check(s["outcome_events"]["expired"] == s["expected_expired"], f"{s['outcome_events']}")
    check(not s["status_mismatches"], f"status mismatches {s['status_mismatches']}")
    check(
        not s["requests_with_several_outcomes"],
        f"several outcomes for {s['requests_with_several_outcomes']}",
    )
    # Replies: exactly one per reply_to request, whatever happened to it.
    check(
        not s["missing_replies"],
        f"{s['missing_replies_count']} of {s['reply_to_requests']} reply_to requests got no "
        f"reply: {s['missing_replies']}",
    )
    check(s["extra_replies"] == 0, f"{s['extra_replies']} requests got more than one reply")
    check(s["uncorrelated_replies"] == 0, f"{s['uncorrelated_replies']} replies matched nothing")
    for case, seen in s["invalid_cases"].items():
        check(
            seen["reply"] == "dead_lettered" and seen["reason"] == seen["expected_reason"],
            f"invalid request {case}: expected a dead_lettered reply ({seen['expected_reason']}), "
            f"got {seen}",
        )
    dup = s["duplicate_case"] or {}
    check(
        dup.get("reply") == "duplicate" and dup.get("same_body_as_original_outcome") is True,
        f"duplicate request: expected the original outcome again, got {dup}",
    )
    # Schemas and properties.
    check(
        s["ajv"]["compile_failures"] == 0,
        f"{s['ajv']['compile_failures']} schemas do not compile under strict Ajv: "
        f"{s['ajv']['compile_errors']}",
    )
    check(
        s["ajv"]["failed"] == 0,
        f"{s['ajv']['failed']}/{s['ajv']['failed'] + s['ajv']['validated']} messages fail "
        f"their schema: {s['ajv']['errors']}",
    )
    check(
        s["property_failures"] == 0,
        f"{s['property_failures']} AMQP property checks failed "
        f"{s['property_failures_by_check']}: {s['property_errors']}",
    )
    check(s["consistency_failures"] == 0, f"inconsistent events: {s['consistency_errors']}")
    check(not s["timed_out"], "the client timed out waiting for outcomes and replies")
    assert not problems, "the worker breaks its published contract:\n- " + "\n- ".join(problems)
