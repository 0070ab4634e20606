"""A per-tensor uniform activation quantizer in a training step, with QDrop's random keep and LSQ's
gradients, as one Triton kernel forward and one backward, for float32 CUDA tensors.

The eager chain (torch's fake quantization with its mask, the uniform draw, the comparison, the
mix, and their backwards, the scale's gradient sum) is about twenty passes over the activation;
here the forward reads x once and writes the output once, and the backward reads x and the output
gradient once, writes the input gradient and leaves one partial sum of the scale gradient per block.

Arithmetic: the forward is torch's `fake_quantize_per_tensor_affine`, operation by operation
(x * float32(1 / s), round half to even, + z, clamp to the grid, - z, * s; no fused multiply-add),
so a kept element equals the eager value bit for bit. The random keep draws from Triton's Philox
stream, seeded from the quantizer's generator, not torch's. The input gradient is the eager one
(straight through on the grid); the scale gradient is the same sum added in another order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ptqbench.quant.functional import lsq_grad_scale, quant_range

if TYPE_CHECKING:
    from ptqbench.quant.quantizer import FakeQuantizer

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

HAS_TRITON = triton is not None
BLOCK = 2048


if HAS_TRITON:

    @triton.jit
    def uniform_fake_quant(x, scale, zero_point, qmax):
        """(the fake-quantized x, the on-grid mask) of a block of any layout."""
        level = libdevice.rint(x * libdevice.div_rn(1.0, scale)) + zero_point
        on_grid = (level >= 0.0) & (level <= qmax)
        return (tl.minimum(tl.maximum(level, 0.0), qmax) - zero_point) * scale, on_grid

    @triton.jit
    def qdrop_kept(seed_ptr, stream, offsets, quantize_prob, DROP: tl.constexpr):
        """QDrop's draw: which elements of a block take the quantized value. Each block draws from
        its own Philox stream (the seed at seed_ptr + `stream`), at its elements' `offsets`."""
        if DROP:
            return tl.rand(tl.load(seed_ptr) + stream, offsets) < quantize_prob
        return offsets >= 0

    @triton.jit
    def _forward_kernel(x_ptr, scale_ptr, zero_point_ptr, seed_ptr, out_ptr, numel, qmax, quantize_prob,
                        DROP: tl.constexpr, BLOCK: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        index = block * BLOCK + offsets
        valid = index < numel
        x = tl.load(x_ptr + index, mask=valid, other=0.0)
        quantized, _ = uniform_fake_quant(x, tl.load(scale_ptr), tl.load(zero_point_ptr), qmax)
        out = tl.where(qdrop_kept(seed_ptr, block, offsets, quantize_prob, DROP), quantized, x)
        tl.store(out_ptr + index, out, mask=valid)

    @triton.jit
    def _backward_kernel(x_ptr, scale_ptr, zero_point_ptr, seed_ptr, grad_ptr, grad_x_ptr, partial_ptr, numel, qmax,
                         quantize_prob, DROP: tl.constexpr, BLOCK: tl.constexpr):
        """grad_x of one block, and partial[block] = sum(grad * (x_hat - x * on_grid)) over its kept elements."""
        block = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        index = block * BLOCK + offsets
        valid = index < numel
        x = tl.load(x_ptr + index, mask=valid, other=0.0)
        grad = tl.load(grad_ptr + index, mask=valid, other=0.0)
        quantized, on_grid = uniform_fake_quant(x, tl.load(scale_ptr), tl.load(zero_point_ptr), qmax)
        kept = qdrop_kept(seed_ptr, block, offsets, quantize_prob, DROP)
        tl.store(grad_x_ptr + index, tl.where(kept, grad * on_grid.to(tl.float32), grad), mask=valid)
        term = tl.where(kept & valid, grad * (quantized - x * on_grid.to(tl.float32)), 0.0)
        tl.store(partial_ptr + block, tl.sum(term, axis=0))


class _FusedLsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, seed: Tensor, qmax: float, quantize_prob: float,
                lsq_factor: float) -> Tensor:
        out = torch.empty_like(x)
        blocks = triton.cdiv(x.numel(), BLOCK)
        _forward_kernel[(blocks,)](x, scale, zero_point, seed, out, x.numel(), qmax, quantize_prob,
                                   DROP=quantize_prob < 1.0, BLOCK=BLOCK, enable_fp_fusion=False)
        ctx.save_for_backward(x, scale, zero_point, seed)
        ctx.settings = (qmax, quantize_prob, lsq_factor)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, zero_point, seed = ctx.saved_tensors
        qmax, quantize_prob, lsq_factor = ctx.settings
        blocks = triton.cdiv(x.numel(), BLOCK)
        grad_x = torch.empty_like(x)
        partials = torch.empty(blocks, dtype=torch.float32, device=x.device)
        _backward_kernel[(blocks,)](x, scale, zero_point, seed, grad.contiguous(), grad_x, partials, x.numel(), qmax,
                                    quantize_prob, DROP=quantize_prob < 1.0, BLOCK=BLOCK, enable_fp_fusion=False)
        grad_scale = (partials.sum() * (lsq_factor / scale)).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_scale, None, None, None, None, None


def qdrop_seed(quantizer: FakeQuantizer, device: torch.device) -> Tensor:
    """The seed of one forward's QDrop draw ([1] int64 on `device`), drawn from the quantizer's
    generator (graph-safe: a replayed graph draws a fresh one); zero when nothing is dropped."""
    if quantizer.quantize_prob < 1.0:
        return torch.randint(0, 2**31, (1,), generator=quantizer.generator, device=device)
    return torch.zeros(1, dtype=torch.int64, device=device)


def quantizes_per_tensor_on(quantizer: FakeQuantizer, x: Tensor) -> bool:
    """Whether Triton is present, x is float32 CUDA and the quantizer is in mode "quantize", per
    tensor, with a float32 scale on x's device: what every fused training kernel needs."""
    return (HAS_TRITON and x.is_cuda and x.dtype == torch.float32 and quantizer.mode == "quantize"
            and quantizer.channel_axis is None and quantizer.scale.dim() == 0
            and quantizer.scale.device == x.device and quantizer.scale.dtype == torch.float32)


def can_fuse(x: Tensor, quantizer: FakeQuantizer) -> bool:
    """Whether `fused_fake_quant` applies: a step that needs gradients (x's or the learnable
    scale's) and a per-tensor uniform site (`quantizes_per_tensor_on`)."""
    return (torch.is_grad_enabled() and (x.requires_grad or quantizer.learns_scale)
            and quantizer.log2_tau is None and quantizes_per_tensor_on(quantizer, x))


def fused_fake_quant(x: Tensor, quantizer: FakeQuantizer) -> Tensor:
    """The quantizer's training forward (`FakeQuantizer.forward` in mode "quantize": fake
    quantization, LSQ's gradient to a learnable scale, QDrop's keep with `quantize_prob` drawn from
    its generator) in fused kernels. x: float32 CUDA, any shape (`can_fuse`); returns x's shape."""
    prob = float(quantizer.quantize_prob)
    seed = qdrop_seed(quantizer, x.device)
    lsq_factor = lsq_grad_scale(x.numel(), quantizer.bits) if quantizer.learns_scale else 0.0
    return _FusedLsq.apply(x.contiguous(), quantizer.positive_scale(), quantizer.zero_point.float(), seed,
                           float(quant_range(quantizer.bits)[1]), prob, lsq_factor)
