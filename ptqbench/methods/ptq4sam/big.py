"""BIG (Bimodal Integration, PTQ4SAM): bimodality detection and the per-channel sign fold.

In SAM's token-to-image cross-attentions the post-k_proj activation K is often bimodal: some
channels sit around a positive centre, others around a negative one. Flipping the sign of
channel j of both the query and the key projection (rows and biases) leaves every logit
sum_j q_j k_j unchanged exactly, and with gamma_j = sign(mean(K[..., j])) it moves all channel
centres to the positive side, so a per-tensor quantizer of K sees one mode instead of two.

Detection (reference code): a Gaussian KDE (Scott bandwidth) of the flattened values evaluated
on 128 points spanning [min, max]; peaks found with `scipy.signal.find_peaks` with height at
least 1 % of the sum of the curve and at least 32 points apart; bimodal iff exactly 2 peaks.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde
from torch import Tensor, nn

from ptqbench.errors import PtqbenchError

KDE_POINTS = 128
PEAK_HEIGHT_RATIO = 0.01
PEAK_DISTANCE = 32


def kde_peaks(values: Tensor | np.ndarray) -> np.ndarray:
    """Indices (into 128 evenly spaced points over [min, max]) of the peaks of the values' KDE.

    values: any shape, flattened; at least two distinct values.
    """
    data = np.asarray(torch.as_tensor(values).detach().cpu().double().flatten())
    grid = np.linspace(data.min(), data.max(), KDE_POINTS)
    density = gaussian_kde(data, bw_method="scott")(grid)
    peaks, _ = find_peaks(density, height=PEAK_HEIGHT_RATIO * density.sum(), distance=PEAK_DISTANCE)
    return peaks


def is_bimodal(values: Tensor | np.ndarray) -> bool:
    """Whether the KDE of the flattened values has exactly two peaks (see `kde_peaks`)."""
    return len(kde_peaks(values)) == 2


def channel_signs(keys: Tensor) -> Tensor:
    """gamma [C] in {-1, +1}: the sign of each channel's mean over every other axis (+1 for 0).

    keys: [..., C], e.g. the post-k_proj activation [boxes, tokens, C].
    """
    mean = keys.detach().reshape(-1, keys.shape[-1]).double().mean(dim=0)
    return torch.where(mean < 0, -1.0, 1.0).to(keys.dtype)


@torch.no_grad()
def fold_channel_signs(attn: nn.Module, gamma: Tensor) -> None:
    """Multiply the output rows and biases of `attn.q_proj` and `attn.k_proj` by gamma [C].

    attn: a decoder attention (segment_anything's or its quantizable twin) whose q_proj and
    k_proj have C = internal_dim outputs. Q K^T is unchanged exactly (each product q_j k_j gets
    gamma_j^2 = 1). Must run before the weight quantizers are calibrated: a quantizable
    projection whose weight quantizer is already set is refused (its range would be stale).
    """
    for proj in (attn.q_proj, attn.k_proj):
        quantizer = getattr(proj, "weight_quantizer", None)
        if (quantizer is not None and quantizer.mode != "off") or getattr(proj, "frozen_weight", None) is not None:
            raise RuntimeError("the BIG sign fold must run before the weight quantizers are calibrated")
        if proj.weight.shape[0] != gamma.shape[0]:
            raise PtqbenchError(f"BIG: gamma has {gamma.shape[0]} channels, the projection {proj.weight.shape[0]}")
        signs = gamma.to(proj.weight.device, proj.weight.dtype)
        proj.weight.mul_(signs[:, None])
        if proj.bias is not None:
            proj.bias.mul_(signs)
