"""tools/gpu_check.py's repeat check: a second demo run passes only when every task's metrics equal
the first run's to the last digit."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unrepeated_tasks():
    """`tools.gpu_check.unrepeated_tasks`, imported as `python3 tools/gpu_check.py` finds it (from
    the repository root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tools.gpu_check import unrepeated_tasks

    return unrepeated_tasks


def _rows(**metrics_by_task: dict[str, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(task=task, method="saqsam", metrics=metrics) for task, metrics in metrics_by_task.items()]


def test_equal_metrics_repeat(unrepeated_tasks):
    first = _rows(coco={"mask_AP": 60.32, "AP50": 91.0}, dota={"mAP": 53.83})
    assert unrepeated_tasks(_rows(dota={"mAP": 53.83}, coco={"AP50": 91.0, "mask_AP": 60.32}), first) == []


def test_a_last_digit_or_a_missing_task_does_not_repeat(unrepeated_tasks):
    first = _rows(ade20k={"mIoU": 84.9722315945207}, coco={"mask_AP": 60.32}, dota={"mAP": 53.83})
    again = _rows(ade20k={"mIoU": 84.96596699723517}, coco={"mask_AP": 60.32})
    assert unrepeated_tasks(again, first) == ["ade20k", "dota"]
