"""The report's PCC panel: where a SAQ-SAM cell kept the focus masks of one decoder attention
(`SaqSamS.report_maps`: FP and quantized, first prompt and head, [Nq, Nk]), the first query
token's mask over the image tokens, FP beside quantized, with their focus IoU.

The image tokens of SAM's token-to-image attention form a square grid (64 x 64 for SAM's 1024-pixel
input), so each mask row is drawn as that grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ptqbench.report.figures import pyplot
from ptqbench.results import REPORT_MAPS_FILE, RUNS_DIR, RunRecord, cell_folder

FocusPair = tuple[str, np.ndarray, np.ndarray]


def focus_pairs(records: list[RunRecord], out_dir: Path) -> list[FocusPair]:
    """(label, FP mask bool [Nq, Nk], quantized mask bool [Nq, Nk]) of every cell of `records`
    that kept focus masks, in the records' order."""
    pairs = []
    for record in records:
        path = Path(out_dir) / RUNS_DIR / cell_folder(record) / REPORT_MAPS_FILE
        if not path.is_file():
            continue
        with np.load(path) as maps:
            if {"fp", "quantized"} <= set(maps.files):
                pairs.append((f"{record.method} {record.bits} seed {record.seed}", maps["fp"], maps["quantized"]))
    return pairs


def focus_iou(fp: np.ndarray, quantized: np.ndarray) -> float:
    """|M ∩ M_hat| / |M ∪ M_hat| of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(fp, quantized).sum()
    return float(np.logical_and(fp, quantized).sum() / union) if union else 1.0


def _grid(row: np.ndarray) -> np.ndarray:
    """A mask row over Nk image tokens as its square grid [g, g] (a [1, Nk] strip when Nk is not square)."""
    side = math.isqrt(row.size)
    return row.reshape(side, side) if side * side == row.size else row[None]


def focus_figure(pairs: list[FocusPair], title: str):
    """One row per cell: the first query token's focus mask, FP and quantized."""
    plt = pyplot()
    figure, axes = plt.subplots(len(pairs), 2, figsize=(4.4, 2.3 * len(pairs)), dpi=100, squeeze=False)
    for row, (label, fp, quantized) in enumerate(pairs):
        iou = focus_iou(fp, quantized)
        for column, (name, mask) in enumerate((("FP", fp), ("quantized", quantized))):
            axes[row][column].imshow(_grid(mask[0]), cmap="gray", interpolation="nearest")
            axes[row][column].set_axis_off()
            axes[row][column].set_title(f"{label}: {name}" if column == 0 else f"{name} (focus IoU {iou:.2f})",
                                        fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure
