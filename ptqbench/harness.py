"""The grid: model -> FP row -> methods x bits -> calibrate -> seal -> evaluate -> store.

Every finished cell is one record in the SQLite store and the leaderboards are regenerated
after each cell, so an interrupted run loses at most the cell in progress; re-running skips
finished cells (resume). A cell that fails with an unexpected exception stops the run with a
`CellError` naming the cell; its traceback is written under `<out>/errors/`.

Each quantized cell is sealed after calibration (`seal_for_evaluation`: every site quantizes
every element, except the FP sites its method declares in `fp_sites`). The FP row is evaluated
through `fp_twin` of the model (the quantizable twin with every site off, not sealed:
segment_anything's numbers bit for bit), so it runs the same forward as the quantized cells.
The whole grid runs with cuDNN's deterministic algorithms, as the reference code bases run
(`ptqbench.determinism`).

Under torchrun (see `ptqbench.distributed`) every rank builds the model and the tasks; rank 0
decides what to skip, calibrates and seals each cell and sends the sealed model to the other
ranks; every rank predicts its shard of the evaluation images; rank 0 gathers the per-image
results in image order, scores them and alone writes the store, the leaderboards and the
artefacts. The metrics equal those of one process computing with the same kernels (on the
CPU: the same number of threads per process, as matmul results depend on it).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptqbench.config import DEFAULT_CALIB_SIZE, BitSpec, RunConfig
from ptqbench.determinism import deterministic_cudnn
from ptqbench.distributed import DistributedContext
from ptqbench.errors import CellError, ConfigError, PtqbenchError
from ptqbench.methods.base import METHODS
from ptqbench.methods.options import (
    NO_OPTIONS_JSON,
    config_id,
    config_json,
    options_by_method,
    preset_config,
    with_options,
)
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSet
from ptqbench.models.checkpoints import load_model
from ptqbench.models.spec import MODELS, LoadedModel
from ptqbench.progress import GridProgress, format_duration
from ptqbench.prompts.protocol import TaskPrompts, plan_task_prompts
from ptqbench.quant.sealed_state import load_sealed_state, sealed_state
from ptqbench.quant.sites import seal_for_evaluation
from ptqbench.results import (
    REPORT_MAPS_FILE,
    RUNS_DIR,
    STORE_FILENAME,
    RunRecord,
    RunStore,
    cell_folder,
    now_iso,
    write_leaderboards,
)
from ptqbench.tasks.base import TASKS, Task, TaskConfig, route_task_options
from ptqbench.tasks.bootstrap import Resampled, resample
from ptqbench.types import CalibrationItem

log = logging.getLogger(__name__)

DEMO = "demo"
UNOFFICIAL = "unofficial-checkpoint"


@dataclass(frozen=True)
class ResolvedRun:
    """A RunConfig with its defaults decided (data root, preset, device), names validated, and
    each method's effective configuration (its preset's, with the run's method options set)."""

    config: RunConfig
    data_root: Path
    is_demo: bool
    preset: str
    device: torch.device
    method_configs: dict[str, object]


def resolve(config: RunConfig, *, model_given: bool) -> ResolvedRun:
    """Validate names and decide the defaults that depend on other options."""
    MODELS.canonical(config.model)
    for name in config.tasks:
        TASKS.canonical(name)
    for name in config.methods:
        METHODS.canonical(name)
    data_root, is_demo = _data_root(config, model_given)
    preset = config.preset or MODELS.get(config.model)().default_preset
    return ResolvedRun(config, data_root, is_demo, preset, _device(config.device), _method_configs(config, preset))


def _method_configs(config: RunConfig, preset: str) -> dict[str, object]:
    """Each method's configuration under `preset` with the run's method options set; ConfigError
    for options of a method that is not in the run, or that its configuration does not have."""
    methods = [METHODS.canonical(name) for name in config.methods]
    options = options_by_method(tuple((METHODS.canonical(m), n, v) for m, n, v in config.method_options))
    for name in options:
        if name not in methods:
            raise ConfigError(f"method options are given for {name!r}, which is not among the methods of "
                              f"this run ({', '.join(methods)})")
    return {name: with_options(preset_config(METHODS.get(name), preset), options.get(name, {}), name)
            for name in methods}


def _data_root(config: RunConfig, model_given: bool) -> tuple[Path, bool]:
    if config.data_root == DEMO or (config.data_root is None and not model_given
                                    and "PTQBENCH_DATASETS" not in os.environ):
        from ptqbench.demo.install import ensure_demo_data

        return ensure_demo_data(), True
    root = Path(config.data_root or os.environ.get("PTQBENCH_DATASETS", "datasets")).expanduser()
    if not root.is_dir():
        from ptqbench.errors import DataError

        raise DataError(f"data root {root} does not exist (set --data-root or PTQBENCH_DATASETS; "
                        "see datasets/README.md for the expected layout)")
    return root, False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("ptqbench", "torch", "segment_anything", "numpy", "pycocotools"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _model_labels(loaded: LoadedModel) -> tuple[str, ...]:
    """The caveats every row of this model carries: "untrained" for the seeded random init,
    UNOFFICIAL for weights that are not the model's official (or shipped) checkpoint."""
    if not loaded.trained:
        return ("untrained",)
    official = MODELS.get(loaded.name)().sha256
    if official is not None and loaded.checkpoint_sha256 != official:
        return (UNOFFICIAL,)
    return ()


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


class Harness:
    """Runs one resolved configuration against the store under `config.out`.

    dist: this process's place in a torchrun job (default: one process on `run.device`); only
    its main rank opens the store and shows progress bars.
    """

    def __init__(self, run: ResolvedRun, *, progress: bool = True, dist: DistributedContext | None = None) -> None:
        self.run = run
        self.config = run.config
        self.dist = dist if dist is not None else DistributedContext(device=run.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.out = Path(self.config.out)
        self.store: RunStore | None = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.store = RunStore(self.out / STORE_FILENAME)
        self.versions = _versions()
        self.git_commit = _git_commit()
        self.prompt_plans: dict[str, TaskPrompts] = {}
        self.fp_cell_dirs: dict[str, Path] = {}
        self.fp_resampled: dict[str, Resampled | None] = {}
        quantized = [name for name in self.config.methods if METHODS.canonical(name) != "fp"]
        cells_per_task = 1 + len(quantized) * len(self.config.bits) * len(self.config.seeds)
        self.grid = GridProgress(len(self.config.tasks) * cells_per_task, fp_cells=len(self.config.tasks))

    def execute(self) -> None:
        """Run the grid, with cuDNN's deterministic algorithms as the reference code bases
        (`ptqbench.determinism`)."""
        with deterministic_cudnn():
            self._execute()

    def _execute(self) -> None:
        tasks = self._checked_tasks()
        loaded = self.dist.main_first(lambda: load_model(self.config.model, self.config.checkpoint,
                                                         progress=self.progress))
        labels = _model_labels(loaded)
        if not loaded.trained:
            log.warning("model %s is untrained (seeded random weights): its scores say nothing about a method",
                        loaded.name)
        elif labels:
            log.warning("model %s: %s is not its official checkpoint; its rows are labelled %s",
                        loaded.name, loaded.checkpoint_path, UNOFFICIAL)
        for task in tasks:
            log.info("task %s: %s", task.name, task.describe())
            self._run_task(task, loaded, labels)

    def _checked_tasks(self) -> list[Task]:
        """Every task of the grid, its inputs checked before the model loads and the first cell.

        Building a task checks its data and prompt paths; on the main rank its evaluation split
        is opened, its evaluation prompts (or semantic priors) are parsed by the reader its
        evaluation uses (`Task.check_eval_inputs`) and, when a method quantizes, one calibration
        item is read (which opens the calibration split and parses the calibration prompts), so
        a missing split or a bad prompts file fails here, not after the FP cell.
        """
        input_size = MODELS.get(self.config.model)().input_size
        options = route_task_options(self.config.task_options,
                                     {name: TASKS.get(name).options for name in self.config.tasks})
        quantizes = any(METHODS.canonical(name) != "fp" for name in self.config.methods)
        for name in self.config.tasks:
            self.prompt_plans[name] = self.dist.main_first(lambda name=name: plan_task_prompts(
                name, self.config, self.run.data_root, options[name], quantizes=quantizes, device=str(self.device),
                progress=self.progress))
        tasks = [self._make_task(name, input_size) for name in self.config.tasks]
        if self.dist.is_main:
            for task in tasks:
                with self._cell_failures(self.config.model, task.name, "inputs", "-"):
                    task.eval_image_count(self.config.limit)
                    task.check_eval_inputs()
                    if quantizes:
                        task.calibration_items(1, self.config.seeds[0])
        return tasks

    def _make_task(self, name: str, input_size: int) -> Task:
        """The task with the prompt sources of its plan (`plan_task_prompts`: the flags' under the
        gt protocol, the generated or given detector prompts under the paper protocol)."""
        plan = self.prompt_plans[name]
        factory = TASKS.get(name)
        task = factory(TaskConfig(
            data_root=self.run.data_root, prompts=plan.prompts, calib_prompts=plan.calib_prompts,
            calib_split=self.config.calib_split, model_input_size=input_size, options=plan.options))
        self.prompt_plans.setdefault(task.name, plan)
        return task

    def _record(self, loaded: LoadedModel, task: Task, dataset_fingerprint: str, method: str,
                spec: BitSpec | None, seed: int, calib_fingerprint: str, labels: tuple[str, ...]) -> dict:
        """The identity fields of one cell (`RunStore.cell_key`'s arguments): the evaluation set
        is the dataset fingerprint (data, split and prompt files) and the number of images `--limit`
        leaves; the prompts' protocol and detector come from the task's prompt plan."""
        plan = self.prompt_plans[task.name]
        return dict(
            model=loaded.name, checkpoint_sha256=loaded.checkpoint_sha256, task=task.name,
            dataset_fingerprint=dataset_fingerprint, prompts=plan.label, protocol=plan.protocol,
            detector=plan.detector,
            images=task.eval_image_count(self.config.limit), method=method,
            bits=spec.label if spec else "fp", preset=self.run.preset if spec else "-",
            method_config=config_json(self.run.method_configs[method]) if spec else NO_OPTIONS_JSON,
            seed=seed, calib_fingerprint=calib_fingerprint, labels=labels)

    def _run_task(self, task: Task, loaded: LoadedModel, labels: tuple[str, ...]) -> None:
        main = self.dist.is_main
        dataset_fingerprint = task.fingerprint() if main else ""
        with self._cell_failures(loaded.name, task.name, "fp", "fp"):
            seed = self.config.seeds[0]
            fp_fields = self._record(loaded, task, dataset_fingerprint, "fp", None, seed, "-", labels) if main else None
            if main:
                self.fp_cell_dirs[task.name] = self._cell_dir(task, fp_fields)
            if self._finished(fp_fields):
                self.grid.skipped(f"{task.name} fp", fp=True)
            else:
                with self.grid.cell(f"{task.name} fp", fp=True):
                    fp_model = loaded.adapter.fp_twin(loaded.model).to(self.device)
                    self._evaluate_cell(task, fp_model, fp_fields, None, seed, calib_s=0.0)
        several = len(self.config.seeds) > 1
        for seed in self.config.seeds:
            calib: CalibrationSet | None = None
            for method_name in self.config.methods:
                method_name = METHODS.canonical(method_name)
                if method_name == "fp":
                    continue
                for spec in self.config.bits:
                    with self._cell_failures(loaded.name, task.name, method_name, spec.label,
                                             seed if several else None):
                        calib = self._quantized_cell(task, loaded, labels, dataset_fingerprint, method_name, spec,
                                                     seed, calib)

    def _quantized_cell(self, task: Task, loaded: LoadedModel, labels: tuple[str, ...], dataset_fingerprint: str,
                        method_name: str, spec: BitSpec, seed: int,
                        calib: CalibrationSet | None) -> CalibrationSet | None:
        """Calibrate, seal and evaluate one method x bits x seed cell unless resume skips it.

        Returns the seed's calibration set, built by the main rank for the first cell that needs it.
        """
        fields = None
        if self.dist.is_main:
            if calib is None:
                items = self._calibration_items(task, seed)
                calib = loaded.adapter.calibration_set(loaded.model, items, self.device)
            fields = self._record(loaded, task, dataset_fingerprint, method_name, spec, seed, calib.fingerprint, labels)
        name = f"{task.name} {method_name} {spec.label}" + (f" seed {seed}" if len(self.config.seeds) > 1 else "")
        if self._finished(fields):
            self.grid.skipped(name)
            return calib
        with self.grid.cell(name):
            qmodel, calib_s, maps = self._calibrated(loaded, method_name, spec, seed, calib)
            self._evaluate_cell(task, qmodel, fields, spec, seed, calib_s=calib_s, maps=maps)
        return calib

    def _calibration_items(self, task: Task, seed: int) -> list[CalibrationItem]:
        """The task's calibration items: `--calib-size` of them, else DEFAULT_CALIB_SIZE.

        A calibration split with fewer gives all it has (the cell key's calibration fingerprint
        hashes the items actually used); a warning only when `--calib-size` asked for more,
        since the default simply takes what a small split (e.g. the demo's) has.
        """
        asked = self.config.calib_size
        items = task.calibration_items(asked if asked is not None else DEFAULT_CALIB_SIZE, seed)
        if asked is not None and len(items) < asked:
            log.warning("%s: the calibration split gives only %d calibration samples (--calib-size %d); "
                        "calibrating on %d", task.name, len(items), asked, len(items))
        return items

    @contextmanager
    def _cell_failures(self, model: str, task: str, method: str, bits: str, seed: int | None = None) -> Iterator[None]:
        """Turn an unexpected exception of one cell into a CellError naming the cell (its seed
        too when the run has several).

        The traceback goes to `<out>/errors/<cell>.log` (one file per rank) and to the debug
        log. PtqbenchError (already one clear line) and KeyboardInterrupt pass unchanged; the
        cells finished before stay in the store.
        """
        try:
            yield
        except PtqbenchError:
            raise
        except Exception as exc:
            cell = f"{model}-{task}-{method}-{bits}" + ("" if seed is None else f"-seed{seed}")
            name = cell if self.dist.is_main else f"{cell}.rank{self.dist.rank}"
            path = self.out / "errors" / f"{name}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback.format_exc())
            log.debug("cell %s failed", cell, exc_info=True)
            lines = str(exc).strip().splitlines() or [""]
            message = lines[0] + (" ..." if len(lines) > 1 else "")
            seed_part = "" if seed is None else f", seed {seed}"
            raise CellError(f"cell (model {model}, task {task}, method {method}, bits {bits}{seed_part}) failed with "
                            f"{type(exc).__name__}: {message} (traceback in {path})") from exc

    def _finished(self, fields: dict | None) -> bool:
        """Whether resume skips this cell; decided on the main rank (the only one with the
        store and the cell's fields) and sent to every rank."""
        finished = self.dist.is_main and self.config.resume and self.store.has(RunStore.cell_key(**fields))
        return self.dist.broadcast_from_main(finished)

    def _calibrated(self, loaded: LoadedModel, method_name: str, spec: BitSpec, seed: int,
                    calib: CalibrationSet | None) -> tuple[nn.Module, float, dict[str, np.ndarray]]:
        """The sealed quantized model of one cell, its calibration seconds and the method's
        `report_maps` (computed after the timing; {} for a method without them or on other ranks).

        The main rank calibrates and seals; with several ranks it broadcasts the sealed state
        (state_dict and per-quantizer attributes), which each other rank loads into its own
        twin of the FP model. Other ranks report 0 calibration seconds (they do not record).
        """
        qmodel = loaded.adapter.quantized_twin(loaded.model, spec.w_bits, spec.a_bits).to(self.device)
        calib_s, maps = 0.0, {}
        if self.dist.is_main:
            config = self.run.method_configs[method_name]
            log.info("calibrating %s %s (%s preset, configuration %s, %d images)", method_name, spec.label,
                     self.run.preset, config_id(config_json(config)), len(calib))
            fp_model = loaded.model.to(self.device)
            torch.manual_seed(seed)
            start = time.perf_counter()
            method = METHODS.get(method_name)(config)
            method.calibrate(qmodel, fp_model, calib, spec, seed)
            seal_for_evaluation(qmodel, getattr(method, "fp_sites", ()))
            calib_s = time.perf_counter() - start
            if hasattr(method, "report_maps"):
                maps = method.report_maps(qmodel, fp_model, calib)
        if self.dist.is_distributed:
            state = self.dist.broadcast_from_main(sealed_state(qmodel) if self.dist.is_main else None)
            if not self.dist.is_main:
                load_sealed_state(qmodel, state)
        return qmodel, calib_s, maps

    def _evaluate(self, task: Task, model: nn.Module, cell_dir: Path) -> dict[str, float] | None:
        """The task's metrics on the main rank (None on the others).

        Each rank predicts its shard of the evaluation images; the main rank gathers the
        per-image results, puts them in image order and scores them (writing under cell_dir).
        With one process this is exactly `task.evaluate`.
        """
        limit = self.config.limit
        indices = self.dist.shard(range(task.eval_image_count(limit)))
        predictions = task.predict(adapter_for(model).predictor(model, self.device), indices, self.progress)
        gathered = self.dist.gather_to_main(list(zip(indices, predictions)))
        if not self.dist.is_main:
            return None
        ordered = [prediction for _, prediction in sorted(gathered, key=lambda pair: pair[0])]
        return task.score(ordered, limit, cell_dir)

    def _evaluate_cell(self, task: Task, model: nn.Module, fields: dict | None, spec: BitSpec | None, seed: int, *,
                       calib_s: float, maps: dict[str, np.ndarray] | None = None) -> None:
        device = self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cell_dir = None
        if self.dist.is_main:
            cell_dir = self._cell_dir(task, fields)
            cell_dir.mkdir(parents=True, exist_ok=True)
            if maps:
                np.savez_compressed(cell_dir / REPORT_MAPS_FILE, **maps)
        torch.manual_seed(seed)
        start = time.perf_counter()
        metrics = self._evaluate(task, model, cell_dir)
        eval_s = time.perf_counter() - start
        if not self.dist.is_main:
            return
        intervals, delta_interval = self._intervals(task, cell_dir, is_fp=spec is None)
        record = RunRecord(
            **fields, w_bits=spec.w_bits if spec else None, a_bits=spec.a_bits if spec else None,
            metrics=metrics, metric=task.metric, calib_s=calib_s, eval_s=eval_s,
            intervals=intervals, delta_interval=delta_interval,
            peak_mem_mb=_peak_memory_mb(device), versions=self.versions,
            device=str(device) if not self.dist.is_distributed else f"{device.type} x{self.dist.world_size}",
            git_commit=self.git_commit, created_at=now_iso())
        self.store.put(record)
        write_leaderboards(self.store, self.out, task=task.name)
        calibration = f" · calibration {format_duration(calib_s)}" if spec else ""
        self.grid.finished(f"{task.metric} = {metrics[task.metric]:.2f}{calibration} · "
                           f"evaluation {format_duration(eval_s)}")

    def _cell_dir(self, task: Task, fields: dict) -> Path:
        """The folder of one cell's artefacts (`results.cell_folder`) under `<out>/runs/`."""
        return self.out / RUNS_DIR / cell_folder(fields)

    def _intervals(self, task: Task, cell_dir: Path, *, is_fp: bool) -> tuple[dict[str, list[float]],
                                                                               list[float] | None]:
        """The cell's 95% bootstrap intervals ({metric: [low, high]}) and, for a quantized cell, the
        paired interval of its headline difference to the FP cell of the same evaluation (None
        when that cell kept no statistics); ({}, None) with `--bootstrap 0`. The FP cell's
        resamples are drawn once per task (`_fp_resampled`) and shared by its quantized cells."""
        resamples = self.config.bootstrap
        statistics = task.load_statistics(cell_dir) if resamples else None
        if statistics is None:
            return {}, None
        drawn = resample(statistics, resamples)
        intervals = {name: [interval.low, interval.high] for name, interval in drawn.intervals().items()}
        if is_fp:
            self.fp_resampled[task.name] = drawn
            return intervals, None
        reference = self._fp_resampled(task)
        if reference is None or not np.array_equal(reference.image_keys, drawn.image_keys):
            return intervals, None
        delta = drawn.difference_intervals(reference)[task.metric]
        return intervals, [delta.low, delta.high]

    def _fp_resampled(self, task: Task) -> Resampled | None:
        """The FP cell's resamples of this run's evaluation of `task`: drawn when it was evaluated,
        else (a resumed FP cell) from the statistics its folder kept; None without them."""
        if task.name not in self.fp_resampled:
            statistics = task.load_statistics(self.fp_cell_dirs[task.name])
            self.fp_resampled[task.name] = (None if statistics is None
                                            else resample(statistics, self.config.bootstrap))
        return self.fp_resampled[task.name]
