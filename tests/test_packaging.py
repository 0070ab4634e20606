"""The built wheel: only the `ptqbench` package, with the shipped checkpoint and a console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_ptqbench_with_its_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), "-q"], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("ptqbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"ptqbench"}
    assert "ptqbench/data/sam_tiny.pt" in names
    assert "ptqbench/demo/install.py" in names and "ptqbench/methods/saqsam/method.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ptqbench = ptqbench.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_import_ptqbench_is_light():
    code = ("import sys, ptqbench, ptqbench.config, ptqbench.registry, ptqbench.errors; "
            "print(any(m in sys.modules for m in ('cv2', 'pycocotools', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
