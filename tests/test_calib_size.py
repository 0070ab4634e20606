"""The calibration size: the default takes what a small calibration split has without a warning
(the README's demo command logs none), an explicit `--calib-size` above what exists warns, and
the cell key follows the calibration samples actually used."""

from __future__ import annotations

import logging
import re

from ptqbench.cli import main
from ptqbench.config import DEFAULT_CALIB_SIZE
from ptqbench.demo.install import ensure_demo_data
from ptqbench.demo.writers import DemoSizes
from ptqbench.results import RunStore

SMALL = DemoSizes(coco_val=1, coco_train=2, dota_val=1, dota_train=1, ade_val=1, ade_train=1)


def _calibration_sizes(messages: list[str]) -> list[int]:
    """The sample counts of the harness's `calibrating ...` lines."""
    return [int(match.group(1)) for message in messages
            if (match := re.match(r"calibrating .*, (\d+) images\)$", message))]


def test_readme_demo_logs_no_warning(tmp_path, monkeypatch, caplog):
    """`ptqbench run --methods minmax,mse --bits 4,6` (here one method, one bit width and one
    evaluation image per task, for speed): the demo data, every task, the default calibration
    size, and no warning although every demo calibration split is smaller than the default."""
    monkeypatch.delenv("PTQBENCH_DATASETS", raising=False)
    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(["run", "--methods", "minmax", "--bits", "4", "--limit", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert any(message.startswith("using the embedded demo") for message in caplog.messages)
    sizes = _calibration_sizes(caplog.messages)
    assert len(sizes) == 3 and all(0 < size < DEFAULT_CALIB_SIZE for size in sizes), sizes
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == []


def test_explicit_size_above_the_split_warns_and_the_key_follows_the_samples_used(tmp_path, caplog):
    data = ensure_demo_data(tmp_path / "demo", SMALL)
    out = tmp_path / "out"
    args = ["run", "--data-root", str(data), "--tasks", "coco", "--methods", "minmax", "--bits", "8",
            "--limit", "1", "--device", "cpu", "--out", str(out)]
    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(args) == 0                                  # default: the split's 2 images, silently
    assert _calibration_sizes(caplog.messages) == [2]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]

    caplog.clear()
    assert main(args + ["--calib-size", "5"]) == 0          # the same 2 images: the same cell
    assert "coco: the calibration split gives only 2 calibration samples (--calib-size 5)" in caplog.text
    assert any(m.endswith("coco minmax W8A8: already in the store") for m in caplog.messages)

    assert main(args + ["--calib-size", "1"]) == 0          # 1 image: another cell
    cells = [record for record in RunStore(out / "ptqbench.sqlite").records("coco") if record.method == "minmax"]
    assert len(cells) == 2 and cells[0].calib_fingerprint != cells[1].calib_fingerprint
