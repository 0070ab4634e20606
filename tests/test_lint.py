"""Lint as a test: `ruff check` with the configuration in pyproject.toml finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("ptqbench", "tests", "tools", "benchmarks")


def test_ruff_finds_nothing() -> None:
    pytest.importorskip("ruff", reason="ruff is a development tool (the [dev] extra); CI installs it")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *FOLDERS], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"ruff check {' '.join(FOLDERS)} failed:\n{result.stdout}{result.stderr}"
