"""`eglo demo --serve` (what `make demo` runs) against the real broker and database: it starts the
emulator, worker, embedder and `eglo api`, prints the console's URL with the local operator token,
keeps the console up after the summary, and stops every process on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from worker.ops.demo import local_tokens_file
from worker.ops.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_the_console_until_stopped(
    amqp_url: str, database_url: str, tmp_path: Path
) -> None:
    api_port = free_port()
    env = {
        **os.environ,
        "EGLO_AMQP_URL": amqp_url,
        "EGLO_DATABASE_URL": database_url,
        "EGLO_DATA_DIR": str(tmp_path),
        "EGLO_API_PORT": str(api_port),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("EGLO_API_TOKENS_FILE", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo", "--count", "8", "--serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,  # the local tokens are found beside the code, not in the working directory
    )
    assert demo.stdout is not None
    output: list[str] = []
    try:
        for line in demo.stdout:  # until the console is up after the summary
            output.append(line)
            if line.startswith("serving the console until Ctrl-C"):
                break
        text = "".join(output)
        assert demo.poll() is None, text
        url = f"http://127.0.0.1:{api_port}"
        assert f"console: {url}/console/  (sign in with the token " in text, text
        assert "8 of 8 requests stored" in text, text
        tokens = local_tokens_file()
        assert tokens is not None
        operator = next(
            line.split()[2]
            for line in tokens.read_text().splitlines()
            if line and not line.startswith("#") and line.split()[1] == "operator"
        )
        assert f"sign in with the token {operator})" in text

        # After the summary the console and API still answer, with the demo's runs.
        login = httpx.get(f"{url}/console/login", timeout=10)
        assert login.status_code == 200 and "<form" in login.text
        runs = httpx.get(
            f"{url}/runs",
            params={"limit": 50},
            headers={"Authorization": f"Bearer {operator}"},
            timeout=10,
        )
        assert runs.status_code == 200, runs.text
        demo_runs = [r for r in runs.json()["items"] if r["request_id"].startswith("demo-")]
        assert len(demo_runs) == 8
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, "".join(output) + rest
    assert "worker exited with 0 after SIGTERM" in rest
    # Every child is gone: nothing answers on the API's port any more.
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("eglo api still answers after the demo stopped")
