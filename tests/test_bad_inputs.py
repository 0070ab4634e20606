"""The bad-input table: every case is one `ptqbench: error:` line and exit code 2, before any
work, with a pre-filled results store left byte for byte intact (no new file or folder: a cell
that started would have made its artefact folder)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.demo.install import ensure_demo_data
from ptqbench.demo.writers import DemoSizes

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
    """Every file's sha256 and every folder below `folder`, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
            else "folder" for path in sorted(folder.rglob("*"))}


def _bad_inputs(folder: Path, data: Path) -> dict[str, str]:
    """Malformed input files written under `folder`, by their placeholder in the cases."""
    coco = json.loads((data / "coco" / "annotations" / "instances_val2017.json").read_text())
    known = {"image_id": coco["images"][0]["id"], "category_id": coco["categories"][0]["id"], "score": 0.5}
    files = {
        "{file}": "this is not JSON",
        "{no_keys}": json.dumps([{"image_id": known["image_id"]}]),
        "{text_box}": json.dumps([{**known, "bbox": ["a", 0, 10, 10]}]),
        "{not_list}": json.dumps({"annotations": []}),
    }
    fill = {}
    for key, text in files.items():
        path = folder / f"{key.strip('{}')}.json"
        path.write_text(text)
        fill[key] = str(path)
    task1 = folder / "task1"
    task1.mkdir()
    (task1 / "Task1_plane.txt").write_text("P0001 0.9 1 2 3 4\n")
    (folder / "no_priors").mkdir()
    fill.update({"{task1}": str(task1), "{missing}": str(folder / "missing"),
                 "{no_priors}": str(folder / "no_priors")})
    return fill


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for a bad flag."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _yaml(text: str) -> tuple[str, str]:
    return ("yaml", f"data_root: {DATA}\ntasks: [coco]\nout: {STORE}\n{text}\n")


RUN = ["run", "--data-root", DATA, "--tasks", "coco", "--out", STORE, "--device", "cpu", "--limit", "2"]
DOTA = RUN[:3] + ["--tasks", "dota"] + RUN[5:]
ADE = RUN[:3] + ["--tasks", "ade20k"] + RUN[5:]
SSA = ADE + ["--task-option", "mode=ssa", "--task-option"]

CASES = {
    "yaml methods int": (_yaml("methods: 5"), "methods must be a name or a list of names, got 5"),
    "yaml limit word": (_yaml("limit: two"), "limit must be an integer, got 'two'"),
    "yaml seed word": (_yaml("seed: abc"), "seeds must be comma-separated non-negative integers, got 'abc'"),
    "yaml seeds repeated": (_yaml("seeds: [1, 1]"), "seeds must be distinct non-negative integers, got '1,1'"),
    "seed and seeds": (RUN + ["--seed", "1", "--seeds", "1,2"], "give --seed or --seeds, not both"),
    "seed list": (RUN + ["--seed", "1,2"], "--seed takes one integer"),
    "negative seeds": (RUN + ["--seeds", "0,-1"], "--seeds must be distinct non-negative integers"),
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
    "calib prompts without keys": (RUN + ["--calib-prompts", "{no_keys}"], "missing key(s) category_id, bbox, score"),
    "missing calib prompts": (RUN + ["--calib-prompts", "{missing}"], "{missing} does not exist"),
    "prompts not JSON": (RUN + ["--prompts", "{file}"], "{file} is not valid JSON"),
    "prompts only FP": (RUN + ["--methods", "fp", "--prompts", "{file}"], "{file} is not valid JSON"),
    "prompts without keys": (RUN + ["--prompts", "{no_keys}"], "entry 0: missing key(s) category_id, bbox, score"),
    "prompts text box": (RUN + ["--prompts", "{text_box}"], "is not a list of 4 finite numbers"),
    "prompts not a list": (RUN + ["--prompts", "{not_list}"], "expected a JSON list"),
    "missing prompts": (RUN + ["--prompts", "{missing}"], "{missing} does not exist"),
    "dota prompts bad line": (DOTA + ["--prompts", "{task1}"], "Task1_plane.txt, line 1: expected"),
    "dota calib prompts bad line": (DOTA + ["--calib-prompts", "{task1}"], "Task1_plane.txt, line 1: expected"),
    "dota prompts not a folder": (DOTA + ["--prompts", "{file}"], "DOTA prompt folder {file} does not exist"),
    "dota missing prompts": (DOTA + ["--prompts", "{missing}"], "DOTA prompt folder {missing} does not exist"),
    "ade20k prompts file": (ADE + ["--prompts", "{file}"], "ade20k takes no prompts file"),
    "ade20k missing priors": (SSA + ["semantic_prior={missing}"], "semantic prior folder {missing} does not exist"),
    "ade20k prior map missing": (SSA + ["semantic_prior={no_priors}"], "missing semantic prior map {no_priors}/"),
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
    fill = {DATA: str(data), STORE: str(copy), **_bad_inputs(tmp_path, data)}

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
