"""A grid runs as the reference code bases do: cuDNN restricted to deterministic algorithms while
methods calibrate and cells are evaluated, and the caller's choice back afterwards."""

from __future__ import annotations

import torch

from ptqbench import harness
from ptqbench.cli import main
from ptqbench.determinism import deterministic_cudnn
from ptqbench.methods.base import METHODS


def test_deterministic_cudnn_restores_the_previous_choice_even_after_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        with deterministic_cudnn():
            assert torch.backends.cudnn.deterministic is True
            raise ValueError("inside")
    except ValueError:
        pass
    assert torch.backends.cudnn.deterministic is False


def test_a_grid_calibrates_and_evaluates_with_deterministic_cudnn(tmp_path, monkeypatch):
    monkeypatch.delenv("PTQBENCH_DATASETS", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    seen: dict[str, list[bool]] = {"calibrate": [], "evaluate": []}
    method = METHODS.get("minmax")
    calibrate, evaluate = method.calibrate, harness.Harness._evaluate

    def recording_calibrate(self, *args):
        seen["calibrate"].append(torch.backends.cudnn.deterministic)
        return calibrate(self, *args)

    def recording_evaluate(self, *args):
        seen["evaluate"].append(torch.backends.cudnn.deterministic)
        return evaluate(self, *args)

    monkeypatch.setattr(method, "calibrate", recording_calibrate)
    monkeypatch.setattr(harness.Harness, "_evaluate", recording_evaluate)
    assert main(["run", "--methods", "minmax", "--bits", "4", "--tasks", "coco", "--limit", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert seen == {"calibrate": [True], "evaluate": [True, True]}
    assert torch.backends.cudnn.deterministic is False
