"""`ptqbench report`: the HTML page and PNGs of a results folder (here a copy of the committed demo)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from ptqbench.cli import main
from ptqbench.errors import DataError
from ptqbench.report.page import write_report
from ptqbench.results import REPORT_MAPS_FILE, STORE_FILENAME, RunStore, leaderboard_frame
from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.coco import CocoTask
from ptqbench.tasks.gallery import GALLERY_DIR

DEMO_RESULTS = Path(__file__).resolve().parents[1] / "results" / "demo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    shutil.copy(DEMO_RESULTS / STORE_FILENAME, out / STORE_FILENAME)
    return write_report(out)


def _inlined_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_has_three_figures_per_task_inlined_and_beside_it(demo_report: Path) -> None:
    store = RunStore(demo_report.parent / STORE_FILENAME)
    page = demo_report.read_text(encoding="utf-8")
    pngs = _inlined_pngs(page)
    files = sorted((demo_report.parent / "report").glob("*.png"))
    assert len(pngs) == len(files) == 3 * len(store.tasks())
    assert sorted(png for png in pngs) == sorted(path.read_bytes() for path in files)
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    for task in store.tasks():
        assert f"<h2>{task} (headline:" in page
        frame = leaderboard_frame(store, task)
        headline = store.records(task)[-1].metric
        assert f"<td>{frame[frame['bits'] == 'fp'].iloc[0][headline]:.2f}</td>" in page


def test_metric_figure_draws_one_line_per_method(demo_report: Path) -> None:
    """The COCO metric-vs-bits figure has the colours of three methods' lines (minmax, mse, saqsam)."""
    import matplotlib.image

    image = matplotlib.image.imread(demo_report.parent / "report" / "coco_0_metric_vs_bits.png")[..., :3]
    default_cycle = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17)]
    for color in default_cycle:
        assert (np.abs(image - np.array(color)).max(axis=-1) < 0.05).sum() > 50, color


def test_missing_store_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no results store"):
        write_report(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (the OS package) for the headless rendering")
def test_every_figure_loads_in_a_headless_browser(demo_report: Path, tmp_path: Path) -> None:
    """Chromium renders the page; a script appended to a copy counts the images that decoded."""
    probe = tmp_path / "probe.html"
    probe.write_text(demo_report.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.addEventListener('load', () => {const images = [...document.images];"
        "document.body.setAttribute('data-loaded', images.filter(i => i.complete && i.naturalWidth > 0).length);"
        "document.body.setAttribute('data-total', images.length);});</script></body>")), encoding="utf-8")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-loaded="(\d+)"', dom)
    total = re.search(r'data-total="(\d+)"', dom)
    assert loaded and total and int(total.group(1)) > 0
    assert loaded.group(1) == total.group(1)


def test_report_command(tmp_path: Path, capsys) -> None:
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    shutil.copy(DEMO_RESULTS / STORE_FILENAME, tmp_path / STORE_FILENAME)
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file()
    assert "report written to" in capsys.readouterr().out


def test_gallery_shows_each_cells_masks(small_demo, tmp_path) -> None:
    """Every cell keeps drawings of its first evaluation images with its masks blended in; the
    report lays the FP and quantized drawings of one task side by side."""
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco,dota,ade20k", "--methods", "minmax", "--bits", "4",
            "--calib-size", "1", "--bootstrap", "0", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    cells = sorted((tmp_path / "runs").iterdir())
    assert len(cells) == 6 and all(len(list((cell / GALLERY_DIR).glob("*.png"))) >= 1 for cell in cells)
    split = CocoTask(_config(small_demo))._split("val2017")
    raw = split.read_image(split.image_ids[0])
    fp_cell = next(cell for cell in cells if "-coco-fp-" in cell.name)
    drawing = cv2.cvtColor(cv2.imread(str(fp_cell / GALLERY_DIR / "0.png")), cv2.COLOR_BGR2RGB)
    raw = cv2.resize(raw, (drawing.shape[1], drawing.shape[0]), interpolation=cv2.INTER_AREA)
    tinted = (np.abs(drawing.astype(int) - raw.astype(int)).max(axis=2) > 20).mean()
    assert 0.01 < tinted < 0.99, tinted  # the masks cover part of the image, not all of it

    write_report(tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for name in ("coco", "dota", "ade20k"):
        assert (tmp_path / "report" / f"{name}_0_gallery.png").is_file()
        assert f'alt="{name} gallery"' in page


def _config(data_root: Path) -> TaskConfig:
    return TaskConfig(data_root=data_root, prompts=None, calib_prompts=None, calib_split=None, model_input_size=1024,
                      options=())


def test_saqsam_cells_keep_pcc_focus_masks_for_the_report(small_demo, tmp_path) -> None:
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "saqsam-s", "--bits", "4",
            "--calib-size", "1", "--bootstrap", "0", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    (maps_file,) = (tmp_path / "runs").glob(f"*-coco-saqsam-s-*/{REPORT_MAPS_FILE}")
    with np.load(maps_file) as maps:
        fp, quantized = maps["fp"], maps["quantized"]
    assert fp.dtype == quantized.dtype == bool and fp.shape == quantized.shape and fp.ndim == 2
    assert fp.any(axis=1).all() and quantized.any(axis=1).all()  # every query keeps its top key
    write_report(tmp_path)
    assert (tmp_path / "report" / "coco_focus.png").is_file()
    assert 'alt="coco focus"' in (tmp_path / "report.html").read_text(encoding="utf-8")
