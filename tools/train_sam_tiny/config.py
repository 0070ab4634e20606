"""The training run's settings (`TrainConfig`) and the constants of the data, prompts and loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ptqbench.tasks.ade20k import MIN_COMPONENT_AREA

log = logging.getLogger("train_sam_tiny")

FAMILIES = ("coco", "dota", "ade")
DOTA_CROPS = 4
LOADER_BATCH = 8
DOTA_MIN_AREA = 12
ADE_MIN_AREA = MIN_COMPONENT_AREA
MIN_INPUT_AREA = 4
BOX_SHARE, POINT_SHARE = 0.5, 0.375
MULTI_POINTS = 3
BOX_NOISE, BOX_NOISE_MAX_PX = 0.1, 20.0
EXACT_BOX_SHARE = 0.25
FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
MAX_CHECKPOINT_BYTES = 16_000_000
_TRAIN_STREAM, _VAL_STREAM, _SAMPLING_STREAM = 7, 8, 9


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run (the command-line flags)."""

    out: Path
    log_dir: Path
    device: str = "cuda"
    minutes: float = 8.0
    max_steps: int = 12000
    batch: int = 64
    prompts: int = 16
    workers: int = 12
    pool: int = 2048
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.1
    warmup_steps: int = 250
    grad_clip: float = 1.0
    seed: int = 0
    val_scenes: int = 16
    val_every: int = 500
    log_every: int = 50
    reserve_s: float = 15.0
