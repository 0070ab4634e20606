"""AdaRound (Nagel et al., ICML 2020): learned rounding of a weight onto its fixed affine grid.

The quantized weight is `W_hat = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)` with the
rectified sigmoid `h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`, zeta = 1.1,
gamma = -0.1. V starts where h(V) equals the fractional part of W/s (so the soft weight starts
at W inside the clamp range), the regulariser `sum(1 - |2 h(V) - 1|^beta)` pushes h(V) to 0 or 1
while beta is annealed, and training ends with hard rounding `floor(W/s) + 1[V >= 0]`.

`AdaRoundQuantizer` is a drop-in for the `weight_quantizer` of a
`ptqbench.quant.layers.QuantWeightLayer` during reconstruction: called with the layer's weight,
it returns the soft-rounded fake-quantized weight; `hard_weight` gives the hard-rounded one. In a
training step on a GPU the soft weight and the regulariser run as fused kernels (`fused_adaround`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptqbench.quant import functional as qf
from ptqbench.quant import fused_adaround
from ptqbench.quant.quantizer import FakeQuantizer

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), elementwise."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """V with h(V) = h, for h in [0, 1) (the range of a fractional part)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def beta_schedule(step: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's exponent at `step` of `total`: None during the warm-up (no regulariser),
    then annealed linearly from `start` to `end` over the remaining steps."""
    warmup_steps = int(warmup * total)
    if step < warmup_steps:
        return None
    progress = (step - warmup_steps) / max(total - warmup_steps, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


class AdaRoundQuantizer(nn.Module):
    """Learned rounding for one weight on the grid of an existing weight quantizer.

    weight: [C_out, ...] the layer's FP weight; base: the layer's FakeQuantizer in quantize mode
    on the uniform grid (its scale and zero point, per channel [C_out] or per tensor, stay fixed).
    V (`self.v`) has the shape of the weight and is the only trainable parameter.
    """

    def __init__(self, weight: Tensor, base: FakeQuantizer) -> None:
        super().__init__()
        if base.mode != "quantize" or base.log2_tau is not None:
            raise ValueError("AdaRound needs a weight quantizer in quantize mode on the uniform grid")
        self.bits = base.bits
        shape = [1] * weight.dim()
        if base.channel_axis is not None:
            shape[base.channel_axis] = -1
        self.register_buffer("scale", base.scale.detach().reshape(shape).clone())
        self.register_buffer("zero_point", base.zero_point.detach().reshape(shape).clone())
        scaled = weight.detach() * (1.0 / self.scale)  # x * (1/s), as functional.fake_quant_affine
        self.register_buffer("w_floor", torch.floor(scaled))
        self.v = nn.Parameter(inverse_rectified_sigmoid(scaled - self.w_floor))

    def _on_grid(self, offsets: Tensor) -> Tensor:
        qmin, qmax = qf.quant_range(self.bits)
        q = torch.clamp(self.w_floor + offsets + self.zero_point, qmin, qmax)
        return (q - self.zero_point) * self.scale

    def hard_offsets(self) -> Tensor:
        """1[V >= 0]: the final rounding decisions (0 = down, 1 = up), shape of the weight."""
        return (self.v.detach() >= 0).to(self.w_floor.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """The soft-rounded (h(V)) fake-quantized weight (`hard_weight` is the hard-rounded one).

        weight: the tensor V was made for (only its shape is checked: floor(W/s) is cached).
        """
        if weight.shape != self.w_floor.shape:
            raise ValueError(f"AdaRound was set up for a weight of shape {tuple(self.w_floor.shape)}, "
                             f"got {tuple(weight.shape)}")
        if fused_adaround.can_fuse(self.v):  # a training step on a GPU
            return fused_adaround.soft_weight(self.v, self.w_floor, self.scale, self.zero_point, self.bits, ZETA,
                                              GAMMA)
        return self._on_grid(rectified_sigmoid(self.v))

    def regularizer(self, beta: float | Tensor) -> Tensor:
        """sum(1 - |2 h(V) - 1|^beta) over every element (0-d tensor). beta: a number, or a 0-d
        tensor on V's device (a training step replayed from a CUDA graph)."""
        if fused_adaround.can_fuse(self.v):
            return fused_adaround.regularizer(self.v, beta, ZETA, GAMMA)
        return (1.0 - (2.0 * rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The hard-rounded fake-quantized weight `s * (clamp(floor(W/s) + 1[V >= 0] + z) - z)`."""
        return self._on_grid(self.hard_offsets())

    def flipped_fraction(self, weight: Tensor) -> float:
        """Share of elements whose hard rounding differs from round-half-up of W/s (a diagnostic)."""
        nearest_up = (weight.detach() * (1.0 / self.scale) - self.w_floor >= 0.5).to(self.w_floor.dtype)
        return float((self.hard_offsets() != nearest_up).float().mean())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.v.shape)}, zeta={ZETA}, gamma={GAMMA}"
