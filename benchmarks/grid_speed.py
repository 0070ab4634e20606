"""The demo grid's wall time, run as a user runs it, with where each run's seconds went.

Issue 16's target: `ptqbench run --methods saqsam,mse --bits 4,6 --device cuda` (sam_tiny, the
demo data, fast preset) in at most 60 s on one H200. Each run is a fresh
`python -m ptqbench run ... --no-resume` process with a store of its own. One untimed run comes
first: it compiles what a first run on any machine compiles once (Triton's kernels, cached on
disk, and Python's bytecode). The runs get a bytecode folder of their own
(`PYTHONPYCACHEPREFIX`): a user's install keeps bytecode beside the sources, but a read-only
install (the GPU machine's) keeps none, and every run would compile its imports again.

Per run: the wall seconds; the cells' calibration and evaluation seconds from its store; the rest
(start-up and imports, data, bootstrap intervals, leaderboards); whether its metrics equal the
first timed run's to the last digit (the untimed run's too), naming the cells that do not. Then
the median wall time against the target.

    python benchmarks/grid_speed.py --runs 3                       # the GPU demo grid
    python benchmarks/grid_speed.py --runs 3 --keep grid-logs      # ... keeping each run's log and store
    python benchmarks/grid_speed.py --device cpu --runs 1 --methods mse --bits 4 --tasks coco
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from ptqbench.results import RunStore

TARGET_S = 60.0
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GridRun:
    """One grid run: wall seconds, the summed calibration and evaluation seconds of its cells,
    and every cell's metrics by (task, method, bits)."""

    wall_s: float
    calib_s: float
    eval_s: float
    metrics: dict[tuple[str, str, str], dict[str, float]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the untimed one (default 3)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="saqsam,mse")
    parser.add_argument("--bits", default="4,6")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: every demo task)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="stop a run after this many seconds")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every run's store and log in this new folder (default: a deleted temporary one)")
    return parser.parse_args(argv)


def grid_command(args: argparse.Namespace, out: Path) -> list[str]:
    command = [sys.executable, "-m", "ptqbench", "run", "--methods", args.methods, "--bits", args.bits,
               "--device", args.device, "--no-resume", "--out", str(out)]
    return command + (["--tasks", args.tasks] if args.tasks else [])


def run_grid(args: argparse.Namespace, out: Path, env: dict[str, str]) -> GridRun:
    """One grid in a fresh process (its output in `out/run.log`); raises SystemExit when it fails."""
    out.mkdir(parents=True)
    with (out / "run.log").open("w") as log:
        start = time.perf_counter()
        try:
            completed = subprocess.run(grid_command(args, out), cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, timeout=args.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"grid_speed: a run took longer than {args.timeout_s:.0f} s and was stopped") from None
        wall_s = time.perf_counter() - start
    if completed.returncode != 0:
        tail = (out / "run.log").read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"grid_speed: the grid exited with code {completed.returncode}:\n" + "\n".join(tail))
    records = RunStore(out / "ptqbench.sqlite").records()
    return GridRun(wall_s, sum(record.calib_s for record in records), sum(record.eval_s for record in records),
                   {(record.task, record.method, record.bits): record.metrics for record in records})


def same_metrics(run: GridRun, first: GridRun) -> str:
    """"yes" when every cell's metrics equal the first run's to the last digit, else "NO: " and
    the cells that differ."""
    differing = [" ".join(cell) for cell in sorted(first.metrics.keys() | run.metrics.keys())
                 if run.metrics.get(cell) != first.metrics.get(cell)]
    return "yes" if not differing else "NO: " + ", ".join(differing)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit("grid_speed: --runs must be at least 1")
    if args.keep is not None and args.keep.exists():
        raise SystemExit(f"grid_speed: --keep {args.keep} exists; name a new folder")
    with tempfile.TemporaryDirectory(prefix="ptqbench-grid-speed-") as folder:
        work = Path(folder) if args.keep is None else args.keep
        env = dict(os.environ, PYTHONPYCACHEPREFIX=str(work / "bytecode"), TQDM_DISABLE="1")
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's runs keep their bytecode
        first = run_grid(args, work / "untimed", env)
        runs = [run_grid(args, work / f"run{index}", env) for index in range(1, args.runs + 1)]
    labelled = [("untimed first run", first)] + [(f"run {index}", run) for index, run in enumerate(runs, start=1)]
    rows = [[label, f"{run.wall_s:.1f}", f"{run.calib_s:.1f}", f"{run.eval_s:.1f}",
             f"{run.wall_s - run.calib_s - run.eval_s:.1f}", same_metrics(run, runs[0])] for label, run in labelled]
    print(tabulate(rows, headers=["run", "wall s", "calibration s", "evaluation s", "rest s",
                                  "metrics = run 1"], tablefmt="github"))
    median = statistics.median(run.wall_s for run in runs)
    print(f"median wall time of {len(runs)} runs: {median:.1f} s ({len(runs[0].metrics)} cells)")
    if grid_command(args, work) == grid_command(parse_args(["--runs", "1"]), work):  # the grid
        print(f"target {TARGET_S:.0f} s (issue 16, one H200): {'within' if median <= TARGET_S else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
