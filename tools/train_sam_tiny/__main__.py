"""`python3 -m tools.train_sam_tiny`: the command line (every flag is a `TrainConfig` field)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tools.train_sam_tiny.config import TrainConfig
from tools.train_sam_tiny.training import train

FLAG_HELP = {
    "device": "torch device: cuda (bf16 autocast) or cpu",
    "minutes": "wall-time budget of the whole run; training stops reserve_s before it, then validates and saves",
    "max_steps": "step cap; the cosine schedule ends at this step or at the time budget, whichever comes first",
    "batch": "scenes per step",
    "prompts": "prompts per scene (half boxes, 3/8 single points, 1/8 three points)",
    "workers": "DataLoader worker processes generating scenes (0: generate in the training loop)",
    "pool": "scenes kept on the device for replay",
    "lr": "peak AdamW learning rate",
    "min_lr_ratio": "final learning rate / peak",
    "weight_decay": "AdamW weight decay on weights (not on biases and norms)",
    "warmup_steps": "linear warm-up steps",
    "grad_clip": "gradient norm clip",
    "seed": "seed of the init, the data streams, the sampling and the validation scenes",
    "val_scenes": "held-out validation scenes per family",
    "val_every": "validate every N steps (0: only at the end)",
    "log_every": "write a train_log.csv row every N steps",
    "reserve_s": "seconds of the budget kept for the final validation and saving",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line -> TrainConfig (defaults: TrainConfig's)."""
    defaults = TrainConfig(out=Path(), log_dir=Path())
    parser = argparse.ArgumentParser(prog="python3 -m tools.train_sam_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the fp16 state dict")
    parser.add_argument("--log-dir", type=Path, required=True,
                        help="folder for train_log.csv, val_log.csv and metrics.json")
    for field, text in FLAG_HELP.items():
        value = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value,
                            help=f"{text} (default {value})")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> dict:
    """Entry point: parse `argv`, train, print the checkpoint's sha256 last; returns the metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = parse_args(argv)
    metrics = train(config)
    print(f"wrote {config.out} ({metrics['checkpoint_bytes']} bytes) after {metrics['steps']} steps")
    print(f"sha256 {metrics['sha256']}")
    return metrics


if __name__ == "__main__":
    main()
