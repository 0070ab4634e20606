"""The Task base class: a dataset protocol that turns a predictor into metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ptqbench.errors import ConfigError
from ptqbench.registry import Registry
from ptqbench.tasks.bootstrap import ImageStatistics
from ptqbench.types import CalibrationItem

T = TypeVar("T")
# A cell's per-image statistics (`tasks.bootstrap`), written by `score` beside its other artefacts.
STATISTICS_FILE = "image_stats.npz"

if TYPE_CHECKING:
    from ptqbench.models.prediction import Predictor


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task needs to find its data and prompts.

    data_root: the folder holding the official layouts (`coco/`, `DOTA/`, `ADEChallengeData2016/`).
    prompts: evaluation prompt source (a COCO detection JSON, a DOTA Task1 folder) or None for GT.
    calib_prompts: calibration prompt source, or None for GT boxes.
    calib_split: override of the calibration split name (e.g. `validation` for ADE20K).
    model_input_size: the SAM input side (1024 for full-size SAM, 256 for sam_tiny); tasks that
        split images into windows derive their default window from it.
    options: task-specific settings (e.g. {"mode": "ssa", "semantic_prior": "DIR"}).
    """

    data_root: Path
    prompts: str | None = None
    calib_prompts: str | None = None
    calib_split: str | None = None
    model_input_size: int = 1024
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


def route_task_options(options: Sequence[tuple[str, str]],
                       takes: Mapping[str, Sequence[str]]) -> dict[str, tuple[tuple[str, str], ...]]:
    """The `--task-option`s of each task of a run. takes: task name -> the keys it takes.

    "TASK.KEY=VALUE" goes to that task only; a plain "KEY=VALUE" to every task of the run that
    takes KEY, so `--task-option mode=ssa` reaches ADE20K and not DOTA. ConfigError for a key that
    no task it is meant for takes.
    """
    routed: dict[str, list[tuple[str, str]]] = {name: [] for name in takes}
    for key, value in options:
        prefix, dot, rest = key.partition(".")
        if dot and prefix in takes:
            key, targets = rest, [prefix] if rest in takes[prefix] else []
        else:
            targets = [name for name, keys in takes.items() if key in keys]
        if not targets:
            offered = "; ".join(f"{name}: {', '.join(keys) or 'none'}" for name, keys in takes.items())
            raise ConfigError(f"no task of this run takes the option {key!r} (options: {offered})")
        for name in targets:
            routed[name].append((key, value))
    return {name: tuple(pairs) for name, pairs in routed.items()}


class Task(ABC):
    """A task reads its split(s) below `config.data_root` and scores a predictor.

    A subclass is constructed from a `TaskConfig` and registered as a class (`@TASKS.register`).
    It implements the abstract steps; `evaluate` (predict, then score) and `check_eval_inputs`
    (nothing to check) are shared. A task with a `statistics_type` also keeps the cell's per-image
    statistics in `score` (`save_statistics`), from which the harness draws the bootstrap intervals.
    """

    name: str
    metric: str                # the headline metric key, e.g. "mask_AP"
    metrics: tuple[str, ...]   # every key `evaluate` returns, headline first
    options: tuple[str, ...] = ()  # the `--task-option` keys the task takes
    statistics_type: type | None = None  # its per-image statistics, kept by `score` (CocoImageStats, ...)

    def check_options(self, config: TaskConfig) -> None:
        """ConfigError naming every option key of `config` that this task does not take
        (`options`), and the valid ones."""
        unknown = sorted(set(dict(config.options)) - set(self.options))
        if unknown:
            raise ConfigError(f"unknown {self.name} option(s) {', '.join(unknown)}; valid options: "
                              f"{', '.join(self.options)}")

    def int_option(self, config: TaskConfig, key: str, default: int | None, minimum: int) -> int | None:
        """The integer option `key` of `config` (`default` when unset); ConfigError when it is not
        an integer of at least `minimum`."""
        text = config.option(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise ConfigError(f"{self.name} option {key}={text!r}: expected an integer of at least {minimum}")
        return value

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash of the evaluation + calibration data and prompts (keys the run store)."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying which data and prompts the task uses."""

    @abstractmethod
    def calibration_items(self, n: int, seed: int) -> list[CalibrationItem]:
        """The first `n` calibration images with their box prompts, in `calibration_order(seed)`
        of the split's file order (all of them, fewer than `n`, when the split has fewer)."""

    def load_statistics(self, out_dir: Path) -> ImageStatistics | None:
        """The per-image statistics `score` kept under `out_dir` (`statistics_type`); None for a
        task that keeps none (its rows get no bootstrap intervals) or a cell scored without them."""
        return None if self.statistics_type is None else load_statistics(self.statistics_type, out_dir)

    @abstractmethod
    def eval_image_count(self, limit: int | None) -> int:
        """How many evaluation images `evaluate(limit=limit)` scores."""

    def check_eval_inputs(self) -> None:
        """Read the evaluation inputs `predict` uses besides the split itself (a detector prompt
        file or folder, semantic prior maps) with the readers `predict` uses, so that a missing
        or malformed one raises DataError before the model loads; nothing for GT prompts."""
        return None

    @abstractmethod
    def predict(self, predictor: Predictor, indices: Sequence[int], progress: bool = False) -> list[Any]:
        """Phase 1 of `evaluate`: the per-image results of the evaluation images at `indices`.

        predictor: the model's (`ptqbench.models.prediction.Predictor`); the built-in tasks send
        their box prompts through `predictor.stream` (images read ahead in threads, the model
        batched), which gives exactly what `set_image` + `predict_boxes` give image by image.
        indices: positions in the task's evaluation order (0 <= i < eval_image_count(None)).
        Returns one picklable result per index, in the order of `indices`; writes nothing.
        Images are independent, so data-parallel ranks can each predict a shard of them.
        """

    @abstractmethod
    def score(self, results: Sequence[Any], limit: int | None, out_dir: Path) -> dict[str, float]:
        """Phase 2 of `evaluate`: the metrics of the per-image results of the first
        `eval_image_count(limit)` images (in evaluation order); writes artefacts under out_dir."""

    def evaluate(self, predictor: Predictor, *, limit: int | None, progress: bool,
                 out_dir: Path) -> dict[str, float]:
        """Run the protocol on the evaluation split; write artefacts under out_dir.

        Equals `score(predict(predictor, range(eval_image_count(limit)), progress), limit, out_dir)`.
        """
        indices = range(self.eval_image_count(limit))
        return self.score(self.predict(predictor, indices, progress), limit, out_dir)


def check_result_count(task: str, results: Sequence[Any], expected: int) -> None:
    """`score` gets exactly one result per evaluated image (ValueError otherwise)."""
    if len(results) != expected:
        raise ValueError(f"{task}: score got {len(results)} per-image results for {expected} evaluation images")


TASKS: Registry[Task] = Registry("task", entry_point_group="ptqbench.tasks")


def calibration_order(items: Sequence[T], seed: int) -> list[T]:
    """The order in which a task takes calibration images: seed 0 keeps the split's own order
    (the reference protocol: the first N images); any other seed a seeded random permutation of it
    (numpy's default_rng(seed)), so that `--seeds` draws other calibration sets."""
    if seed == 0:
        return list(items)
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def save_statistics(statistics: ImageStatistics, out_dir: Path) -> None:
    """Write a cell's per-image statistics to `out_dir/STATISTICS_FILE` (compressed arrays)."""
    np.savez_compressed(Path(out_dir) / STATISTICS_FILE, **statistics.to_arrays())


def load_statistics(kind: type, out_dir: Path) -> ImageStatistics | None:
    """The per-image statistics `save_statistics` wrote under `out_dir` as a `kind` (e.g.
    CocoImageStats); None when the folder has none (a cell scored before they were kept)."""
    path = Path(out_dir) / STATISTICS_FILE
    if not path.is_file():
        return None
    with np.load(path) as arrays:
        return kind.from_arrays({name: arrays[name] for name in arrays.files})
