"""Pure fake-quantization functions (simulated in floating point).

Conventions (shared by every method): uniform affine, asymmetric, unsigned grid with
qmin = 0 and qmax = 2^b - 1. Per-channel parameters are tensors broadcastable against the
input (e.g. shape [C, 1] for a [C, K] weight); per-tensor parameters are 0-d tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ptqbench.quant import fused_log2


def quant_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the unsigned b-bit grid."""
    return 0, 2**bits - 1


def lsq_grad_scale(numel: int, bits: int) -> float:
    """LSQ's gradient scale 1/sqrt(numel * qmax) for a scale shared by `numel` elements."""
    return 1.0 / math.sqrt(numel * quant_range(bits)[1])


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even, as torch.round) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: Tensor, low: float, high: float) -> Tensor:
    """clamp(x, low, high) whose gradient is 1 wherever low <= x <= high, grid ends included.

    The reference code runs on torch 1.10.2 (its `environment.sh`), whose `torch.clamp` passes the
    gradient at exactly `low` and `high`; recent torch gives 0 there. This explicit inclusive mask
    gives the reference's straight-through gradient on every torch version. x: any shape.
    """
    inside = (x >= low) & (x <= high)
    return torch.where(inside, x, x.detach().clamp(low, high))


def affine_qparams(x_min: Tensor, x_max: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering [x_min, x_max] (widened to include 0).

    s = max(max(x_max, 0) - min(x_min, 0), 1e-8) / (qmax - qmin)
    z = clamp(qmin - round(min(x_min, 0) / s), qmin, qmax)
    Shapes: x_min, x_max any shape S (per-tensor: 0-d); returns scale, zero_point of shape S.
    """
    qmin, qmax = quant_range(bits)
    lo = torch.clamp(x_min, max=0.0)
    hi = torch.clamp(x_max, min=0.0)
    scale = torch.clamp(hi - lo, min=1e-8) / (qmax - qmin)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def fake_quant_affine(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """x_hat = (clamp(round(x/s) + z, qmin, qmax) - z) * s, with STE through the rounding.

    x/s is computed as x * (1/s) in fp32, the arithmetic of PyTorch's fused
    `fake_quantize_per_tensor_affine` kernel, so the fused evaluation path
    (`fake_quant_affine_fused`) gives bit-identical results.
    Gradients flow to x (straight through inside the clamp range, grid ends included: `clamp_ste`)
    and to `scale` (LSQ-style). x: any shape; scale, zero_point broadcastable to x.
    """
    qmin, qmax = quant_range(bits)
    q = clamp_ste(round_ste(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_affine_fused(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Per-tensor `fake_quant_affine` in one fused kernel (no gradient to the scale).

    x: any shape; scale and zero_point: 0-d or [1] tensors (zero_point holds an integer value; given
    as int32, as `FakeQuantizer.int_zero_point` keeps it, it is not cast again on every call).
    """
    qmin, qmax = quant_range(bits)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), as_int32(zero_point).reshape(1), qmin, qmax)


def as_int32(zero_point: Tensor) -> Tensor:
    """The zero point in the dtype the fused fake-quant kernels take (int32), cast only when it is not."""
    return zero_point if zero_point.dtype == torch.int32 else zero_point.to(torch.int32)


class _LsqFakeQuant(torch.autograd.Function):
    """Per-tensor fused fake quant whose backward gives LSQ's gradients, without host syncs.

    The fused kernel also returns the on-grid mask (round(x/s) + z within [qmin, qmax]). Inside,
    d x_hat / ds = round(x/s) - x/s = (x_hat - x)/s; outside, x_hat/s = clamp(level) - z; so the
    scale gradient is sum(grad * (x_hat - x * mask)) / s.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                grad_factor: float) -> Tensor:
        enabled = torch.ones(1, dtype=torch.long, device=x.device)
        x_hat, mask = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale.reshape(1), as_int32(zero_point).reshape(1), enabled, qmin, qmax)
        ctx.save_for_backward(x, x_hat, mask, scale)
        ctx.grad_factor = grad_factor
        return x_hat

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x_hat, mask, scale = ctx.saved_tensors
        grad_scale = (grad * (x_hat - x * mask)).sum() * (ctx.grad_factor / scale)
        return grad * mask, grad_scale.reshape(scale.shape), None, None, None, None


def fake_quant_affine_lsq(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Per-tensor `fake_quant_affine` (same forward, one fused kernel) with LSQ's gradients.

    x gets the straight-through gradient where round(x/s) + z lies on the grid, 0 elsewhere; the
    scale gets `sum(grad * (round(x/s) - x/s))` inside and `sum(grad * (clamp(level) - z))`
    outside, times LSQ's gradient scale 1/sqrt(numel * qmax). No gradient to the zero point.
    Nothing is read back to the host (the reconstruction hot path stays asynchronous).
    x: any shape; scale (> 0) and zero_point: 0-d tensors (zero_point float or int32).
    """
    qmin, qmax = quant_range(bits)
    return _LsqFakeQuant.apply(x, scale, zero_point, qmin, qmax, lsq_grad_scale(x.numel(), bits))


def fake_quant_log2(a: Tensor, scale: Tensor, tau: int, bits: int) -> Tensor:
    """The AGQ log2 quantizer with base 2^(1/tau) for non-negative inputs (softmax outputs).

    a_int = round(-tau * log2(a / s)); a_hat = s * 2^(-clamp(a_int, 0, 2^b - 1) / tau);
    elements whose a_int >= 2^b (below the smallest level, including a = 0) become exactly 0.
    a: any shape, values >= 0; scale: 0-d tensor (learnable, gradient through the STE and the
    inclusive `clamp_ste`, as the reference). float32 CUDA input with Triton present: the same values
    and input gradients, bit for bit, from two fused kernels (`fused_log2`); else
    `fake_quant_log2_eager`.
    """
    if fused_log2.can_fuse(a, scale):
        return fused_log2.fused_fake_quant_log2(a, scale, tau, bits)
    return fake_quant_log2_eager(a, scale, tau, bits)


def fake_quant_log2_eager(a: Tensor, scale: Tensor, tau: int, bits: int) -> Tensor:
    """`fake_quant_log2` as torch expressions (any device and dtype; autograd differentiates them)."""
    levels = 2**bits
    a_int = round_ste(-tau * torch.log2(torch.clamp(a, min=1e-30) / scale))
    a_hat = scale * torch.pow(2.0, -clamp_ste(a_int, 0, levels - 1) / tau)
    below_grid = (a_int >= levels) | (a <= 0)
    return torch.where(below_grid, torch.zeros_like(a_hat), a_hat)
