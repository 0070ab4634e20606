"""The `ptqbench prompts` command: its parser and its work (names and settings are checked before
torch is imported; every bad input is one error line and exit code 2, as in `cli.py`).

    ptqbench prompts coco   --detector NAME --split val2017 [--out FILE] [--weights default|random|FILE] ...
    ptqbench prompts ade20k --segformer b5 --split validation [--out DIR] [--weights default|random|DIR] ...

Both print the path of the result (the cached file or folder, or `--out`) on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ptqbench.errors import ConfigError
from ptqbench.prompts.zoo import DEFAULT_DETECTOR, DETECTORS, DetectorSettings, check_detector

log = logging.getLogger("ptqbench")

DETECTOR_DEFAULTS = DetectorSettings()


def _add_coco(tasks: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = tasks.add_parser("coco", parents=parents, help="a torchvision detector's boxes on a COCO split",
                         description="Run a detector of torchvision's COCO zoo over a COCO split and write the "
                                     "COCO detection results JSON that `run --prompts` reads (cached).")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"one of {', '.join(DETECTORS)} "
                                                                f"(default {DEFAULT_DETECTOR})")
    p.add_argument("--split", default="val2017", help="COCO split (default val2017; train2017 for calibration)")
    p.add_argument("--out", help="also write the detection file here (default: print the cached file's path)")
    p.add_argument("--weights", help="default (torchvision's, via its hub cache), random (seeded, for tests "
                                     "and timing) or a local state dict file")
    d = DETECTOR_DEFAULTS
    p.add_argument("--score-threshold", type=float, default=d.score_threshold,
                   help=f"keep boxes scoring above this (default {d.score_threshold})")
    p.add_argument("--nms", type=float, default=d.nms, help=f"per-class NMS IoU threshold (default {d.nms})")
    p.add_argument("--max-per-image", type=int, default=d.max_per_image,
                   help=f"boxes kept per image (default {d.max_per_image})")
    p.add_argument("--min-size", type=int, default=d.min_size, help=f"shorter image side (default {d.min_size})")
    p.add_argument("--max-size", type=int, default=d.max_size, help=f"longest image side (default {d.max_size})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per forward (default {d.batch_size})")
    p.add_argument("--limit", type=int, help="only the first N images by id (what `run --limit N` evaluates)")
    p.add_argument("--first", type=int, help="only the first N images in annotation order (what calibration reads)")


def _add_ade20k(tasks: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = tasks.add_parser("ade20k", parents=parents, help="SegFormer class maps of an ADE20K split (SSA's priors)",
                         description="Run a SegFormer ADE20K checkpoint (Hugging Face transformers) with SSA's "
                                     "preprocessing over an ADE20K split and write the class-map PNG folder that "
                                     "`run --task-option mode=ssa --task-option semantic_prior=DIR` reads (cached).")
    p.add_argument("--segformer", default="b5", help="b0..b5 (default b5: SSA's nvidia/segformer-b5-finetuned-"
                                                     "ade-640-640; b0..b4 are the 512 x 512 checkpoints)")
    p.add_argument("--split", default="validation", help="ADE20K split (default validation)")
    p.add_argument("--out", help="also copy the PNGs into this folder (default: print the cached folder's path)")
    p.add_argument("--weights", help="default (the hub checkpoint), random (seeded, for tests and timing) or a "
                                     "save_pretrained folder")
    p.add_argument("--size", type=int, help="square input side (default the checkpoint's: 512, 640 for b5)")
    p.add_argument("--bgr", action=argparse.BooleanOptionalAction, default=True,
                   help="feed SegFormer BGR as SSA's script does by accident (default on; --no-bgr feeds RGB)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward (default 4)")
    p.add_argument("--limit", type=int, help="only the first N images (name order)")


def add_prompts_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`ptqbench prompts coco|ade20k` on the top-level sub-command set `sub`."""
    p = sub.add_parser("prompts", parents=parents, help="make the papers' prompts: detector boxes, semantic priors",
                       description="Make the prompts of the papers' protocol with the field's own libraries: "
                                   "detector boxes for COCO (torchvision), SegFormer priors for ADE20K (transformers).")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", help="dataset root (default $PTQBENCH_DATASETS, else ./datasets; 'demo' = the "
                                            "demo data)")
    common.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    _add_coco(tasks, [*parents, common])
    _add_ade20k(tasks, [*parents, common])


def _data_root(text: str | None) -> Path:
    if text == "demo":
        from ptqbench.demo.install import ensure_demo_data

        return ensure_demo_data()
    root = Path(text or os.environ.get("PTQBENCH_DATASETS", "datasets")).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {root} does not exist (set --data-root or PTQBENCH_DATASETS)")
    return root


def _check_out(path: Path, kind: str) -> None:
    """ConfigError unless `path` can be written as a `kind` ("file" or "folder")."""
    if kind == "file" and path.is_dir():
        raise ConfigError(f"--out {path} is a folder, not a file")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder")
    parent = path.absolute().parent
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path} cannot be written (no writable folder at {existing})")


def _coco(args: argparse.Namespace, before_work: Callable[[], object]) -> Path:
    detector = check_detector(args.detector)
    settings = DetectorSettings(score_threshold=args.score_threshold, nms=args.nms,
                                max_per_image=args.max_per_image, min_size=args.min_size, max_size=args.max_size,
                                batch_size=args.batch_size)
    if args.out:
        _check_out(Path(args.out), "file")
    from ptqbench.prompts.coco import generate_coco_prompts

    made = generate_coco_prompts(_data_root(args.data_root), args.split, detector, weights=args.weights,
                                 settings=settings, limit=args.limit, first=args.first, device=args.device,
                                 before_detection=before_work)
    if not args.out:
        return made.path
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(made.path, args.out)
    return Path(args.out)


def _ade20k(args: argparse.Namespace, before_work: Callable[[], object]) -> Path:
    from ptqbench.prompts.segformer import check_variant

    variant = check_variant(args.segformer)
    for name in ("size", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.out:
        _check_out(Path(args.out), "folder")
    before_work()
    from ptqbench.prompts.ade20k import generate_ade20k_priors

    made = generate_ade20k_priors(_data_root(args.data_root), args.split, variant, weights=args.weights,
                                  size=args.size, bgr=args.bgr, limit=args.limit, batch_size=args.batch_size,
                                  device=args.device)
    if not args.out:
        return made.path
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for png in sorted(made.path.glob("*.png")):
        shutil.copyfile(png, out / png.name)
    return out


def run_prompts(args: argparse.Namespace, before_work: Callable[[], object] = lambda: None) -> None:
    """The `prompts` command: make (or reuse) the file or folder and print its path.
    `before_work` runs once the names and settings are checked (the CLI sets torch's threads)."""
    path = _coco(args, before_work) if args.task == "coco" else _ade20k(args, before_work)
    sys.stdout.write(f"{path}\n")
