"""`ptqbench report`: one self-contained HTML page of a results folder, with its PNGs beside it.

For every task in the store and every evaluation in it (`figures.evaluation_groups`): the headline
metric against bit width, the differences to FP, calibration time against the metric, and the
leaderboard rows; then the mask gallery (`gallery`) where the cells' folders kept drawings, and
SAQ-SAM's PCC focus masks (`focus`) where its cells kept them.
Every figure is written as `<out>/report/<task>_<n>_<kind>.png` and inlined in `<out>/report.html`
as a base64 data URI, so the page opens on its own (mailed, archived) and the PNGs can go into a
paper.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from ptqbench.errors import DataError
from ptqbench.report import figures
from ptqbench.report.focus import focus_figure, focus_pairs
from ptqbench.report.gallery import gallery_columns, gallery_figure
from ptqbench.results import RUNS_DIR, STORE_FILENAME, RunStore, leaderboard_frame

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
FIGURE_DIR = "report"
FIGURES = (("metric_vs_bits", figures.metric_vs_bits), ("delta_vs_fp", figures.delta_bars),
           ("calibration_time", figures.calibration_time))
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "img{max-width:100%;border:1px solid #ddd;margin:4px 0}"
         "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
         "h2{border-bottom:1px solid #ccc}")


def _png_bytes(figure, *, palette: bool = False) -> bytes:
    """The figure as PNG bytes; the figure is closed. palette: 256 colours (median cut), for the
    gallery's photographs, whose full-colour PNGs are 3-4 times larger (the committed demo's
    page carries three of them)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    if not palette:
        return buffer.getvalue()
    image = Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    compact = io.BytesIO()
    image.save(compact, format="PNG", optimize=True)
    return compact.getvalue()


def _image_tag(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _task_section(store: RunStore, task: str, out_dir: Path, figure_dir: Path) -> tuple[str, list[Path]]:
    """The HTML of one task (figures and tables per evaluation, then the mask gallery) and the PNG paths written."""
    frame = leaderboard_frame(store, task)
    metric = store.records(task)[-1].metric
    parts = [f"<h2>{html.escape(task)} (headline: {html.escape(metric)})</h2>"]
    written: list[Path] = []

    def add_figure(figure, name: str, alt: str, *, palette: bool = False) -> None:
        path = figure_dir / f"{task}_{name}.png"
        png = _png_bytes(figure, palette=palette)
        path.write_bytes(png)
        written.append(path)
        parts.append(_image_tag(png, alt))

    for index, (title, rows) in enumerate(figures.evaluation_groups(frame)):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        for kind, draw in FIGURES:
            add_figure(draw(rows, metric, title), f"{index}_{kind}", f"{task} {kind}")
        parts.append(rows.to_html(index=False, float_format=lambda value: f"{value:.2f}", na_rep="", border=0))
    galleries = gallery_columns(store.records(task), out_dir)
    if not galleries:
        log.warning("report: no %s cell under %s kept gallery drawings (its runs/ folder is missing or older): "
                    "the %s gallery is left out", task, out_dir / RUNS_DIR, task)
    for index, columns in enumerate(galleries):
        parts.append(f"<h3>{html.escape(task)}: the first evaluation images, FP and each method at its lowest "
                     f"bit width</h3>")
        add_figure(gallery_figure(columns, task), f"{index}_gallery", f"{task} gallery", palette=True)
    pairs = focus_pairs(store.records(task), out_dir)
    if pairs:
        parts.append(f"<h3>{html.escape(task)}: PCC focus masks of the last decoder attention (first prompt, "
                     f"head and query token)</h3>")
        add_figure(focus_figure(pairs, task), "focus", f"{task} focus")
    return "\n".join(parts), written


def write_report(out_dir: str | Path) -> Path:
    """Write `<out_dir>/report.html` and its PNGs from `<out_dir>/ptqbench.sqlite`; returns the page's path.

    Raises DataError when the folder has no store or the store no runs.
    """
    out = Path(out_dir)
    store_path = out / STORE_FILENAME
    if not store_path.is_file():
        raise DataError(f"no results store {store_path}; run `ptqbench run --out {out}` first")
    store = RunStore(store_path)
    tasks = store.tasks()
    if not tasks:
        raise DataError(f"the results store {store_path} has no runs")
    figure_dir = out / FIGURE_DIR
    figure_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for task in tasks:
        section, _ = _task_section(store, task, out, figure_dir)
        sections.append(section)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>ptqbench report: {html.escape(str(out))}"
            f"</title><style>{STYLE}</style></head><body>\n<h1>ptqbench report</h1>\n"
            f"<p>Results store <code>{html.escape(str(store_path))}</code>.</p>\n" + "\n".join(sections)
            + "\n</body></html>\n")
    path = out / REPORT_FILENAME
    path.write_text(page, encoding="utf-8")
    return path
