"""The README's configuration table keeps up with the settings."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_documents_every_setting() -> None:
    """Every EGLO_ variable the code reads appears in the README's table."""
    readme = (ROOT / "README.md").read_text()
    missing = [f"EGLO_{name.upper()}" for name in Settings.model_fields
               if f"`EGLO_{name.upper()}`" not in readme]
    assert not missing, f"README lacks {missing}"
