"""The calibration set every method of a cell receives: neutral data types, no model code.

A model family's adapter builds it (`ModelAdapter.calibration_set`): the images preprocessed
exactly as evaluation preprocesses them, with their box prompts, on the run's device.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class CalibrationSample:
    """One preprocessed calibration image and its box prompts.

    image: [1, 3, S, S] normalised and padded model input; boxes: [N, 4] xyxy in model input
    coordinates (after ResizeLongestSide), N >= 1.
    """

    image: Tensor
    boxes: Tensor


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration samples in order, and a fingerprint of their content."""

    samples: tuple[CalibrationSample, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)
