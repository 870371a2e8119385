"""Writing generated sections into docs/performance.md between markers, leaving the rest alone."""

from __future__ import annotations

import math
from pathlib import Path

DOC = Path("docs/performance.md")
_SKELETON = """# Performance

How fast eglo is on one machine, measured by `python -m benchmarks` (`make bench`); the profile
by `python -m benchmarks.profile`. Both sections below are generated: rerun, do not edit.

## Results

<!-- bench:results:begin -->
<!-- bench:results:end -->

## Profile

<!-- bench:profile:begin -->
<!-- bench:profile:end -->
"""


def write_section(name: str, content: str, path: Path = DOC) -> None:
    """Replace what is between `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->`."""
    text = path.read_text() if path.exists() else _SKELETON
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n{content.strip()}\n{end}{tail}")


def num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")
