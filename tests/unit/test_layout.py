"""The package layout is the architecture: these are the import rules that keep it so.

- worker/core is pure: no event loop, broker, database or HTTP library, and nothing of the runtime
  above it, so every decision it makes can be tested at unit speed.
- contracts/ is the wire contract only: no I/O library, nothing else of eglo.
- producers/ (what an upstream Python team installs) and db/ never reach up into worker/.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = {"asyncio", "aio_pika", "aiormq", "pamqp", "asyncpg", "httpx", "aiohttp", "uvloop"}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from worker import x` names a submodule as much as `import worker.x` does.
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def violations(package: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            top = module.split(".")
            if any(".".join(top[:n]) in forbidden for n in range(1, len(top) + 1)):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        (
            "worker/core",
            IO_LIBRARIES
            | {
                "worker.runtime",
                "worker.embedder",
                "worker.analytics",
                "worker.ops",
                "worker.api",
                "worker.observability",
                "db",
                "producers",
            },
        ),
        ("contracts", IO_LIBRARIES | {"worker", "producers", "db"}),
        ("producers", {"worker", "db"}),
        ("db", {"worker", "producers"}),
    ],
)
def test_package_imports_only_what_it_may(package: str, forbidden: set[str]) -> None:
    assert (ROOT / package).is_dir()
    assert violations(package, forbidden) == []


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The check itself can fail: a function-level `from worker import x` in producers counts."""
    source = tmp_path / "p.py"
    source.write_text("def f():\n    from worker.runtime import store\n    import asyncio\n")
    found = {module for _, module in imports(source)}
    assert {"worker.runtime", "worker.runtime.store", "asyncio"} <= found
