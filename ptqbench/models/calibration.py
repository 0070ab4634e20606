"""The calibration set every method of a cell receives: neutral data types, no model code.

A model family's adapter builds it (`ModelAdapter.calibration_set`): the images preprocessed
exactly as evaluation preprocesses them, with their box prompts, on the run's device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class CalibrationSample:
    """One preprocessed calibration image and its box prompts.

    image: [1, 3, S, S] normalised and padded model input; boxes: [N, 4] xyxy in model input
    coordinates (after ResizeLongestSide), N >= 1.
    """

    image: Tensor
    boxes: Tensor

    def first_prompts(self, count: int | None) -> CalibrationSample:
        """The sample with at most its first `count` box prompts (all of them for None)."""
        return self if count is None else replace(self, boxes=self.boxes[:count])

    def random_prompts(self, count: int, generator: torch.Generator) -> CalibrationSample:
        """The sample with `count` of its box prompts drawn at random, kept in their order (all of
        them, and no draw from `generator`, when it has at most `count`)."""
        if len(self.boxes) <= count:
            return self
        keep = torch.randperm(len(self.boxes), generator=generator)[:count].sort().values
        return replace(self, boxes=self.boxes[keep.to(self.boxes.device)])


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration samples in order, and a fingerprint of their content."""

    samples: tuple[CalibrationSample, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)
