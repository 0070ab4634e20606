"""The report's mask gallery: a task's first evaluation images as the FP cell and each method at
its lowest bit width predicted them, side by side.

The drawings are the ones each cell kept when it was scored (`ptqbench.tasks.gallery`, in
`<out>/runs/<cell folder>/gallery/`), so the report needs neither the data nor the model. Every
column of one evaluation shows the same images (the evaluation order is fixed); a cell whose
folder is gone (e.g. a store copied without its `runs/`) is left out.
"""

from __future__ import annotations

from pathlib import Path

from ptqbench.report.figures import pyplot
from ptqbench.results import RUNS_DIR, RunRecord, cell_folder, evaluation_key, is_fp
from ptqbench.tasks.gallery import gallery_drawings

Column = tuple[str, list[Path]]


def _lowest_bits(records: list[RunRecord]) -> list[RunRecord]:
    """Per method (by name), its record of the lowest bit width (weights, then activations), first seed."""
    chosen: dict[str, RunRecord] = {}
    for record in records:
        rank = (record.w_bits, record.a_bits, record.seed)
        best = chosen.get(record.method)
        if best is None or rank < (best.w_bits, best.a_bits, best.seed):
            chosen[record.method] = record
    return [chosen[name] for name in sorted(chosen)]


def gallery_columns(records: list[RunRecord], out_dir: Path) -> list[list[Column]]:
    """Per evaluation of one task's records: its columns (label, drawings), FP first, then every
    method at its lowest bit width; only cells that kept drawings; evaluations without an FP
    column or any other column are left out."""
    evaluations: dict[tuple, list[RunRecord]] = {}
    for record in records:
        evaluations.setdefault(evaluation_key(record), []).append(record)
    found = []
    for group in evaluations.values():
        fp = [record for record in group if is_fp(record)][-1:]
        chosen = fp + _lowest_bits([record for record in group if not is_fp(record)])
        columns = [(f"{record.method} {record.bits}" if not is_fp(record) else "fp",
                    gallery_drawings(Path(out_dir) / RUNS_DIR / cell_folder(record))) for record in chosen]
        columns = [column for column in columns if column[1]]
        if len(columns) > 1 and columns[0][0] == "fp":
            found.append(columns)
    return found


def gallery_figure(columns: list[Column], title: str):
    """A grid of drawings: one row per image, one column per cell, the cell's label on top."""
    import matplotlib.image

    plt = pyplot()
    rows = min(len(drawings) for _, drawings in columns)
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), dpi=100,
                                squeeze=False)
    for column, (label, drawings) in enumerate(columns):
        for row in range(rows):
            axes[row][column].imshow(matplotlib.image.imread(drawings[row]))
            axes[row][column].set_axis_off()
        axes[0][column].set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
