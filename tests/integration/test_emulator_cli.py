"""The emulator's command line: options, settings precedence, and a real serve/SIGTERM cycle."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from contracts.qnn import HEALTH_PATH, PREDICT_PATH
from qnn_emulator.cli import add_arguments, run, settings_from_args
from qnn_emulator.samples import grid_switch_request, predict_body

ROOT = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_options_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given options win over EGLO_EMULATOR_*, which win over the defaults."""
    monkeypatch.setenv("EGLO_EMULATOR_ERROR_RATE", "0.3")
    monkeypatch.setenv("EGLO_EMULATOR_PORT", "9100")
    args = _parse(
        "--throttle-rate",
        "0.1",
        "--retry-after-s",
        "4",
        "--seed",
        "7",
        "--api-key",
        "k",
        "--port",
        "0",
        "--hang-s",
        "1.5",
    )
    settings = settings_from_args(args)
    assert (settings.error_rate, settings.throttle_rate, settings.retry_after_s) == (0.3, 0.1, 4)
    assert (settings.seed, settings.port, settings.hang_s, settings.host) == (
        7,
        0,
        1.5,
        "127.0.0.1",
    )
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"


def test_defaults() -> None:
    """Unset options leave the documented defaults."""
    args = _parse()
    assert all(getattr(args, name) is None for name in vars(args))
    for flag in (
        "--host",
        "--port",
        "--latency-ms",
        "--error-rate",
        "--throttle-rate",
        "--hang-rate",
        "--garbage-rate",
        "--retry-after-s",
        "--hang-s",
        "--seed",
        "--api-key",
    ):
        assert flag.lstrip("-").replace("-", "_") in vars(args)


def test_invalid_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Impossible knobs are refused before serving."""
    assert run(_parse("--error-rate", "1.5")) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_module_serves_until_sigterm() -> None:
    """`python -m qnn_emulator --port 0` prints its URL, answers, and exits 0 on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGLO_EMULATOR_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qnn_emulator", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        match = re.search(r"http://[\d.]+:\d+", proc.stderr.readline())
        assert match, "no start line"
        url = match.group(0)
        with urllib.request.urlopen(url + HEALTH_PATH, timeout=10) as resp:
            assert resp.status == 200
        req = urllib.request.Request(
            url + PREDICT_PATH,
            data=predict_body(grid_switch_request()),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
