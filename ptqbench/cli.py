"""Command-line interface: argument parsing only; the work is done by harness, results and tasks.

Library errors (`PtqbenchError`) become one line on stderr and exit code 2. So does a cell
that fails with an unexpected exception: the harness turns it into a `CellError` naming the
cell (model, task, method, bits) and writes its traceback under `<out>/errors/`; the cells
finished before it stay in the store.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ptqbench.errors import ConfigError, PtqbenchError

log = logging.getLogger("ptqbench")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="calibrate and evaluate a grid of methods x bit widths x tasks")
    p.add_argument("--config", help="YAML file with run options (flags override it)")
    p.add_argument("--model", help="sam_tiny (default), sam_vit_b, sam_vit_l or sam_vit_h")
    p.add_argument("--checkpoint", help="model weights file (else the cache, else a one-time download)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every registered task on the demo, else coco)")
    p.add_argument("--methods", help="comma-separated methods, e.g. saqsam,mse")
    p.add_argument("--bits", help="comma-separated bit widths: 4,6 = W4A4,W6A6; w4a8 sets both")
    p.add_argument("--data-root", help="folder with coco/, DOTA/, ADEChallengeData2016/ ('demo' = the demo data)")
    p.add_argument("--prompts", help="evaluation prompts: COCO detection JSON or DOTA Task1 folder (default: GT boxes)")
    p.add_argument("--calib-prompts", help="calibration prompts file (default: GT boxes)")
    p.add_argument("--calib-split", help="calibration split name (default: the task's train split)")
    p.add_argument("--calib-size", type=int, help="number of calibration images (default 32)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--preset", help="paper or fast (default: fast for sam_tiny, paper otherwise)")
    p.add_argument("--out", help="output folder for the store and leaderboards (default ./results)")
    p.add_argument("--no-resume", action="store_true", help="recompute cells already in the store")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task-specific option, e.g. mode=ssa or semantic_prior=DIR (repeatable)")


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score existing predictions with a task's evaluator")
    tasks = p.add_subparsers(dest="task", required=True)
    coco = tasks.add_parser("coco", help="score a COCO segm results JSON")
    coco.add_argument("--results", required=True)
    coco.add_argument("--split", default="val2017")
    dota = tasks.add_parser("dota", help="score a folder of DOTA Task1_<class>.txt files")
    dota.add_argument("--detections", required=True)
    dota.add_argument("--split", default="val")
    ade = tasks.add_parser("ade20k", help="score a folder of prediction PNGs (0..149, 255 = none)")
    ade.add_argument("--predictions", required=True)
    ade.add_argument("--split", default="validation")
    for task_parser in (coco, dota, ade):
        task_parser.add_argument("--data-root", help="dataset root (default $PTQBENCH_DATASETS, else ./datasets)")
        task_parser.add_argument("--json", help="write the metrics to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqbench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    listing = sub.add_parser("list", help="list registered methods, tasks or models")
    listing.add_argument("what", choices=("methods", "tasks", "models"))
    board = sub.add_parser("leaderboard", help="print the leaderboard of a results folder")
    board.add_argument("--out", default="results")
    board.add_argument("--task", help="one task (default: every task in the store)")
    _add_evaluate_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> None:
    from ptqbench import harness
    from ptqbench.config import RunConfig, load_config_file, parse_bits, split_names
    from ptqbench.distributed import DistributedContext

    values = load_config_file(args.config) if args.config else {}
    overrides = dict(
        model=args.model, checkpoint=args.checkpoint, data_root=args.data_root, prompts=args.prompts,
        calib_prompts=args.calib_prompts, calib_split=args.calib_split, calib_size=args.calib_size,
        limit=args.limit, device=args.device, seed=args.seed, preset=args.preset, out=args.out,
        tasks=split_names(args.tasks) if args.tasks else None,
        methods=split_names(args.methods) if args.methods else None,
        bits=parse_bits(args.bits) if args.bits else None,
        resume=False if args.no_resume else None,
        task_options=_task_options(args.task_option) if args.task_option else None,
    )
    config = RunConfig(**values).with_overrides(**overrides)
    model_given = "model" in values or args.model is not None
    data_given = "data_root" in values or args.data_root is not None
    tasks_given = "tasks" in values or args.tasks is not None
    if not model_given and not data_given and not tasks_given:
        from ptqbench.tasks.base import TASKS

        config = config.with_overrides(tasks=tuple(TASKS.names()))
    run = harness.resolve(config, model_given=model_given)
    if run.is_demo:
        log.info("using the embedded demo: %s + synthetic demo data in %s (preset %s)",
                 config.model, run.data_root, run.preset)
    elif config.preset is None:
        log.info("preset %s (default for %s)", run.preset, config.model)
    dist = DistributedContext.from_env(run.device)
    try:
        if dist.is_distributed:
            log.info("data-parallel run: %d processes, rank 0 on %s", dist.world_size, dist.device)
        harness.Harness(run, dist=dist).execute()
    finally:
        dist.destroy()
    log.info("leaderboards written to %s", Path(config.out).resolve())


def _task_options(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    options = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task-option expects KEY=VALUE, got {pair!r}")
        options.append((key.strip(), value.strip()))
    return tuple(options)


def _list(args: argparse.Namespace) -> None:
    from ptqbench.methods.base import METHODS
    from ptqbench.sam.models import MODELS
    from ptqbench.tasks.base import TASKS

    registry = {"methods": METHODS, "tasks": TASKS, "models": MODELS}[args.what]
    sys.stdout.write("\n".join(registry.names()) + "\n")


def _leaderboard(args: argparse.Namespace) -> None:
    from ptqbench.results import RunStore, format_leaderboard

    path = Path(args.out) / "ptqbench.sqlite"
    if not path.is_file():
        raise ConfigError(f"no results store at {path}: run `ptqbench run` first or pass --out")
    sys.stdout.write(format_leaderboard(RunStore(path), args.task) + "\n")


def _evaluate(args: argparse.Namespace) -> None:
    import os

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


def main(argv: list[str] | None = None) -> int:
    from ptqbench.distributed import launched_rank

    args = build_parser().parse_args(argv)
    rank = launched_rank()
    if rank == 0:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    import ptqbench.methods  # noqa: F401  (registers the built-in methods)
    import ptqbench.tasks  # noqa: F401  (registers the built-in tasks)

    handlers = {"run": _run, "list": _list, "leaderboard": _leaderboard, "evaluate": _evaluate}
    try:
        handlers[args.command](args)
    except PtqbenchError as exc:
        sys.stderr.write(f"ptqbench: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("ptqbench: interrupted; finished cells are kept in the store\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
