"""The bad-input table: every case is one `ptqbench: error:` line and exit code 2, before any
work, with a pre-filled results store left byte for byte intact."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.tasks.synthetic import DemoSizes, ensure_demo_data

SMALL = DemoSizes(coco_val=2, coco_train=1, dota_val=1, dota_train=1, ade_val=1, ade_train=1)
DATA, STORE = "{data}", "{store}"  # placeholders in the cases, filled per test


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory) -> tuple[Path, Path]:
    """(demo data root, a results folder holding one finished FP cell)."""
    data = ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", SMALL)
    store = tmp_path_factory.mktemp("store")
    assert main(["run", "--data-root", str(data), "--tasks", "coco", "--methods", "fp", "--limit", "1",
                 "--out", str(store), "--device", "cpu"]) == 0
    return data, store


def _digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for a bad flag."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _yaml(text: str) -> tuple[str, str]:
    return ("yaml", f"data_root: {DATA}\ntasks: [coco]\nout: {STORE}\n{text}\n")


RUN = ["run", "--data-root", DATA, "--tasks", "coco", "--out", STORE, "--device", "cpu", "--limit", "2"]

CASES = {
    "yaml methods int": (_yaml("methods: 5"), "methods must be a name or a list of names, got 5"),
    "yaml limit word": (_yaml("limit: two"), "limit must be an integer, got 'two'"),
    "yaml seed word": (_yaml("seed: abc"), "seed must be an integer, got 'abc'"),
    "yaml task_options string": (_yaml("task_options: foo"), "task_options must be a mapping"),
    "yaml bits bool": (_yaml("bits: true"), "bits must be a bit width or a list of them"),
    "yaml unknown key": (_yaml("bogus: 1"), "unknown option 'bogus'"),
    "out is a file": (RUN[:-4] + ["--out", "{file}"], "exists and is not a folder"),
    "out under a file": (RUN[:-4] + ["--out", "{file}/sub"], "cannot be created"),
    "json unwritable": (["evaluate", "coco", "--results", "{file}", "--json", "{file}/metrics.json"],
                        "--json"),
    "empty bits": (RUN + ["--bits", ""], "--bits is empty"),
    "empty methods": (RUN + ["--methods", ""], "--methods is empty"),
    "empty tasks": (RUN[:3] + RUN[5:] + ["--tasks", ""], "--tasks is empty"),
    "bad calib prompts": (RUN + ["--methods", "minmax", "--calib-prompts", "{file}"], "{file}"),
    "missing calib split": (RUN + ["--methods", "minmax", "--calib-split", "nosuch"], "nosuch"),
    "unknown method": (RUN + ["--methods", "minmx"], "Did you mean 'minmax'?"),
    "threads zero": (RUN + ["--threads", "0"], "--threads"),
    "limit word": (RUN + ["--limit", "two"], "--limit"),
    "unknown flag": (RUN + ["--bogus"], "--bogus"),
}


@pytest.mark.parametrize("argv, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_keeps_the_store(argv, message, prefilled, tmp_path, capsys):
    data, store = prefilled
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    before = _digests(copy)
    not_json = tmp_path / "not_json.json"
    not_json.write_text("this is not JSON")
    fill = {DATA: str(data), STORE: str(copy), "{file}": str(not_json)}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    if argv[0] == "yaml":
        config = tmp_path / "run.yaml"
        config.write_text(filled(argv[1]))
        argv = ["run", "--config", str(config)]
    capsys.readouterr()
    assert _exit_code([filled(arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("ptqbench: error: "), err
    assert filled(message) in err and "Traceback" not in err
    assert _digests(copy) == before
    assert not (copy / "errors").exists()
