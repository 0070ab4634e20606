"""GPU self-check: the test suite, the demo grid and one SAM-B cell per method, in one table.

On a machine with a GPU, from the repository root:

    python3 tools/gpu_check.py --out $OUT

runs, as separate processes, `--jobs` at a time, within one wall-clock budget (`--budget-s`):
(a) the whole test suite (`python3 -m pytest -q`; the tests that can use CUDA do when it is there);
(b) the demo grid of every registered method at W4A4: `ptqbench run --data-root demo` on every
    task (sam_tiny, synthetic demo data, `fast` preset), one run per method;
(c) one `sam_vit_b` cell per method: COCO, W4A4, `--limit 4 --calib-size 2 --preset fast`, on
    `../shared/realdata` when it is there, else the demo data, with random weights written once
    to a checkpoint file (not the official one, so every row is labelled `unofficial-checkpoint`);
(d) the demo grid of the `--repeat` methods (default `saqsam`, whose cells use most of the
    project's GPU paths: fused kernels, CUDA-graph reconstruction, lockstep searches) a second
    time: it passes only when every task's metrics equal the first run's to the last digit.
Each run has its own results store; the table (phase, method, pass/fail, calib_s, eval_s, peak
GiB) is read from those stores: the method's rows summed over tasks (peak: the largest). With
several jobs at a time the seconds include the other jobs' load. A run passes when it exits 0
and stored its method's row for every task; a job still running at the end of the budget is
stopped and fails.

`--out` (default `$OUT`) receives three files: `summary.md` (the table and the last lines of
every failed job's log), `pytest.log`, and `logs.tar.gz` (every job's log, and its store,
leaderboards and error tracebacks). The checkpoint, stores and per-cell artefacts stay in
`--work-dir` (default: a new temporary folder).

A dry run on the CPU: `python3 tools/gpu_check.py --device cpu --methods minmax --repeat minmax --skip-tests --out DIR`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ptqbench importable from the checkout without installing it
REALDATA = REPO.parent / "shared" / "realdata"
TAIL_LINES = 15  # lines of a failed job's log quoted in summary.md


@dataclass(frozen=True)
class Job:
    """One process of the check. phase: "tests", "demo", "sam_vit_b" or "repeat"; method: "-" for
    the tests; tasks: the tasks whose row of `method` the run must store (none for the tests);
    repeats: the store folder of the run whose metrics this one must reproduce."""

    phase: str
    method: str
    argv: tuple[str, ...]
    log: Path
    out: Path | None = None
    tasks: tuple[str, ...] = ()
    repeats: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its exit code (None: stopped at the end of the budget, or never started)
    and its wall seconds."""

    returncode: int | None
    seconds: float
    started: bool = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for summary.md, pytest.log and logs.tar.gz (default $OUT)")
    parser.add_argument("--work-dir",
                        help="folder for the checkpoint, stores and artefacts (default: a new temporary folder)")
    parser.add_argument("--device", default="cuda", help="device of the ptqbench runs (default cuda)")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument("--data-root", help="data of the sam_vit_b cells (default ../shared/realdata, else the demo)")
    parser.add_argument("--repeat", default="saqsam",
                        help="comma-separated methods whose demo grid runs twice and must repeat its metrics "
                             "(default saqsam; empty: none)")
    parser.add_argument("--jobs", type=int, help="processes at a time (default 5 on cuda, 1 otherwise)")
    parser.add_argument("--budget-s", type=float, default=520.0,
                        help="wall-clock budget of all jobs in seconds (default 520)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    return args


def random_sam_b_checkpoint(path: Path) -> Path:
    """sam_vit_b's seeded random init (`build_sam_official`) saved as a state dict at `path`."""
    import torch

    from ptqbench.models.sam1.models import build_sam_official

    if not path.is_file():
        torch.save(build_sam_official("vit_b").state_dict(), path)
    return path


def plan(args: argparse.Namespace, work: Path) -> list[Job]:
    """The jobs in the order they start: the tests, the sam_vit_b cells, the demo grid, its repeats.

    Each run gets a fresh store under `work/runs` (what an earlier check left there is removed).
    """
    from ptqbench.demo.install import ensure_demo_data
    from ptqbench.methods.base import METHODS
    from ptqbench.tasks.base import TASKS

    methods = [METHODS.canonical(name) for name in args.methods.split(",")] if args.methods else METHODS.names()
    demo = ensure_demo_data()  # generated once here, not by every run at the same time
    data_root = args.data_root or (REALDATA if REALDATA.is_dir() else demo)
    checkpoint = random_sam_b_checkpoint(work / "sam_vit_b_random.pth")
    shutil.rmtree(work / "runs", ignore_errors=True)
    run = (sys.executable, "-m", "ptqbench", "run", "--bits", "4", "--device", args.device)
    jobs = [] if args.skip_tests else [Job("tests", "-", (sys.executable, "-m", "pytest", "-q"),
                                           work / "logs" / "pytest.log")]
    for method in methods:
        out = work / "runs" / f"sam_vit_b-{method}"
        jobs.append(Job("sam_vit_b", method, run + (
            "--model", "sam_vit_b", "--checkpoint", str(checkpoint), "--data-root", str(data_root), "--tasks", "coco",
            "--methods", method, "--limit", "4", "--calib-size", "2", "--preset", "fast", "--out", str(out)),
            work / "logs" / f"sam_vit_b-{method}.log", out, ("coco",)))
    tasks = tuple(TASKS.names())
    repeated = [METHODS.canonical(name) for name in args.repeat.split(",") if name]
    demo_runs = [("demo", m, f"demo-{m}") for m in methods]
    demo_runs += [("repeat", m, f"demo-{m}-repeat") for m in repeated if m in methods]
    for phase, method, name in demo_runs:
        out = work / "runs" / name
        jobs.append(Job(phase, method, run + ("--data-root", "demo", "--tasks", ",".join(tasks), "--methods", method,
                                              "--out", str(out)), work / "logs" / f"{name}.log", out, tasks,
                        work / "runs" / f"demo-{method}" if phase == "repeat" else None))
    return jobs


def execute(job: Job, deadline: float, threads: int) -> Outcome:
    """Run `job` with its output in `job.log`; stop its whole process group at `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return Outcome(None, 0.0, started=False)
    # TQDM_DISABLE: no progress bars in the logs
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    start = time.monotonic()
    with job.log.open("w") as log:
        log.write(" ".join(job.argv) + "\n")
        log.flush()
        process = subprocess.Popen(job.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.write(f"\ngpu_check: stopped at the end of the budget after {time.monotonic() - start:.0f} s\n")
            returncode = None
    return Outcome(returncode, time.monotonic() - start)


def stored_rows(out: Path, method: str) -> list:
    """The records of `method` in the store of the run writing to `out` (none when it has no store yet)."""
    from ptqbench.results import RunStore

    path = out / "ptqbench.sqlite"
    if not path.is_file():
        return []
    return [record for record in RunStore(path).records() if record.method == method]


def unrepeated_tasks(rows: list, first_rows: list) -> list[str]:
    """The tasks whose metrics in `rows` differ from those in `first_rows` (to the last digit), or
    that only one of the two stored."""
    first = {record.task: record.metrics for record in first_rows}
    again = {record.task: record.metrics for record in rows}
    return sorted(task for task in first.keys() | again.keys() if first.get(task) != again.get(task))


def table_row(job: Job, outcome: Outcome) -> list[str]:
    """phase, method, result, calib_s, eval_s, peak GiB (blank where the job stored nothing)."""
    rows = stored_rows(job.out, job.method) if job.out is not None else []
    if not outcome.started:
        result = "fail (not started: budget spent)"
    elif outcome.returncode is None:
        result = f"fail (stopped after {outcome.seconds:.0f} s: budget spent)"
    elif outcome.returncode != 0:
        result = f"fail (exit {outcome.returncode})"
    elif sorted(record.task for record in rows) != sorted(job.tasks):
        result = f"fail (rows stored for {sorted(record.task for record in rows)}, expected {sorted(job.tasks)})"
    elif job.repeats is not None and (differ := unrepeated_tasks(rows, stored_rows(job.repeats, job.method))):
        result = f"fail (metrics differ from the first demo run: {', '.join(differ)})"
    else:
        result = "pass"
    if not rows:
        return [job.phase, job.method, result, "", "", ""]
    peaks = [record.peak_mem_mb for record in rows if record.peak_mem_mb is not None]
    return [job.phase, job.method, result, f"{sum(record.calib_s for record in rows):.1f}",
            f"{sum(record.eval_s for record in rows):.1f}", f"{max(peaks) / 1024:.2f}" if peaks else "-"]


def markdown_table(rows: list[list[str]]) -> str:
    header = ["phase", "method", "result", "calib_s", "eval_s", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def failure_tails(jobs: list[Job], rows: list[list[str]]) -> str:
    """The last lines of the log of every job that did not pass."""
    sections = []
    for job, row in zip(jobs, rows):
        if row[2] != "pass" and job.log.is_file():
            tail = job.log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            sections.append(f"### {job.phase} {job.method} ({job.log.name})\n\n```\n" + "\n".join(tail) + "\n```")
    return "\n\n".join(sections)


def archive(jobs: list[Job], path: Path) -> None:
    """logs.tar.gz: every job's log, and of each run its store, leaderboards and error tracebacks."""
    with tarfile.open(path, "w:gz") as tar:
        for job in jobs:
            if job.log.is_file():
                tar.add(job.log, arcname=f"logs/{job.log.name}")
            if job.out is None or not job.out.is_dir():
                continue
            for item in [*job.out.glob("ptqbench.sqlite"), *job.out.glob("leaderboard_*"), *job.out.glob("errors")]:
                tar.add(item, arcname=f"runs/{job.out.name}/{item.name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ptqbench-gpu-check-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: device {args.device}, work folder {work}, results in {out}", flush=True)
    jobs = plan(args, work)
    parallel = args.jobs or (5 if args.device.startswith("cuda") else 1)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outcomes = list(pool.map(lambda job: execute(job, deadline, threads), jobs))
    rows = [table_row(job, outcome) for job, outcome in zip(jobs, outcomes)]
    table = markdown_table(rows)
    tails = failure_tails(jobs, rows)
    (out / "summary.md").write_text(f"# gpu_check on {args.device}\n\n{table}\n" + (f"\n{tails}\n" if tails else ""))
    if not args.skip_tests:
        (out / "pytest.log").write_text(jobs[0].log.read_text(errors="replace"))
    archive(jobs, out / "logs.tar.gz")
    print(table)
    failed = sum(row[2] != "pass" for row in rows)
    print(f"gpu_check: {len(rows) - failed} of {len(rows)} passed; details in {out / 'summary.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
