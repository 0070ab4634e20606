"""Command-line interface: argument parsing and up-front checks; the work is done by harness,
results and tasks.

Every bad input (a flag, a YAML value, a name, an output path) is checked before torch, the
methods or the tasks are imported, and ends as one line on stderr and exit code 2; so do
library errors (`PtqbenchError`) and a cell that fails with an unexpected exception: the
harness turns it into a `CellError` naming the cell and writes its traceback under
`<out>/errors/`; the cells finished before it stay in the store. Ctrl-C and SIGTERM end the
run with one line; finished cells are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ptqbench.config import RunConfig, load_config_file, parse_bits, parse_seeds, split_names
from ptqbench.errors import ConfigError, PtqbenchError
from ptqbench.methods.options import parse_method_options
from ptqbench.prompts.command import add_prompts_parser
from ptqbench.prompts.zoo import check_detector, parse_detector_options
from ptqbench.registry import check_name

log = logging.getLogger("ptqbench")

DESCRIPTION = """\
Benchmark post-training quantization (PTQ) methods on Segment Anything (SAM).

`ptqbench run` calibrates each method at each bit width, evaluates the quantized model on
each task (COCO instance segmentation, DOTA oriented boxes, ADE20K semantic segmentation)
next to the full-precision model, and writes the results store and leaderboards. With no
model and no data flags it runs a small demo on CPU in a few minutes."""

EPILOG = """\
examples:
  ptqbench run                                   # the demo: sam_tiny on synthetic data
  ptqbench run --model sam_vit_b --data-root /data --tasks coco --methods saqsam,mse --bits 4,6
  ptqbench run --protocol paper --model sam_vit_b --data-root /data --tasks coco   # detector prompts
  ptqbench prompts coco --detector fasterrcnn_resnet50_fpn --data-root /data --split val2017
  ptqbench list methods
  ptqbench leaderboard --out results

`ptqbench COMMAND --help` lists the options of a command."""

MAX_DEFAULT_THREADS = 8


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `ptqbench: error:` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"ptqbench: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _verbose_parent() -> argparse.ArgumentParser:
    """`-v` for a sub-command; SUPPRESS keeps the top-level value unless given after it."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging (pycocotools summary, per-class DOTA AP, ...)")
    return parent


def _add_run_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", parents=parents, help="calibrate and evaluate a grid of methods x bit widths x tasks",
                       description="Calibrate and evaluate a grid of methods x bit widths x tasks; finished "
                                   "cells are kept in the store and skipped when the run is repeated.")
    p.add_argument("--config", help="YAML file with run options, keys = the long flag names (flags override it)")
    p.add_argument("--model", help="sam_tiny (default), sam_vit_b, sam_vit_l or sam_vit_h")
    p.add_argument("--checkpoint", help="model weights file (else the cache, else a one-time download)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every registered task on the demo, else coco)")
    p.add_argument("--methods", help="comma-separated methods, e.g. saqsam,mse (see `ptqbench list methods`)")
    p.add_argument("--bits", help="comma-separated bit widths: 4,6 = W4A4,W6A6; w4a8 sets both")
    p.add_argument("--data-root", help="folder with coco/, DOTA/, ADEChallengeData2016/ ('demo' = the demo data)")
    p.add_argument("--prompts", help="evaluation prompts: COCO detection JSON or DOTA Task1 folder (default: GT boxes)")
    p.add_argument("--calib-prompts", help="calibration prompts file (default: GT boxes)")
    p.add_argument("--calib-split", help="calibration split name (default: the task's train split)")
    p.add_argument("--calib-size", type=_positive_int,
                   help="number of calibration samples (default 32, or all the calibration split has when fewer)")
    p.add_argument("--limit", type=_positive_int, help="evaluate only the first N images")
    p.add_argument("--bootstrap", type=_non_negative_int,
                   help="resamples of the evaluation images for the 95%% intervals (default 1000, 0 = none)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", help="seed of every random choice of the quantized cells (default 0)")
    p.add_argument("--seeds", help="several calibration draws, e.g. 0,1,2: every quantized cell once per seed")
    p.add_argument("--preset", help="paper or fast (default: fast for sam_tiny, paper otherwise)")
    p.add_argument("--out", help="output folder for the store and leaderboards (default ./results)")
    p.add_argument("--no-resume", action="store_true", help="recompute cells already in the store")
    p.add_argument("--threads", type=_positive_int,
                   help=f"CPU threads of torch (default: $OMP_NUM_THREADS if set, else the physical cores, "
                        f"at most {MAX_DEFAULT_THREADS})")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task-specific option, e.g. mode=ssa or semantic_prior=DIR (repeatable)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="set a field of a method's configuration, e.g. saqsam.pcc.max_prompts=8 or "
                        "mse.weight_ranges=50 (repeatable; the fields are in each method's card)")
    p.add_argument("--protocol", choices=("gt", "paper"),
                   help="gt (default): the --prompts files, else ground-truth boxes; paper: an FP detector's boxes "
                        "for evaluation and calibration, generated when missing (see datasets/README.md)")
    p.add_argument("--detector", help="the paper protocol's COCO detector (default fasterrcnn_resnet50_fpn)")
    p.add_argument("--detector-weights", help="the detector's weights: default (torchvision's), random, or a "
                                              "state dict file")
    p.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a detector setting: score_threshold, nms, max_per_image, min_size, max_size, batch_size "
                        "(repeatable; defaults 0.05, 0.5, 100, 800, 1333, 4)")


def _add_evaluate_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", parents=parents, help="score existing predictions with a task's evaluator",
                       description="Score existing predictions with a task's evaluator and print the metrics.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    coco = tasks.add_parser("coco", parents=parents, help="score a COCO segm results JSON")
    coco.add_argument("--results", required=True, help="COCO results-format segm JSON to score")
    coco.add_argument("--split", default="val2017", help="split the results are for (default val2017)")
    dota = tasks.add_parser("dota", parents=parents, help="score a folder of DOTA Task1_<class>.txt files")
    dota.add_argument("--detections", required=True, help="folder of Task1_<class>.txt detection files")
    dota.add_argument("--split", default="val", help="split the detections are for (default val)")
    ade = tasks.add_parser("ade20k", parents=parents, help="score a folder of prediction PNGs (0..149, 255 = none)")
    ade.add_argument("--predictions", required=True, help="folder of <image>.png class maps")
    ade.add_argument("--split", default="validation", help="split the predictions are for (default validation)")
    for task_parser in (coco, dota, ade):
        task_parser.add_argument("--data-root", help="dataset root (default $PTQBENCH_DATASETS, else ./datasets)")
        task_parser.add_argument("--json", help="also write the metrics to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    """The `ptqbench` parser with its sub-commands run, list, leaderboard, report, evaluate and prompts."""
    parser = _Parser(prog="ptqbench", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (also after the command)")
    parents = [_verbose_parent()]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub, parents)
    listing = sub.add_parser("list", parents=parents, help="list the available methods, tasks or models",
                             description="List the available methods (with a line each), tasks or models.")
    listing.add_argument("what", choices=("methods", "tasks", "models"), help="what to list")
    board = sub.add_parser("leaderboard", parents=parents, help="print the leaderboard of a results folder",
                           description="Print the leaderboard of a results folder.")
    board.add_argument("--out", default="results", help="results folder of a run (default ./results)")
    board.add_argument("--task", help="one task (default: every task in the store)")
    board.add_argument("--by-seed", action="store_true", help="one row per calibration seed (default: their mean)")
    report = sub.add_parser("report", parents=parents, help="write the HTML report (figures) of a results folder",
                            description="Write <out>/report.html (figures inlined) and <out>/report/*.png.")
    report.add_argument("--out", default="results", help="results folder of a run (default ./results)")
    _add_evaluate_parser(sub, parents)
    add_prompts_parser(sub, parents)
    return parser


def _seeds(args: argparse.Namespace) -> tuple[int, ...] | None:
    """The seeds `--seed N` or `--seeds A,B,...` give (None when neither; ConfigError for both)."""
    if args.seed is not None and args.seeds is not None:
        raise ConfigError("give --seed or --seeds, not both")
    if args.seed is not None:
        seeds = parse_seeds(args.seed, "--seed")
        if len(seeds) != 1:
            raise ConfigError(f"--seed takes one integer (--seeds takes several), got {args.seed!r}")
        return seeds
    return parse_seeds(args.seeds) if args.seeds is not None else None


def _run_config(args: argparse.Namespace) -> tuple[RunConfig, set[str]]:
    """The RunConfig of `run` (the YAML file, then the flags) with its names checked and made
    canonical and its output folder checked, all before torch is imported; and the names of
    the options the file or a flag set."""
    values = load_config_file(args.config) if args.config else {}
    overrides = dict(
        model=args.model, checkpoint=args.checkpoint, data_root=args.data_root, prompts=args.prompts,
        calib_prompts=args.calib_prompts, calib_split=args.calib_split, calib_size=args.calib_size,
        limit=args.limit, bootstrap=args.bootstrap, device=args.device, seeds=_seeds(args), preset=args.preset,
        out=args.out,
        tasks=split_names(args.tasks, "--tasks") if args.tasks is not None else None,
        methods=split_names(args.methods, "--methods") if args.methods is not None else None,
        bits=parse_bits(args.bits) if args.bits is not None else None,
        resume=False if args.no_resume else None,
        task_options=_task_options(args.task_option) if args.task_option else None,
        method_options=(values.get("method_options", ()) + parse_method_options(args.method_option)
                        if args.method_option else None),
        protocol=args.protocol, detector=args.detector, detector_weights=args.detector_weights,
        detector_options=(values.get("detector_options", ()) + _task_options(args.detector_option, "--detector-option")
                          if args.detector_option else None),
    )
    config = RunConfig(**values).with_overrides(**overrides)
    config = config.with_overrides(
        model=check_name("model", config.model),
        tasks=tuple(check_name("task", name) for name in config.tasks),
        methods=tuple(check_name("method", name) for name in config.methods),
        method_options=tuple((check_name("method", method), name, value)
                             for method, name, value in config.method_options),
        detector=check_detector(config.detector) if config.detector else None)
    parse_detector_options(config.detector_options)
    _check_out_dir(Path(config.out))
    given = set(values) | {name for name, value in overrides.items() if value is not None}
    return config, given


def _run(args: argparse.Namespace) -> None:
    config, given = _run_config(args)
    threads = configure_threads(args.threads)
    from ptqbench import harness
    from ptqbench.distributed import DistributedContext

    model_given = "model" in given
    if not given & {"model", "data_root", "tasks"}:
        from ptqbench.tasks.base import TASKS

        config = config.with_overrides(tasks=tuple(TASKS.names()))
    run = harness.resolve(config, model_given=model_given)
    if run.is_demo:
        log.info("using the embedded demo: %s + synthetic demo data in %s (preset %s)",
                 config.model, run.data_root, run.preset)
    elif config.preset is None:
        log.info("preset %s (default for %s)", run.preset, config.model)
    dist = DistributedContext.from_env(run.device)
    if run.device.type == "cpu":
        log.info("%d CPU threads (--threads to change)", threads)
    try:
        if dist.is_distributed:
            log.info("data-parallel run: %d processes, rank 0 on %s", dist.world_size, dist.device)
        harness.Harness(run, dist=dist).execute()
    finally:
        dist.destroy()
    log.info("leaderboards written to %s", Path(config.out).resolve())


def configure_threads(requested: int | None) -> int:
    """Set torch's CPU threads and return their number: `requested`, else what
    $OMP_NUM_THREADS set, else torch's default (the physical cores) capped at
    MAX_DEFAULT_THREADS, since more threads than free cores slow a busy machine down 10-100x."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), MAX_DEFAULT_THREADS))
    return torch.get_num_threads()


def _check_out_dir(path: Path) -> None:
    """ConfigError unless `path` is a writable folder or one that can be created."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder")
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path} cannot be written: no write permission on {existing}")


def _check_writable_file(path: Path, option: str) -> None:
    """ConfigError unless a file can be written at `path` (its folder exists and is writable)."""
    folder = path.absolute().parent
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder, not a file")
    if not folder.is_dir():
        raise ConfigError(f"{option} {path} cannot be written: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path} cannot be written: no write permission")


def _task_options(pairs: list[str], option: str = "--task-option") -> tuple[tuple[str, str], ...]:
    options = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        options.append((key.strip(), value.strip()))
    return tuple(options)


def _list(args: argparse.Namespace) -> None:
    """The registered names, one a line; methods with the summary of their docstring."""
    if args.what == "methods":
        from ptqbench.methods.base import METHODS

        names = METHODS.names()
        width = max(map(len, names))
        sys.stdout.write("".join(f"{name:<{width}}  {METHODS.describe(name)}\n" for name in names))
        return
    if args.what == "tasks":
        from ptqbench.tasks.base import TASKS as registry
    else:
        from ptqbench.models.spec import MODELS as registry
    sys.stdout.write("\n".join(registry.names()) + "\n")


def _leaderboard(args: argparse.Namespace) -> None:
    from ptqbench.results import STORE_FILENAME, RunStore, format_leaderboard

    path = Path(args.out) / STORE_FILENAME
    if not path.is_file():
        raise ConfigError(f"no results store at {path}: run `ptqbench run` first or pass --out")
    sys.stdout.write(format_leaderboard(RunStore(path), args.task, by_seed=args.by_seed) + "\n")


def _report(args: argparse.Namespace) -> None:
    from ptqbench.report.page import write_report

    sys.stdout.write(f"report written to {write_report(Path(args.out))}\n")


def _evaluate(args: argparse.Namespace) -> None:
    if args.json:
        _check_writable_file(Path(args.json), "--json")
    data_root = Path(args.data_root or os.environ.get("PTQBENCH_DATASETS", "datasets"))
    if args.task == "coco":
        from ptqbench.tasks.coco import score_results_file

        metrics = score_results_file(Path(args.results), data_root, args.split)
    elif args.task == "dota":
        from ptqbench.tasks.dota_eval import score_task1_folder

        metrics = score_task1_folder(Path(args.detections), data_root, args.split)
    else:
        from ptqbench.tasks.ade20k_metric import score_prediction_folder

        metrics = score_prediction_folder(Path(args.predictions), data_root, args.split)
    width = max(map(len, metrics))
    sys.stdout.write("".join(f"{key:<{width}}  {value:8.3f}\n" for key, value in metrics.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")


def _prompts(args: argparse.Namespace) -> None:
    from ptqbench.prompts.command import run_prompts

    run_prompts(args, before_work=lambda: configure_threads(None))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that it ends like Ctrl-C (cells kept)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (in the main thread only, where Python
    delivers signals); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v) on rank 0; WARNING, tagged with the rank, on the other ranks of a
    torchrun job ($RANK, as `ptqbench.distributed.launched_rank` reads it without torch)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {"run": _run, "list": _list, "leaderboard": _leaderboard, "report": _report, "evaluate": _evaluate,
                "prompts": _prompts}
    try:
        with _sigterm_as_interrupt():
            handlers[args.command](args)
    except PtqbenchError as exc:
        sys.stderr.write(f"ptqbench: error: {exc}\n")
        return 2
    except KeyboardInterrupt as exc:
        what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        sys.stderr.write(f"ptqbench: {what}; finished cells are kept in the store\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
