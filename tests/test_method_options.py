"""Method configurations: presets, options set by name (command line and YAML), their checks, and
their identity in the store and the leaderboard."""

from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.config import load_config_file
from ptqbench.errors import ConfigError
from ptqbench.methods.base import METHODS
from ptqbench.methods.options import (
    config_id,
    config_json,
    option_names,
    parse_method_options,
    preset_config,
    with_options,
)
from ptqbench.registry import BUILTIN_NAMES


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    clip: float | None = None


@dataclass(frozen=True)
class Outer:
    p: float = 2.4
    big: bool = True
    observer: str = "mse"
    limit: int | None = None
    percentiles: tuple[float, ...] = (0.5, 0.9)
    inner: Inner = Inner()


def test_options_are_typed_from_strings_and_yaml_values():
    config = with_options(Outer(), {"p": "2", "big": "false", "observer": "minmax", "limit": "none",
                                    "percentiles": "0.1, 0.2", "inner.steps": "7", "inner.clip": 0.5}, "m")
    assert config == Outer(p=2.0, big=False, observer="minmax", limit=None, percentiles=(0.1, 0.2),
                           inner=Inner(steps=7, clip=0.5))
    assert with_options(Outer(), {"limit": 3, "big": True, "percentiles": [0.3]}, "m") == Outer(
        limit=3, big=True, percentiles=(0.3,))
    assert option_names(Outer()) == ["p", "big", "observer", "limit", "percentiles", "inner.steps", "inner.clip"]


@pytest.mark.parametrize(("options", "message"), [
    ({"q": "1"}, r"m: unknown option 'q' \(options: p, big, observer, limit, percentiles, inner.steps"),
    ({"inner.depth": "1"}, "unknown option 'inner.depth'"),
    ({"p.x": "1"}, "has no field 'x'"),
    ({"inner": "1"}, "is a group of options"),
    ({"limit": "many"}, r"option limit='many': expected int or none"),
    ({"big": "maybe"}, "expected bool"),
    ({"inner.steps": "none"}, "may not be none"),
    ({"inner.steps": 2.5}, "expected int"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        with_options(Outer(), options, "m")


def test_every_builtin_method_has_paper_and_fast_configurations():
    for name in BUILTIN_NAMES["method"]:
        method = METHODS.get(name)
        for preset in ("paper", "fast"):
            config = preset_config(method, preset)
            assert json.loads(config_json(config)) is not None
            assert type(method(config, progress=False).config) is type(config)
    assert preset_config(METHODS.get("mse"), "fast").weight_ranges == 20
    assert preset_config(METHODS.get("saqsam"), "paper").par.final_iterations == 10_000
    with pytest.raises(ConfigError, match="unknown preset 'slow'"):
        preset_config(METHODS.get("mse"), "slow")


def test_command_line_and_yaml_options(tmp_path):
    assert parse_method_options(["saqsam.pcc.max_prompts=8", "MSE.p = 2.0"]) == (
        ("saqsam", "pcc.max_prompts", "8"), ("mse", "p", "2.0"))
    with pytest.raises(ConfigError, match="expected METHOD.OPTION=VALUE"):
        parse_method_options(["saqsam=8"])
    path = tmp_path / "run.yaml"
    path.write_text("method_options:\n  saqsam:\n    pcc: {max_prompts: 8}\n    par:\n      max_prompts: 4\n"
                    "  mse: {p: 2.0}\n")
    assert load_config_file(path)["method_options"] == (
        ("saqsam", "pcc.max_prompts", 8), ("saqsam", "par.max_prompts", 4), ("mse", "p", 2.0))
    path.write_text("method_options: {mse: 3}\n")
    with pytest.raises(ConfigError, match="method_options must map method names"):
        load_config_file(path)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_two_configurations_of_a_method_are_two_rows(small_demo, tmp_path, capsys):
    """A run with `--method-option` stores the effective configuration with its row and does not
    replace the row of the preset's configuration; the leaderboard tells them apart by hash."""
    out = tmp_path / "out"
    base = ["run", "--data-root", str(small_demo), "--methods", "mse", "--bits", "4", "--out", str(out),
            "--limit", "2", "--calib-size", "1"]
    assert main(base) == 0
    assert main([*base, "--method-option", "mse.weight_ranges=5", "--method-option", "mse.p=2"]) == 0
    rows = [r for r in _rows(out / "leaderboard_coco.csv") if r["method"] == "mse"]
    assert len(rows) == 2 and len({r["config"] for r in rows}) == 2
    with sqlite3.connect(out / "ptqbench.sqlite") as conn:
        stored = sorted((json.loads(text) for (text,) in conn.execute(
            "SELECT method_config FROM runs WHERE method = 'mse'")), key=lambda c: c["weight_ranges"])
    fast = json.loads(config_json(preset_config(METHODS.get("mse"), "fast")))
    assert stored == sorted([fast, {**fast, "weight_ranges": 5, "p": 2.0}], key=lambda c: c["weight_ranges"])
    assert {r["config"] for r in rows} == {config_id(json.dumps(c, sort_keys=True, separators=(",", ":")))
                                          for c in stored}
    capsys.readouterr()


@pytest.mark.parametrize(("option", "message"), [
    ("mse.weight_range=5", "mse: unknown option 'weight_range' (options: p, search_iterations"),
    ("mse.weight_ranges=many", "mse: option weight_ranges='many': expected int"),
    ("mse.weight_ranges=0", "MseConfig.weight_ranges must be at least 1, got 0"),
    ("saqsam.pcc.max_prompts=8", "method options are given for 'saqsam', which is not among the methods"),
    ("nosuch.x=1", "unknown method 'nosuch'"),
])
def test_bad_method_options_exit_2_with_one_line(small_demo, tmp_path, capsys, option, message):
    code = main(["run", "--data-root", str(small_demo), "--methods", "mse", "--out", str(tmp_path / "out"),
                 "--method-option", option])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_the_readme_plugin_method_takes_an_option_from_the_command_line(small_demo, tmp_path, capsys):
    """The "Adding a method" example of the README, as a new user would use it: registered, run
    with one option set by `--method-option`, and that configuration stored with its row."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Adding a method"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```\n")]
    assert len(snippet.strip().splitlines()) < 40
    try:
        exec(compile(snippet, "README.md", "exec"), {})
        out = tmp_path / "out"
        assert main(["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "my-method",
                     "--bits", "8", "--limit", "1", "--calib-size", "1", "--out", str(out),
                     "--method-option", "my-method.percentile=99.9"]) == 0
    finally:
        METHODS._factories.pop("my-method", None)
    with sqlite3.connect(out / "ptqbench.sqlite") as conn:
        (stored,) = conn.execute("SELECT method_config FROM runs WHERE method = 'my-method'").fetchone()
    assert json.loads(stored) == {"percentile": 99.9, "weight_ranges": 20}
    capsys.readouterr()


def test_the_readme_toy_task_runs_like_a_builtin(tmp_path, capsys):
    """The "Adding a task" example of the README, as a new user would use it: registered, then
    run from the command line with a method, scored, and stored in the leaderboard."""
    from ptqbench.tasks.base import TASKS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Adding a task"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```\n")]
    try:
        exec(compile(snippet, "README.md", "exec"), {})
        out = tmp_path / "out"
        assert main(["run", "--tasks", "squares", "--methods", "minmax", "--bits", "8", "--calib-size", "2",
                     "--data-root", str(tmp_path), "--out", str(out), "--device", "cpu"]) == 0
    finally:
        TASKS._factories.pop("squares", None)
    rows = _rows(out / "leaderboard_squares.csv")
    assert [(r["method"], r["bits"], r["images"]) for r in rows] == [("fp", "fp", "6"), ("minmax", "W8A8", "6")]
    assert all(0.0 <= float(r["mIoU"]) <= 100.0 for r in rows)
    capsys.readouterr()


def test_task_options_reach_the_tasks_that_take_them(small_demo, tmp_path, capsys):
    """A plain `--task-option` goes to every task of the run that takes it, `TASK.KEY=VALUE` to
    that task only; a key that no task of the run takes is one error line."""
    from ptqbench.tasks.base import route_task_options

    takes = {"coco": (), "dota": ("window", "gap"), "ade20k": ("mode", "split")}
    assert route_task_options((("mode", "gt"), ("dota.gap", "0"), ("window", "200")), takes) == {
        "coco": (), "dota": (("gap", "0"), ("window", "200")), "ade20k": (("mode", "gt"),)}
    with pytest.raises(ConfigError, match="no task of this run takes the option 'mdoe'"):
        route_task_options((("mdoe", "gt"),), takes)
    with pytest.raises(ConfigError, match="no task of this run takes the option 'mode'"):
        route_task_options((("dota.mode", "gt"),), takes)
    out = tmp_path / "out"
    assert main(["run", "--data-root", str(small_demo), "--tasks", "dota,ade20k", "--methods", "fp",
                 "--task-option", "mode=gt", "--task-option", "dota.window=128", "--out", str(out)]) == 0
    assert main(["run", "--data-root", str(small_demo), "--tasks", "dota", "--methods", "fp",
                 "--task-option", "mode=gt", "--out", str(out)]) == 2
    assert "no task of this run takes the option 'mode'" in capsys.readouterr().err
