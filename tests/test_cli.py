"""End-to-end CLI behaviour: a small grid on demo-layout data, resume, and one-line errors."""

from __future__ import annotations

import csv
import logging
import sqlite3
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.methods.options import NO_OPTIONS_PRESETS


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_grid_writes_leaderboard_and_resumes(small_demo, tmp_path, caplog):
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax,percentile",
            "--bits", "8,w4a8", "--calib-size", "2", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    rows = _rows(tmp_path / "leaderboard_coco.csv")
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("fp", "fp"), ("minmax", "W4A8"), ("minmax", "W8A8"), ("percentile", "W4A8"), ("percentile", "W8A8")]
    assert rows[1]["w_bits"] == "4" and rows[1]["a_bits"] == "8"
    assert all(r["preset"] == "fast" for r in rows[1:])
    assert all(r["images"] == "3" for r in rows)
    assert "labels" not in rows[0]  # the shipped sam_tiny is trained: no "untrained" label
    assert (tmp_path / "leaderboard_coco.md").read_text().count("| sam_tiny") == 5
    created = [r[0] for r in sqlite3.connect(tmp_path / "ptqbench.sqlite").execute("SELECT created_at FROM runs")]

    caplog.clear()
    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(args) == 0
    assert [m for m in caplog.messages if "already in the store" in m] == [  # the FP row and 4 method cells
        f"[{k}/5] coco {cell}: already in the store"
        for k, cell in enumerate(["fp", "minmax W8A8", "minmax W4A8", "percentile W8A8", "percentile W4A8"], 1)]
    again = [r[0] for r in sqlite3.connect(tmp_path / "ptqbench.sqlite").execute("SELECT created_at FROM runs")]
    assert again == created

    assert main(args[:-4] + ["--calib-size", "2", "--out", str(tmp_path), "--methods", "minmax", "--bits", "9x"]) == 2
    assert len(_rows(tmp_path / "leaderboard_coco.csv")) == 5


def test_a_run_of_another_limit_is_recomputed_and_compared_with_its_own_fp_row(small_demo, tmp_path, caplog):
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax", "--bits", "8",
            "--calib-size", "1", "--out", str(tmp_path), "--device", "cpu"]
    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(args + ["--limit", "1"]) == 0
    assert main(args + ["--limit", "2"]) == 0
    assert not any("already in the store" in m for m in caplog.messages)
    rows = _rows(tmp_path / "leaderboard_coco.csv")
    assert [(r["images"], r["method"]) for r in rows] == [("1", "fp"), ("1", "minmax"), ("2", "fp"), ("2", "minmax")]
    for fp, quantized in (rows[0:2], rows[2:4]):
        expected = float(quantized["mask_AP"]) - float(fp["mask_AP"])
        assert float(quantized["delta_vs_fp"]) == pytest.approx(expected, abs=2e-4)
    assert float(rows[0]["mask_AP"]) != float(rows[2]["mask_AP"])  # the two FP rows are two evaluations
    assert len(list((tmp_path / "runs").iterdir())) == 4  # each cell keeps its own artefacts

    caplog.clear()
    assert main(args + ["--limit", "1"]) == 0
    assert sum("already in the store" in m for m in caplog.messages) == 2  # the FP and the minmax cell
    assert len(_rows(tmp_path / "leaderboard_coco.csv")) == 4


@pytest.mark.parametrize("argv, message", [
    (["run", "--methods", "minmx"], "unknown method 'minmx'. Did you mean 'minmax'?"),
    (["run", "--tasks", "coc"], "unknown task 'coc'. Did you mean 'coco'?"),
    (["run", "--model", "sam_vit_q"], "unknown model 'sam_vit_q'"),
    (["run", "--bits", "1"], "bit width 1 in '1' is outside 2..16"),
    (["run", "--bits", "w4a17"], "outside 2..16"),
    (["run", "--bits", "four"], "cannot read bit width 'four'"),
    (["run", "--data-root", "/nonexistent/ptqbench"], "data root /nonexistent/ptqbench does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqbench: error: ") and message in err
    assert "\n" not in err


def test_corrupt_checkpoint_is_rejected(small_demo, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code = main(["run", "--checkpoint", str(bad), "--data-root", str(small_demo), "--tasks", "coco",
                 "--out", str(tmp_path)])
    assert code == 2
    assert str(bad) in capsys.readouterr().err


def test_list_and_leaderboard(small_demo, tmp_path, capsys):
    assert main(["list", "methods"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"fp", "minmax", "percentile", "mse", "omse"} <= set(listed)
    assert main(["leaderboard", "--out", str(tmp_path)]) == 2
    assert "no results store" in capsys.readouterr().err


def test_config_file_is_read_and_flags_override(small_demo, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_root: {small_demo}\ntasks: [coco]\nmethods: minmax\nbits: [8]\ncalib-size: 1\n"
                      f"limit: 1\nout: {tmp_path / 'out'}\n")
    assert main(["run", "--config", str(config), "--bits", "6", "--device", "cpu"]) == 0
    rows = _rows(tmp_path / "out" / "leaderboard_coco.csv")
    assert [(r["method"], r["bits"], r["images"]) for r in rows] == [("fp", "fp", "1"), ("minmax", "W6A6", "1")]
    config.write_text("methods: [minmax]\nbogus_option: 1\n")
    assert main(["run", "--config", str(config)]) == 2


def test_evaluate_commands_rescore_a_runs_artefacts_to_the_same_numbers(small_demo, tmp_path):
    import json

    out = tmp_path / "out"
    assert main(["run", "--data-root", str(small_demo), "--tasks", "coco,dota,ade20k", "--methods", "fp",
                 "--calib-size", "1", "--out", str(out), "--device", "cpu"]) == 0
    artefacts = {"coco": ["--results", "coco_segm_results.json"], "dota": ["--detections", "dota_task1"],
                 "ade20k": ["--predictions", "ade20k_pred"]}
    for task, (flag, name) in artefacts.items():
        (row,) = _rows(out / f"leaderboard_{task}.csv")
        metrics_json = tmp_path / f"{task}.json"
        (cell,) = (out / "runs").glob(f"sam_tiny-{task}-fp-fp---*")  # one folder per cell, named with its key
        assert main(["evaluate", task, flag, str(cell / name), "--data-root", str(small_demo),
                     "--json", str(metrics_json)]) == 0
        metrics = json.loads(metrics_json.read_text())
        headline = {"coco": "mask_AP", "dota": "mAP", "ade20k": "mIoU"}[task]
        assert round(metrics[headline], 4) == float(row[headline])


class Boom:
    """A method whose calibration fails with an unexpected exception (two lines of message)."""

    name = "boom"
    presets = NO_OPTIONS_PRESETS

    def __init__(self, config=None, *, progress=True) -> None:
        self.config = config

    def calibrate(self, qmodel, fp_model, calib, spec, seed) -> None:
        raise RuntimeError("boom in calibrate\nsecond line of the message")


def test_unexpected_cell_exception_is_one_line_keeps_finished_cells_and_logs_the_traceback(
        small_demo, tmp_path, capsys, monkeypatch):
    from ptqbench.methods.base import METHODS

    monkeypatch.setitem(METHODS._factories, Boom.name, Boom)
    code = main(["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax,boom,percentile",
                 "--bits", "8", "--calib-size", "1", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("ptqbench: error:")]
    traceback_file = tmp_path / "errors" / "sam_tiny-coco-boom-W8A8.log"
    assert line == ("ptqbench: error: cell (model sam_tiny, task coco, method boom, bits W8A8) failed with "
                    f"RuntimeError: boom in calibrate ... (traceback in {traceback_file})")
    logged = traceback_file.read_text()
    assert logged.startswith("Traceback (most recent call last):") and 'raise RuntimeError("boom in calibrate' in logged
    assert [(r["method"], r["bits"]) for r in _rows(tmp_path / "leaderboard_coco.csv")] == [
        ("fp", "fp"), ("minmax", "W8A8")]


def test_a_checkpoint_that_is_not_the_official_one_is_accepted_and_labelled(small_demo, tmp_path):
    import torch

    from ptqbench.models.checkpoints import load_model

    weights = tmp_path / "sam_tiny_fp32.pth"  # the shipped weights, stored in float32: other bytes
    torch.save(load_model("sam_tiny").model.state_dict(), weights)
    assert main(["run", "--checkpoint", str(weights), "--data-root", str(small_demo), "--tasks", "coco",
                 "--methods", "fp", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    (row,) = _rows(tmp_path / "leaderboard_coco.csv")
    assert row["labels"] == "unofficial-checkpoint"


def test_help_describes_the_tool_and_every_flag_has_help(capsys):
    import argparse

    from ptqbench.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Benchmark post-training quantization (PTQ) methods on Segment Anything" in out
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            else:
                assert action.help, f"{parser.prog} {action.dest} has no help"


@pytest.mark.parametrize("argv", [["-v", "list", "methods"], ["list", "-v", "methods"], ["list", "methods", "-v"],
                                  ["evaluate", "coco", "-v", "--results", "x.json"]])
def test_verbose_before_or_after_the_command(argv):
    from ptqbench.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args([arg for arg in argv if arg != "-v"]).verbose is False


def test_list_methods_has_one_line_description_each(capsys):
    from ptqbench.methods.base import METHODS

    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == METHODS.names()
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)
    assert any(line.startswith("fp") and "Leaves every site off." in line for line in lines)


def test_builtin_name_catalogue_matches_the_registries():
    from ptqbench.methods.base import METHODS
    from ptqbench.models.spec import MODELS
    from ptqbench.registry import BUILTIN_NAMES
    from ptqbench.tasks.base import TASKS

    for registry in (METHODS, TASKS, MODELS):
        catalogue = BUILTIN_NAMES[registry.kind]
        assert sorted(catalogue) == registry.names()
        assert {alias: name for name, aliases in catalogue.items() for alias in aliases} == registry._aliases


def test_an_unknown_name_is_answered_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from ptqbench.cli import main; code = main(['run', '--methods', 'minmx']); "
            "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'"
            " or m.startswith(('ptqbench.methods.', 'ptqbench.tasks')) and m != 'ptqbench.methods.options'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "[]"]
    assert done.stderr.startswith("ptqbench: error: unknown method 'minmx'")


def test_yaml_bits_may_be_a_bare_number(tmp_path):
    from ptqbench.config import BitSpec, load_config_file

    config = tmp_path / "run.yaml"
    config.write_text("bits: 8\nmethods: [minmax, mse]\n")
    assert load_config_file(config) == {"bits": (BitSpec(8, 8),), "methods": ("minmax", "mse")}


def test_the_tiny_alias_gets_the_fast_preset(small_demo, tmp_path):
    assert main(["run", "--model", "tiny", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax",
                 "--bits", "8", "--calib-size", "1", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert [r["preset"] for r in _rows(tmp_path / "leaderboard_coco.csv")] == ["-", "fast"]


def test_threads_flag_and_capped_default(monkeypatch):
    import torch

    from ptqbench.cli import MAX_DEFAULT_THREADS, build_parser, configure_threads

    before = torch.get_num_threads()
    try:
        assert build_parser().parse_args(["run", "--threads", "3"]).threads == 3
        assert configure_threads(3) == 3 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert configure_threads(None) == 3  # the environment's choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(MAX_DEFAULT_THREADS + 4)
        assert configure_threads(None) == MAX_DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)


def test_sigterm_ends_like_ctrl_c_with_one_line(small_demo, tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    from ptqbench import harness

    def terminated(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(harness.Harness, "execute", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    code = main(["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "fp", "--out", str(tmp_path),
                 "--device", "cpu"])
    assert code == 143
    assert capsys.readouterr().err == "ptqbench: terminated; finished cells are kept in the store\n"
    assert signal.getsignal(signal.SIGTERM) == previous
