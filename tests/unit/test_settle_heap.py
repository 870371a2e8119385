"""runtime/service.settle_heap: a service process's start-up heap is frozen and its young
generation collected less often. In a child process: freezing is for the whole process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import gc
from worker.runtime.service import GC_YOUNG_THRESHOLD, settle_heap
before = gc.get_freeze_count(), gc.get_threshold()[0]
settle_heap()
after = gc.get_freeze_count(), gc.get_threshold()[0]
print(*before, *after, GC_YOUNG_THRESHOLD)
"""


def test_settling_freezes_start_up_and_raises_the_young_threshold() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    frozen_before, young_before, frozen_after, young_after, wanted = map(int, out)
    assert (frozen_before, young_before) == (0, 700)  # Python's defaults, untouched by imports
    assert frozen_after > 10_000  # the imported modules' objects, at least
    assert young_after == wanted > young_before
