"""SAM's training loss: 20 * focal + dice per mask, plus the IoU head's MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tools.train_sam_tiny.config import DICE_WEIGHT, FOCAL_ALPHA, FOCAL_GAMMA, FOCAL_WEIGHT
from tools.train_sam_tiny.prompts import Batch


def mask_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask focal loss, dice loss and actual IoU.

    logits: float [N, C, S, S] (C candidate masks per prompt); target: bool [N, S, S].
    Returns focal [N, C] (mean over pixels), dice [N, C], IoU of `logits > 0` [N, C] (no grad).
    """
    t = target[:, None].expand_as(logits).float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    alpha = FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)
    focal = (alpha * (1 - p_t) ** FOCAL_GAMMA * ce).flatten(2).mean(-1)
    inter = (prob * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    with torch.no_grad():
        pred = logits > 0
        hard = target[:, None]
        iou = (pred & hard).flatten(2).sum(-1).float() / (pred | hard).flatten(2).sum(-1).clamp(min=1).float()
    return focal, dice, iou


def compute_loss(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], batch: Batch, side: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAM's loss: 20 focal + 1 dice per prompt (min over the 3 outputs for single points, the
    single-mask output otherwise) averaged over prompts, plus the IoU head's MSE.

    Returns the loss (scalar) and its parts (detached scalars, kept on the device: no sync)."""
    n_box, n_point = batch.boxes.shape[1], batch.points.shape[1]
    targets = {
        "box": batch.targets[:, :n_box],
        "point": batch.targets[:, n_box:n_box + n_point],
        "multi": batch.targets[:, n_box + n_point:],
    }
    mask_losses, focal_sel, dice_sel, iou_errors = [], [], [], []
    for kind, (low_res, iou_pred) in outputs.items():
        channels = slice(1, None) if kind == "point" else slice(0, 1)
        logits = F.interpolate(low_res[:, channels].float(), (side, side), mode="bilinear", align_corners=False)
        focal, dice, iou = mask_terms(logits, targets[kind].reshape(-1, side, side))
        combined = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice
        best = combined.argmin(dim=1, keepdim=True)
        mask_losses.append(combined.gather(1, best)[:, 0])
        focal_sel.append(focal.gather(1, best)[:, 0])
        dice_sel.append(dice.gather(1, best)[:, 0])
        iou_errors.append(((iou_pred[:, channels].float() - iou) ** 2).flatten())
    mask_loss = torch.cat(mask_losses).mean()
    iou_loss = torch.cat(iou_errors).mean()
    parts = {"focal": torch.cat(focal_sel).mean().detach(), "dice": torch.cat(dice_sel).mean().detach(),
             "iou_mse": iou_loss.detach()}
    return mask_loss + iou_loss, parts
