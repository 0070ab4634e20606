"""The training loop: steps, schedule, optimizer, validation through `BoxPredictor`, logs and the
float16 checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.models import build_sam_tiny
from tools.train_sam_tiny.config import _SAMPLING_STREAM, _VAL_STREAM, FAMILIES, MAX_CHECKPOINT_BYTES, TrainConfig, log
from tools.train_sam_tiny.loss import compute_loss
from tools.train_sam_tiny.prompts import Batch, make_batch
from tools.train_sam_tiny.sam_forward import forward
from tools.train_sam_tiny.scenes import Scene, SceneFeeder, family_instances, mask_boxes


def train_step(model: Sam, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float, autocast: bool
               ) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the loss, its parts and the gradient norm (device scalars)."""
    loss, parts = compute_loss(forward(model, batch, autocast), batch, batch.images.shape[-1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.detach(), **parts}


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * cosine


def make_optimizer(model: Sam, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay on the parameters of 2+ dimensions only (weights,
    kernels, embeddings), none on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)




@dataclass
class ValScene:
    """A held-out scene at its original size: image uint8 [H, W, 3], masks bool [K, H, W],
    boxes float [K, 4] tight pixel-edge xyxy (the prompts the evaluation gives)."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    family: int


def validation_scenes(seed: int, per_family: int, side: int) -> list[ValScene]:
    """`per_family` held-out scenes of each family from their own seeded streams."""
    scenes = []
    for family in range(len(FAMILIES)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _VAL_STREAM, family]))
        found: list[ValScene] = []
        while len(found) < per_family:
            found.extend(ValScene(image, masks, mask_boxes(masks), family)
                         for image, masks in family_instances(rng, family, side))
        scenes.extend(found[:per_family])
    return scenes


@torch.no_grad()
def validate(model: Sam, scenes: list[ValScene], device: torch.device) -> dict[str, float]:
    """Box-prompted mIoU (x100) per family and their mean, through `BoxPredictor`."""
    predictor = BoxPredictor(model, device=device)
    ious: dict[int, list[float]] = {family: [] for family in range(len(FAMILIES))}
    for scene in scenes:
        predictor.set_image(scene.image)
        masks, _ = predictor.predict_boxes(scene.boxes)
        inter = (masks & scene.masks).sum(axis=(1, 2))
        union = (masks | scene.masks).sum(axis=(1, 2))
        ious[scene.family].extend((inter / np.maximum(union, 1)).tolist())
    metrics = {f"miou_{name}": 100.0 * float(np.mean(ious[f])) if ious[f] else float("nan")
               for f, name in enumerate(FAMILIES)}
    metrics["miou_mean"] = float(np.nanmean(list(metrics.values())))
    return metrics




def save_fp16(model: Sam, path: Path) -> str:
    """Write the float16 state dict to `path` (at most MAX_CHECKPOINT_BYTES); returns its sha256."""
    state = {key: (value.detach().to("cpu", torch.float16) if value.is_floating_point() else value.detach().cpu())
             for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} allowed for a "
                           f"packaged checkpoint")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CsvLog:
    """A CSV file written row by row (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        self._writer.writeheader()

    def write(self, row: dict[str, float | int]) -> None:
        self._writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value
                               for key, value in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()




def interval_means(sums: dict[str, torch.Tensor], steps: int, step: int) -> dict[str, float]:
    """Means of the summed step values over `steps` steps (one device sync); raises when the
    loss is not finite."""
    means = {key: value.item() / steps for key, value in sums.items()}
    if not math.isfinite(means["loss"]):
        raise RuntimeError(f"the loss is not finite by step {step}: {means}")
    return means


def train(config: TrainConfig) -> dict:
    """Train, validate, save; returns the final metrics (also written to log_dir/metrics.json)."""
    start = time.monotonic()
    train_s = max(1e-3, config.minutes * 60.0 - config.reserve_s)
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    config.log_dir.mkdir(parents=True, exist_ok=True)
    log.info("config: %s", {k: str(v) for k, v in asdict(config).items()})
    model = build_sam_tiny(config.seed)
    side = model.image_encoder.img_size
    feeder = SceneFeeder(config, side, device)  # forks the workers before the device is initialised
    model = model.to(device).train()
    val_scenes = validation_scenes(config.seed, config.val_scenes, side)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SAMPLING_STREAM]))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    pool: deque[Scene] = deque(maxlen=config.pool)
    train_log = CsvLog(config.log_dir / "train_log.csv",
                       ["step", "elapsed_s", "lr", "loss", "focal", "dice", "iou_mse", "grad_norm",
                        "steps_per_s", "scenes_generated", "pool"])
    val_log = CsvLog(config.log_dir / "val_log.csv",
                     ["step", "elapsed_s"] + [f"miou_{name}" for name in FAMILIES] + ["miou_mean"])
    sums: dict[str, torch.Tensor] = {}
    scenes_generated, step, interval_steps, interval_start = 0, 0, 0, time.monotonic()
    val_metrics: dict[str, float] = {}
    try:
        while step < config.max_steps and time.monotonic() - start < train_s:
            fresh = feeder.drain(at_least=max(0, config.batch - len(pool)))
            pool.extend(fresh)
            scenes_generated += len(fresh)
            progress = max(step / config.max_steps, (time.monotonic() - start) / train_s)
            lr = learning_rate(config, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = train_step(model, optimizer, make_batch(model, list(pool), config, rng, generator),
                               config.grad_clip, autocast=cuda)
            step += 1
            interval_steps += 1
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            if step % config.log_every == 0:
                now = time.monotonic()
                row = {"step": step, "elapsed_s": now - start, "lr": lr,
                       **interval_means(sums, interval_steps, step),
                       "steps_per_s": interval_steps / (now - interval_start),
                       "scenes_generated": scenes_generated, "pool": len(pool)}
                train_log.write(row)
                log.info("step %d  %.0fs  lr %.2e  loss %.4f  focal %.4f  dice %.4f  iou_mse %.4f  "
                         "%.1f steps/s  %d scenes generated", step, row["elapsed_s"], lr, row["loss"],
                         row["focal"], row["dice"], row["iou_mse"], row["steps_per_s"], scenes_generated)
                sums, interval_steps, interval_start = {}, 0, now
            if config.val_every > 0 and step % config.val_every == 0:
                val_start = time.monotonic()
                val_metrics = validate(model, val_scenes, device)
                val_log.write({"step": step, "elapsed_s": time.monotonic() - start, **val_metrics})
                log.info("step %d validation: %s", step, {k: round(v, 2) for k, v in val_metrics.items()})
                model.train()
                interval_start += time.monotonic() - val_start  # steps/s counts training time only
        feeder.close()
        if sums:
            interval_means(sums, interval_steps, step)
        if step == 0 or config.val_every <= 0 or step % config.val_every != 0:
            val_metrics = validate(model, val_scenes, device)
            val_log.write({"step": step, "elapsed_s": time.monotonic() - start, **val_metrics})
    finally:
        feeder.close()
        train_log.close()
        val_log.close()
    model.eval()
    sha256 = save_fp16(model, config.out)
    metrics = {"steps": step, "elapsed_s": time.monotonic() - start, "scenes_generated": scenes_generated,
               "checkpoint": str(config.out), "checkpoint_bytes": config.out.stat().st_size, "sha256": sha256,
               "validation": val_metrics, "config": {k: str(v) for k, v in asdict(config).items()}}
    (config.log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("final validation after %d steps: %s", step, {k: round(v, 2) for k, v in val_metrics.items()})
    return metrics
