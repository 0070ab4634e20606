"""Neutral data types shared by tasks, models and methods; this module imports no torch and no task."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CalibrationItem:
    """One calibration image with its box prompts.

    image: uint8 RGB array [H, W, 3]; boxes: float array [N, 4] xyxy in image pixels (N >= 1).
    """

    image: np.ndarray
    boxes: np.ndarray
