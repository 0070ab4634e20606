"""AdaRound's soft-rounded weight and its regulariser (`adaround.AdaRoundQuantizer`) in a training
step, each as one Triton kernel forward and one backward, for float32 CUDA tensors.

Eagerly, the soft weight `s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)` with the rectified
sigmoid `h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)` is nine element-wise kernels
forward and about as many backward, and the regulariser `sum(1 - |2 h(V) - 1|^beta)` as many again:
for the small weights of a reconstruction unit each kernel is a few microseconds, and together
they are a tenth of a step. Here each is one pass.

Arithmetic: the eager chain's, operation by operation, in its order (libdevice's exp and pow, the
constants rounded to float32 as torch rounds a Python number against a float32 tensor, correctly
rounded divisions, no fused multiply-add). The regulariser's value is summed in another order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.functional import quant_range

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

HAS_TRITON = triton is not None
BLOCK = 1024


if HAS_TRITON:

    @triton.jit
    def _rectified(v, stretch, shift):
        """(sigmoid(v), the unclamped stretch, h(v)) as torch computes them."""
        sig = libdevice.div_rn(1.0, 1.0 + libdevice.exp(-v))
        raw = sig * stretch + shift
        return sig, raw, tl.minimum(tl.maximum(raw, 0.0), 1.0)

    @triton.jit
    def _through_h(grad_h, sig, raw, stretch):
        """The gradient at v of a gradient at h(v): clamp (inclusive ends), the stretch, the sigmoid."""
        grad = tl.where((raw >= 0.0) & (raw <= 1.0), grad_h, 0.0) * stretch
        return (grad * (1.0 - sig)) * sig

    @triton.jit
    def _soft_forward_kernel(v_ptr, floor_ptr, scale_ptr, zero_point_ptr, out_ptr, numel, inner, qmin, qmax, stretch,
                             shift, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        channel = index // inner
        v = tl.load(v_ptr + index, mask=valid, other=0.0)
        zero_point = tl.load(zero_point_ptr + channel, mask=valid, other=0.0)
        _, _, h = _rectified(v, stretch, shift)
        level = (tl.load(floor_ptr + index, mask=valid, other=0.0) + h) + zero_point
        out = (tl.minimum(tl.maximum(level, qmin), qmax) - zero_point) * tl.load(scale_ptr + channel, mask=valid,
                                                                                   other=1.0)
        tl.store(out_ptr + index, out, mask=valid)

    @triton.jit
    def _soft_backward_kernel(v_ptr, floor_ptr, scale_ptr, zero_point_ptr, grad_ptr, grad_v_ptr, numel, inner, qmin,
                              qmax, stretch, shift, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        channel = index // inner
        v = tl.load(v_ptr + index, mask=valid, other=0.0)
        sig, raw, h = _rectified(v, stretch, shift)
        level = (tl.load(floor_ptr + index, mask=valid, other=0.0) + h) + tl.load(zero_point_ptr + channel,
                                                                                   mask=valid, other=0.0)
        grad = tl.load(grad_ptr + index, mask=valid, other=0.0) * tl.load(scale_ptr + channel, mask=valid, other=1.0)
        grad_h = tl.where((level >= qmin) & (level <= qmax), grad, 0.0)
        tl.store(grad_v_ptr + index, _through_h(grad_h, sig, raw, stretch), mask=valid)

    @triton.jit
    def _regularizer_forward_kernel(v_ptr, beta_ptr, partial_ptr, numel, stretch, shift, BLOCK: tl.constexpr):
        block = tl.program_id(0)
        index = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        _, _, h = _rectified(tl.load(v_ptr + index, mask=valid, other=0.0), stretch, shift)
        term = 1.0 - libdevice.pow(tl.abs(2.0 * h - 1.0), tl.load(beta_ptr))
        tl.store(partial_ptr + block, tl.sum(tl.where(valid, term, 0.0), axis=0))

    @triton.jit
    def _regularizer_backward_kernel(v_ptr, beta_ptr, grad_ptr, grad_v_ptr, numel, stretch, shift,
                                     BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        sig, raw, h = _rectified(tl.load(v_ptr + index, mask=valid, other=0.0), stretch, shift)
        centred = 2.0 * h - 1.0
        beta = tl.load(beta_ptr)
        grad = -tl.load(grad_ptr)
        grad = tl.where(beta == 0.0, 0.0, grad * (beta * libdevice.pow(tl.abs(centred), beta - 1.0)))
        sign = tl.where(centred > 0.0, 1.0, tl.where(centred < 0.0, -1.0, 0.0))
        grad_h = (grad * sign) * 2.0
        tl.store(grad_v_ptr + index, _through_h(grad_h, sig, raw, stretch), mask=valid)


class _SoftWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, w_floor: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                stretch: tuple[float, float]) -> Tensor:
        qmin, qmax = quant_range(bits)
        out = torch.empty_like(v)
        inner = v.numel() // scale.numel()
        blocks = triton.cdiv(v.numel(), BLOCK)
        _soft_forward_kernel[(blocks,)](v, w_floor, scale, zero_point, out, v.numel(), inner, float(qmin),
                                        float(qmax), *stretch, BLOCK=BLOCK, enable_fp_fusion=False)
        ctx.save_for_backward(v, w_floor, scale, zero_point)
        ctx.bits, ctx.stretch = bits, stretch
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        v, w_floor, scale, zero_point = ctx.saved_tensors
        qmin, qmax = quant_range(ctx.bits)
        grad_v = torch.empty_like(v)
        blocks = triton.cdiv(v.numel(), BLOCK)
        _soft_backward_kernel[(blocks,)](v, w_floor, scale, zero_point, grad.contiguous(), grad_v, v.numel(),
                                         v.numel() // scale.numel(), float(qmin), float(qmax), *ctx.stretch,
                                         BLOCK=BLOCK, enable_fp_fusion=False)
        return grad_v, None, None, None, None, None


class _Regularizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, beta: Tensor, stretch: tuple[float, float]) -> Tensor:
        blocks = triton.cdiv(v.numel(), BLOCK)
        partials = torch.empty(blocks, dtype=torch.float32, device=v.device)
        _regularizer_forward_kernel[(blocks,)](v, beta, partials, v.numel(), *stretch, BLOCK=BLOCK,
                                               enable_fp_fusion=False)
        ctx.save_for_backward(v, beta)
        ctx.stretch = stretch
        return partials.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        v, beta = ctx.saved_tensors
        grad_v = torch.empty_like(v)
        blocks = triton.cdiv(v.numel(), BLOCK)
        _regularizer_backward_kernel[(blocks,)](v, beta, grad.contiguous(), grad_v, v.numel(), *ctx.stretch,
                                                BLOCK=BLOCK, enable_fp_fusion=False)
        return grad_v, None, None


def can_fuse(v: Tensor) -> bool:
    """Whether the fused kernels apply: Triton is present, V is float32 CUDA, gradients are on."""
    return HAS_TRITON and v.is_cuda and v.dtype == torch.float32 and torch.is_grad_enabled()


def _stretch(zeta: float, gamma: float) -> tuple[float, float]:
    """(zeta - gamma, gamma) rounded to float32, as torch rounds a Python number against a float32 tensor."""
    return float(np.float32(zeta - gamma)), float(np.float32(gamma))


def soft_weight(v: Tensor, w_floor: Tensor, scale: Tensor, zero_point: Tensor, bits: int, zeta: float,
                gamma: float) -> Tensor:
    """`AdaRoundQuantizer.forward` fused. v, w_floor: [C, ...] float32 CUDA, contiguous; scale and
    zero_point: one value per channel of dim 0 ([C, 1, ...]) or one in all; returns v's shape."""
    return _SoftWeight.apply(v, w_floor, scale.contiguous(), zero_point.contiguous(), bits, _stretch(zeta, gamma))


def regularizer(v: Tensor, beta: Tensor | float, zeta: float, gamma: float) -> Tensor:
    """`AdaRoundQuantizer.regularizer` fused: sum(1 - |2 h(V) - 1|^beta) (0-d). beta: a 0-d
    float32 tensor on V's device (a number is put there first)."""
    if not isinstance(beta, Tensor):
        beta = torch.tensor(beta, dtype=torch.float32, device=v.device)
    return _Regularizer.apply(v, beta, _stretch(zeta, gamma))
