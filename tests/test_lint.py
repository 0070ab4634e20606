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


def test_no_file_over_500_lines_and_no_function_over_80() -> None:
    """The size rule of the project's code (issue 17): small files around one concept."""
    import ast

    too_long = []
    for path in sorted((ROOT / "ptqbench").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        if source.count("\n") > 500:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "over the size rule:\n" + "\n".join(too_long)
