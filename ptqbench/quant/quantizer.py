"""The FakeQuantizer module: one quantization site's state and its forward.

A quantizer is in one of three modes:
- "off":      identity (returns its input object unchanged, so the FP path is bit-exact);
- "observe":  identity, and its observer records the input's statistics;
- "quantize": simulated quantization with the stored scale and zero point.

Granularity is per tensor (`channel_axis=None`, scale and zero point are 0-d) or per channel
(scale and zero point have shape [C], broadcast along `channel_axis`). Two grids exist:
the uniform affine grid (`functional`: qmin 0, qmax 2^b - 1) and, for softmax outputs, the AGQ log2 grid
(`set_log2(tau, scale)`). Options used by reconstruction methods:
- LSQ: `make_scale_learnable()` turns the scale into an `nn.Parameter` trained with the
  gradient scale 1/sqrt(numel * qmax) and kept positive;
- QDrop: `quantize_prob` < 1 quantizes each element with that probability and passes the
  rest through in FP (fresh randomness every forward, drawn from `generator` when one is
  set, else from the global RNG). Evaluation always uses 1.
In a training step on a GPU (float32 CUDA input, gradients on), the per-tensor uniform grid runs
as two fused kernels (`fused_lsq`): the same values, the draw from Triton's random stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from ptqbench.quant import functional as qf
from ptqbench.quant import fused_lsq
from ptqbench.quant.graph_capture import capturing

if TYPE_CHECKING:
    from ptqbench.quant.observers import Observer

Mode = Literal["off", "observe", "quantize"]


class FakeQuantizer(nn.Module):
    """Fake-quantizes a weight or an activation.

    bits: the grid's bit width (2..16).
    is_weight: whether this site quantizes a weight (methods choose observers by it).
    channel_axis: None for per-tensor, else the axis holding the channels (weights: 0).
    """

    def __init__(self, bits: int, *, is_weight: bool, channel_axis: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.is_weight = is_weight
        self.channel_axis = channel_axis
        self.mode: Mode = "off"
        self.observer: Observer | None = None
        self.quantize_prob = 1.0
        self.generator: torch.Generator | None = None
        self.log2_tau: int | None = None
        self.set_range_args: tuple[Tensor, Tensor] | None = None
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self._int_zero_point: tuple[Tensor, int, Tensor] | None = None

    def extra_repr(self) -> str:
        grid = f"log2(tau={self.log2_tau})" if self.log2_tau else "uniform"
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        return f"bits={self.bits}, {gran}, grid={grid}, mode={self.mode}, quantize_prob={self.quantize_prob}"

    def observe_with(self, observer: Observer) -> None:
        """Attach a fresh observer and switch to observe mode."""
        self.observer = observer
        self.mode = "observe"

    def set_range(self, x_min: Tensor, x_max: Tensor) -> None:
        """Set scale and zero point from a range (0-d or [C]) and switch to quantize mode.

        A per-tensor range is also kept, as given (detached, on its device: nothing is read back
        to the host, so a search can set many candidate ranges without waiting), in `set_range_args`.
        """
        if x_min.dim() == 0:
            self.set_range_args = (x_min.detach(), x_max.detach())
        self.set_qparams(*qf.affine_qparams(x_min.float(), x_max.float(), self.bits))

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Use this scale and zero point (0-d or [C], as `functional.affine_qparams` gives them) and
        switch to quantize mode. A search that tries many ranges computes their qparams in one
        batch and sets each in turn: the same values as `set_range` of each range."""
        self._store(scale, zero_point)
        self.mode = "quantize"

    def set_log2(self, tau: int, scale: Tensor) -> None:
        """Use the AGQ log2 grid with base 2^(1/tau) and the given 0-d scale."""
        self.log2_tau = tau
        self._store(scale.detach().float().reshape(()), torch.zeros(()))
        self.mode = "quantize"

    def finish_observing(self) -> None:
        """Turn the observer's statistics into qparams and drop the observer."""
        if self.observer is None:
            raise RuntimeError("finish_observing called on a quantizer without an observer")
        x_min, x_max = self.observer.compute_range(self.bits)
        self.observer = None
        self.set_range(x_min, x_max)

    def make_scale_learnable(self) -> nn.Parameter:
        """LSQ: the scale becomes a trainable parameter (initialised from its current value)."""
        if not self.learns_scale:
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)
        return self.scale

    def freeze_scale(self) -> None:
        """End of learning: the scale becomes a plain buffer again (|scale| clamped positive, as used in forward)."""
        if self.learns_scale:
            value = self.positive_scale().detach().clone()
            del self.scale
            self.register_buffer("scale", value)

    def _store(self, scale: Tensor, zero_point: Tensor) -> None:
        """Keep new qparams, on the quantizer's device. They must be float32, the dtype every fake
        quantization here computes in: torch's CUDA kernels refuse float64 qparams, its CPU kernels
        compute with them, so a float64 mix-up is refused here, on the CPU too."""
        if scale.dtype != torch.float32 or zero_point.dtype != torch.float32:
            raise TypeError(f"quantizer qparams must be float32, got scale {scale.dtype} and "
                            f"zero point {zero_point.dtype}")
        if self.learns_scale:
            self.scale.data = scale.to(self.scale.device)
        else:
            self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.zero_point.device)

    @property
    def learns_scale(self) -> bool:
        """Whether the scale is a trainable parameter (LSQ, or AGQ's log2 scale)."""
        return isinstance(self.scale, nn.Parameter)

    def positive_scale(self) -> Tensor:
        """The scale a forward divides by: a learnable one as |scale| clamped to 1e-8 (it may move
        through 0 while training), a stored one as it is. 0-d or [C]."""
        return self.scale.abs().clamp(min=1e-8) if self.learns_scale else self.scale

    def int_zero_point(self) -> Tensor:
        """The 0-d zero point as int32, the fused kernels' dtype: cast once and kept until the buffer
        is replaced (a new range, a move to another device) or written in place (its `_version`).
        Never kept from inside a CUDA-graph capture, where the cast only runs when the graph replays."""
        zero_point = self.zero_point
        kept = self._int_zero_point
        if kept is not None and kept[0] is zero_point and kept[1] == zero_point._version:
            return kept[2]
        cast = zero_point.to(torch.int32)
        if not capturing(zero_point.device):
            self._int_zero_point = (zero_point, zero_point._version, cast)
        return cast

    def __getstate__(self) -> dict:
        """Copies and pickles start without the kept int32 zero point: a copied buffer is a new
        tensor whose version count does not continue the original's."""
        state = super().__getstate__()
        state["_int_zero_point"] = None
        return state

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        if self.channel_axis is None or t.dim() == 0:
            return t
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    def _learnable_scale(self, x: Tensor) -> Tensor:
        """The scale kept positive, with LSQ's gradient scaling on the uniform grid (identity for buffers).

        The log2 grid's scale gets its plain gradient: the reference's AGQ scale is a bare
        `nn.Parameter` (PTQ4SAM `fake_quant.py:647-654`), unlike its LSQ quantizers.
        """
        scale = self.scale
        if self.learns_scale and self.log2_tau is not None:
            return self.positive_scale()
        if self.learns_scale:
            numel = x.numel() if self.channel_axis is None else x.numel() // x.shape[self.channel_axis]
            g = qf.lsq_grad_scale(numel, self.bits)
            scale = (scale - scale * g).detach() + scale * g
            scale = scale.abs().clamp(min=1e-8)
        return scale

    def quantize(self, x: Tensor) -> Tensor:
        """The fake-quantized tensor (every element), whatever the mode."""
        if self.channel_axis is None and self.log2_tau is None:
            if self.learns_scale:
                return qf.fake_quant_affine_lsq(x, self.positive_scale(), self.int_zero_point(), self.bits)
            return qf.fake_quant_affine_fused(x, self.scale, self.int_zero_point(), self.bits)
        scale = self._broadcast(self._learnable_scale(x), x)
        if self.log2_tau is not None:
            return qf.fake_quant_log2(x, scale, self.log2_tau, self.bits)
        return qf.fake_quant_affine(x, scale, self._broadcast(self.zero_point, x), self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observer.update(x.detach())
            return x
        if fused_lsq.can_fuse(x, self):  # a training step on a GPU
            return fused_lsq.fused_fake_quant(x, self)
        x_hat = self.quantize(x)
        if self.quantize_prob < 1.0:
            uniform = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
            keep_quantized = uniform < self.quantize_prob
            x_hat = torch.where(keep_quantized, x_hat, x)
        return x_hat
