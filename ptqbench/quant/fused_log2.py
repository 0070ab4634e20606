"""The AGQ log2 fake quantization (`functional.fake_quant_log2`) and its gradients in two Triton
kernels, for float32 CUDA tensors.

The eager expression is about twenty element-wise kernels forward and as many backward, each a
pass over the attention probabilities (a SAM-B global block: [12 heads, 4096, 4096] per image),
and autograd keeps a dozen of those tensors for the backward. Here the forward reads the input
once and writes the output once; the backward reads the input and the output gradient once,
writes the input gradient, and leaves one partial sum per block for each of the scale gradient's
two terms. Only the input is kept for the backward (the softmax keeps it anyway).

Element arithmetic: the eager chain's, operation by operation, in the order torch's CUDA kernels
do it (a division by a Python number is a multiplication by its float32 reciprocal, as torch's
`div` with a host scalar; the log2 backward divides by `u * float32(ln 2)`; `2^(-c/tau)` of the
integer level c is read from a table torch's own `pow` computes, `level_powers`, because torch's
`pow(2, e)` is not libdevice's `powf`), with correctly rounded divisions and no fused
multiply-add: the output and the input gradient equal the eager ones bit for bit
(`tests/test_fused_log2.py`). The scale gradient is the same two sums, added in a fixed block order
that differs from torch's reduction order, so it can differ from the eager one in the last bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.graph_capture import capturing

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

HAS_TRITON = triton is not None
BLOCK = 2048
# log(2) as torch's pow and log2 backwards use it: a float64 constant rounded to float32.
LN2 = float(np.float32(math.log(2.0)))


if HAS_TRITON:

    @triton.jit
    def _levels(a, scale, powers_ptr, neg_tau, top):
        """The chain's shared part: (u = max(a, tiny) / s, inside, below, p = 2^(-c/tau) of the clamped level c)."""
        u = libdevice.div_rn(tl.maximum(a, 1e-30), scale)
        t = libdevice.log2(u) * neg_tau
        level = t + (libdevice.rint(t) - t)
        inside = (level >= 0.0) & (level <= top)
        clamped = tl.minimum(tl.maximum(level, 0.0), top)
        power = tl.load(powers_ptr + clamped.to(tl.int32))
        below = (level >= top + 1.0) | (a <= 0.0)
        return u, inside, below, power

    @triton.jit
    def log2_forward(a, scale, powers_ptr, neg_tau, top):
        """fake_quant_log2(a) of a block of elements (a tensor of any layout)."""
        _, _, below, power = _levels(a, scale, powers_ptr, neg_tau, top)
        return tl.where(below, 0.0, scale * power)

    @triton.jit
    def _forward_kernel(a_ptr, scale_ptr, powers_ptr, out_ptr, numel, neg_tau, top, BLOCK: tl.constexpr):
        """out = fake_quant_log2(a) over one block of BLOCK elements."""
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        a = tl.load(a_ptr + index, mask=valid, other=1.0)
        scale = tl.load(scale_ptr)
        tl.store(out_ptr + index, log2_forward(a, scale, powers_ptr, neg_tau, top), mask=valid)

    @triton.jit
    def log2_backward(a, grad, scale, powers_ptr, neg_tau, inv_tau, top, ln2):
        """(grad_a, the scale gradient's term through `s * p`, its term through `a / s`) per element."""
        u, inside, below, power = _levels(a, scale, powers_ptr, neg_tau, top)
        grad_out = tl.where(below, 0.0, grad)
        grad_exponent = (grad_out * scale) * (power * ln2)
        grad_level = tl.where(inside, -(grad_exponent * inv_tau), 0.0)
        grad_log = libdevice.div_rn(grad_level * neg_tau, u * ln2)
        grad_a = tl.where(a >= 1e-30, libdevice.div_rn(grad_log, scale), 0.0)
        return grad_a, grad_out * power, -grad_log * libdevice.div_rn(u, scale)

    @triton.jit
    def _backward_kernel(a_ptr, scale_ptr, powers_ptr, grad_ptr, grad_a_ptr, partial_ptr, numel, neg_tau, inv_tau,
                         top, ln2, BLOCK: tl.constexpr):
        """grad_a over one block, and the block's sums of the two scale-gradient terms
        (through `s * p`, and through `a / s`) -> partial[0, block], partial[1, block]."""
        block = tl.program_id(0)
        index = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = index < numel
        a = tl.load(a_ptr + index, mask=valid, other=1.0)
        grad = tl.load(grad_ptr + index, mask=valid, other=0.0)
        scale = tl.load(scale_ptr)
        grad_a, through_product, through_quotient = log2_backward(a, grad, scale, powers_ptr, neg_tau, inv_tau, top,
                                                                  ln2)
        tl.store(grad_a_ptr + index, grad_a, mask=valid)
        tl.store(partial_ptr + block, tl.sum(tl.where(valid, through_product, 0.0), axis=0))
        tl.store(partial_ptr + tl.num_programs(0) + block, tl.sum(tl.where(valid, through_quotient, 0.0), axis=0))


def can_fuse(a: Tensor, scale: Tensor) -> bool:
    """Whether the fused kernels apply: Triton is present, `a` is float32 CUDA and `scale` a 0-d
    float32 tensor on its device."""
    return (HAS_TRITON and a.is_cuda and a.dtype == torch.float32 and scale.dim() == 0
            and scale.dtype == torch.float32 and scale.device == a.device)


def level_powers(tau: int, bits: int, device: torch.device) -> Tensor:
    """2^(-c / tau) for every level c = 0 .. 2^bits - 1: float32 [2^bits] on `device`, computed by
    the torch expressions of `fake_quant_log2_eager` (so each value is the eager one, bit for bit,
    whatever algorithm torch's `pow` uses). Read-only: one table per (tau, bits, device) is kept
    and shared, except while a CUDA graph is being captured (a table made then would hold its
    values only once the graph replays), when a fresh one is computed."""
    if capturing(device):
        return _compute_level_powers(tau, bits, device)
    return _kept_level_powers(tau, bits, device)


def _compute_level_powers(tau: int, bits: int, device: torch.device) -> Tensor:
    levels = torch.arange(2**bits, dtype=torch.float32, device=device)
    return torch.pow(2.0, -levels / tau)


@functools.lru_cache(maxsize=64)
def _kept_level_powers(tau: int, bits: int, device: torch.device) -> Tensor:
    powers = _compute_level_powers(tau, bits, device)
    if device.type == "cuda":  # finished before any stream reads it
        torch.cuda.current_stream(device).synchronize()
    return powers


def log2_constants(tau: int, bits: int) -> dict[str, float]:
    """The kernels' scalars: -tau, float32(1 / tau) as torch's division computes it, the top level."""
    return {"neg_tau": float(-tau), "inv_tau": float(np.float32(1.0) / np.float32(tau)),
            "top": float(2**bits - 1)}


class _FusedLog2(torch.autograd.Function):
    """fake_quant_log2 with the forward and the backward each in one Triton kernel."""

    @staticmethod
    def forward(ctx, a: Tensor, scale: Tensor, tau: int, bits: int) -> Tensor:
        a = a.contiguous()
        out = torch.empty_like(a)
        blocks = triton.cdiv(a.numel(), BLOCK)
        constants = log2_constants(tau, bits)
        _forward_kernel[(blocks,)](a, scale, level_powers(tau, bits, a.device), out, a.numel(), constants["neg_tau"],
                                   constants["top"], BLOCK=BLOCK, enable_fp_fusion=False)
        ctx.save_for_backward(a, scale)
        ctx.tau, ctx.bits = tau, bits
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, scale = ctx.saved_tensors
        grad = grad.contiguous()
        blocks = triton.cdiv(a.numel(), BLOCK)
        grad_a = torch.empty_like(a)
        partials = torch.empty(2, blocks, dtype=torch.float32, device=a.device)
        powers = level_powers(ctx.tau, ctx.bits, a.device)
        _backward_kernel[(blocks,)](a, scale, powers, grad, grad_a, partials, a.numel(),
                                    **log2_constants(ctx.tau, ctx.bits), ln2=LN2, BLOCK=BLOCK, enable_fp_fusion=False)
        grad_scale = partials.sum(dim=1)
        grad_scale = (grad_scale[0] + grad_scale[1]).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_a if ctx.needs_input_grad[0] else None, grad_scale, None, None


def fused_fake_quant_log2(a: Tensor, scale: Tensor, tau: int, bits: int) -> Tensor:
    """`functional.fake_quant_log2` in fused kernels (see the module docstring).

    a: float32 CUDA, any shape, values >= 0; scale: 0-d float32 on a's device (may require grad);
    returns a tensor of a's shape (contiguous).
    """
    return _FusedLog2.apply(a, scale, tau, bits)
