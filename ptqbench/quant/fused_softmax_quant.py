"""A quantized softmax for training steps: softmax over the last dim, then a per-tensor activation
quantizer (uniform LSQ grid or AGQ log2 grid, with QDrop's random keep), one Triton kernel forward
and one backward, for float32 CUDA logits.

In a reconstruction step of an attention unit, the eager chain (bias add, softmax, fake
quantization, QDrop's random draw and mix, and the backward of each) is about thirty passes over
the attention probabilities, [12 heads, 4096, 4096] per image in a SAM-B global block: most of
the step's time. Here the forward reads the logits once and writes the output once; the backward
reads the logits and the output gradient once and writes the logit gradient once. One program
handles one row (one query), whose keys lie on an [h, w] grid (h = 1 for a plain row), so an
optional separable bias, `row_bias[r, i] + col_bias[r, j]` on key (i, j), is added on the way in
(in the eager order: `(logits + row_bias) + col_bias`) and its two gradients are the row's sums
over j and over i. The forward keeps the logits and each row's max and exp-sum; the backward
recomputes the probabilities from them exactly, and QDrop's draw from its seed.

Arithmetic: float32 throughout (libdevice's exp, correctly rounded divisions, no fused
multiply-add). The fake quantization is the eager one, operation by operation (the uniform grid:
torch's `fake_quantize_per_tensor_affine`; the log2 grid: `fused_log2`). The softmax sums a row in
another order than torch's kernel, so a probability can differ from torch's in its last bit, and
then, rarely, fall on the other side of a rounding boundary; the random keep draws from Triton's
Philox stream (seeded from the quantizer's generator), not torch's. The gradients are the eager
chain's formulas; their sums are added in another order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ptqbench.quant import fused_log2, fused_lsq
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
UNIFORM, LOG2 = 0, 1
CHUNK = 1024  # keys per tile (a power of two)
NUM_WARPS = 4  # per program, for full tiles


if HAS_TRITON:
    from ptqbench.quant.fused_log2 import log2_backward, log2_forward
    from ptqbench.quant.fused_lsq import qdrop_kept, uniform_fake_quant

    @triton.jit
    def _chunk(logits_ptr, row_bias_ptr, col_bias_ptr, row, first, h, w, keys_per_row, HAS_BIAS: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_W: tl.constexpr):
        """Grid rows first .. first + BLOCK_I of one row's keys: (logits + bias as a [BLOCK_I, BLOCK_W]
        tile, -inf outside; the keys' offsets in the row; the valid mask)."""
        i = first + tl.arange(0, BLOCK_I)[:, None]
        j = tl.arange(0, BLOCK_W)[None, :]
        keys = i * w + j
        valid = (i < h) & (j < w) & (keys < keys_per_row)
        x = tl.load(logits_ptr + row * keys_per_row + keys, mask=valid, other=-float("inf"))
        if HAS_BIAS:
            x = (x + tl.load(row_bias_ptr + row * h + i, mask=i < h, other=0.0)) + tl.load(
                col_bias_ptr + row * w + j, mask=j < w, other=0.0)
        return x, keys, valid

    @triton.jit
    def _quantize(p, scale, zero_point, powers_ptr, qmax, neg_tau, GRID: tl.constexpr):
        """(the fake-quantized p, the uniform grid's on-grid mask) of a tile."""
        if GRID == 0:
            return uniform_fake_quant(p, scale, zero_point, qmax)
        return log2_forward(p, scale, powers_ptr, neg_tau, qmax), p >= 0.0

    @triton.jit
    def _forward_kernel(logits_ptr, row_bias_ptr, col_bias_ptr, scale_ptr, zero_point_ptr, powers_ptr, seed_ptr,
                        out_ptr, stats_ptr, rows, h, w, keys_per_row, qmax, neg_tau, quantize_prob,
                        HAS_BIAS: tl.constexpr, GRID: tl.constexpr, DROP: tl.constexpr, BLOCK_I: tl.constexpr,
                        BLOCK_W: tl.constexpr):
        """out[row] = quantizer(softmax(logits[row] + bias)); stats[0, row] = max, stats[1, row] = exp-sum.
        Pass 1 finds the max and the exp-sum (online, chunk by chunk), pass 2 writes the output."""
        row = tl.program_id(0).to(tl.int64)
        row_max = tl.full((), -float("inf"), tl.float32)
        row_sum = tl.full((), 0.0, tl.float32)
        for first in range(0, h, BLOCK_I):
            x, _, _ = _chunk(logits_ptr, row_bias_ptr, col_bias_ptr, row, first, h, w, keys_per_row, HAS_BIAS,
                             BLOCK_I, BLOCK_W)
            new_max = tl.maximum(row_max, tl.max(tl.max(x, axis=1), axis=0))
            row_sum = row_sum * libdevice.exp(row_max - new_max) + tl.sum(tl.sum(libdevice.exp(x - new_max), axis=1),
                                                                          axis=0)
            row_max = new_max
        scale = tl.load(scale_ptr)
        zero_point = tl.load(zero_point_ptr)
        for first in range(0, h, BLOCK_I):
            x, keys, valid = _chunk(logits_ptr, row_bias_ptr, col_bias_ptr, row, first, h, w, keys_per_row, HAS_BIAS,
                                    BLOCK_I, BLOCK_W)
            p = libdevice.div_rn(libdevice.exp(x - row_max), row_sum)
            quantized, _ = _quantize(p, scale, zero_point, powers_ptr, qmax, neg_tau, GRID)
            out = tl.where(qdrop_kept(seed_ptr, row, keys, quantize_prob, DROP), quantized, p)
            tl.store(out_ptr + row * keys_per_row + keys, out, mask=valid)
        tl.store(stats_ptr + row, row_max)
        tl.store(stats_ptr + rows + row, row_sum)

    @triton.jit
    def _backward_kernel(logits_ptr, row_bias_ptr, col_bias_ptr, scale_ptr, zero_point_ptr, powers_ptr, seed_ptr,
                         stats_ptr, grad_ptr, grad_logits_ptr, grad_row_bias_ptr, grad_col_bias_ptr, partial_ptr,
                         rows, h, w, keys_per_row, qmax, neg_tau, inv_tau, ln2, quantize_prob, HAS_BIAS: tl.constexpr,
                         GRID: tl.constexpr, DROP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_W: tl.constexpr):
        """grad_logits[row] (and the bias gradients) from grad[row]; partial[row] = the row's share of the
        scale gradient (before the uniform grid's factor LSQ scale / s). Pass 1 writes the gradient at
        the probabilities into grad_logits and sums its dot product with them; pass 2 turns it into
        the softmax's input gradient in place."""
        row = tl.program_id(0).to(tl.int64)
        row_max = tl.load(stats_ptr + row)
        row_sum = tl.load(stats_ptr + rows + row)
        scale = tl.load(scale_ptr)
        zero_point = tl.load(zero_point_ptr)
        dot = tl.full((), 0.0, tl.float32)
        partial = tl.full((), 0.0, tl.float32)
        for first in range(0, h, BLOCK_I):
            x, keys, valid = _chunk(logits_ptr, row_bias_ptr, col_bias_ptr, row, first, h, w, keys_per_row, HAS_BIAS,
                                    BLOCK_I, BLOCK_W)
            p = libdevice.div_rn(libdevice.exp(x - row_max), row_sum)
            kept = qdrop_kept(seed_ptr, row, keys, quantize_prob, DROP)
            grad = tl.load(grad_ptr + row * keys_per_row + keys, mask=valid, other=0.0)
            grad_quantized = tl.where(kept, grad, 0.0)
            if GRID == 0:
                quantized, on_grid = _quantize(p, scale, zero_point, powers_ptr, qmax, neg_tau, GRID)
                grad_p = tl.where(on_grid, grad_quantized, 0.0)
                scale_term = grad_quantized * (quantized - p * on_grid.to(tl.float32))
            else:
                grad_p, through_product, through_quotient = log2_backward(p, grad_quantized, scale, powers_ptr,
                                                                          neg_tau, inv_tau, qmax, ln2)
                scale_term = through_product + through_quotient
            grad_p = tl.where(kept, grad_p, grad)
            tl.store(grad_logits_ptr + row * keys_per_row + keys, grad_p, mask=valid)
            dot += tl.sum(tl.sum(grad_p * p, axis=1), axis=0)
            partial += tl.sum(tl.sum(tl.where(valid, scale_term, 0.0), axis=1), axis=0)
        tl.store(partial_ptr + row, partial)
        col_grad = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for first in range(0, h, BLOCK_I):
            x, keys, valid = _chunk(logits_ptr, row_bias_ptr, col_bias_ptr, row, first, h, w, keys_per_row, HAS_BIAS,
                                    BLOCK_I, BLOCK_W)
            p = libdevice.div_rn(libdevice.exp(x - row_max), row_sum)
            grad_p = tl.load(grad_logits_ptr + row * keys_per_row + keys, mask=valid, other=0.0)
            grad_x = tl.where(valid, p * (grad_p - dot), 0.0)
            tl.store(grad_logits_ptr + row * keys_per_row + keys, grad_x, mask=valid)
            if HAS_BIAS:
                i = first + tl.arange(0, BLOCK_I)
                tl.store(grad_row_bias_ptr + row * h + i, tl.sum(grad_x, axis=1), mask=i < h)
                col_grad += tl.sum(grad_x, axis=0)
        if HAS_BIAS:
            j = tl.arange(0, BLOCK_W)
            tl.store(grad_col_bias_ptr + row * w + j, col_grad, mask=j < w)


@dataclass(frozen=True)
class SoftmaxQuantSpec:
    """The constants of one call: the key grid [h, w], the quantizer's grid and its settings.

    grid: UNIFORM or LOG2; bits: the grid's bit width; tau: the log2 grid's tau (1 on the uniform grid);
    quantize_prob: QDrop's keep probability (1: every element quantized);
    lsq_factor: LSQ's gradient scale on the uniform grid (1.0 where the scale gets its plain gradient).
    """

    h: int
    w: int
    grid: int
    bits: int
    tau: int
    quantize_prob: float
    lsq_factor: float

    def launch(self) -> dict:
        """The kernels' shared scalar and compile-time arguments: a row is read in chunks of about
        CHUNK keys (whole grid rows), each an [BLOCK_I, BLOCK_W] tile."""
        keys = self.h * self.w
        h, w = self.h, self.w
        if h == 1 and w > CHUNK:  # a row without a grid: any tiling will do
            h, w = triton.cdiv(keys, CHUNK), CHUNK
        block_w = triton.next_power_of_2(w)
        block_i = max(1, min(triton.next_power_of_2(h), CHUNK // block_w))
        return {"h": h, "w": w, "keys_per_row": keys, "qmax": float(quant_range(self.bits)[1]),
                "neg_tau": float(-self.tau), "quantize_prob": self.quantize_prob, "GRID": self.grid,
                "DROP": self.quantize_prob < 1.0, "BLOCK_I": block_i, "BLOCK_W": block_w,
                "num_warps": NUM_WARPS if block_i * block_w >= 1024 else 2, "enable_fp_fusion": False}


class _QuantizedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, row_bias: Tensor | None, col_bias: Tensor | None, scale: Tensor,
                zero_point: Tensor, seed: Tensor, spec: SoftmaxQuantSpec) -> Tensor:
        rows = logits.numel() // (spec.h * spec.w)
        out = torch.empty_like(logits)
        stats = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
        powers = _powers(spec, logits.device)
        bias = (row_bias, col_bias) if row_bias is not None else (logits, logits)
        _forward_kernel[(rows,)](logits, *bias, scale, zero_point, powers, seed, out, stats, rows,
                                 HAS_BIAS=row_bias is not None, **spec.launch())
        ctx.save_for_backward(logits, row_bias, col_bias, scale, zero_point, seed, stats, powers)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, row_bias, col_bias, scale, zero_point, seed, stats, powers = ctx.saved_tensors
        spec = ctx.spec
        rows = stats.shape[1]
        has_bias = row_bias is not None
        grad_logits = torch.empty_like(logits)
        grad_row_bias = torch.empty_like(row_bias) if has_bias else None
        grad_col_bias = torch.empty_like(col_bias) if has_bias else None
        partials = torch.empty(rows, dtype=torch.float32, device=logits.device)
        bias = (row_bias, col_bias) if has_bias else (logits, logits)
        bias_grads = (grad_row_bias, grad_col_bias) if has_bias else (grad_logits, grad_logits)
        _backward_kernel[(rows,)](logits, *bias, scale, zero_point, powers, seed, stats,
                                  grad.contiguous(), grad_logits, *bias_grads, partials, rows,
                                  inv_tau=fused_log2.log2_constants(spec.tau, spec.bits)["inv_tau"],
                                  ln2=fused_log2.LN2, HAS_BIAS=has_bias, **spec.launch())
        grad_scale = None
        if ctx.needs_input_grad[3]:
            grad_scale = partials.sum()
            if spec.grid == UNIFORM:
                grad_scale = grad_scale * (spec.lsq_factor / scale)
            grad_scale = grad_scale.reshape(scale.shape)
        return grad_logits, grad_row_bias, grad_col_bias, grad_scale, None, None, None


def _powers(spec: SoftmaxQuantSpec, device: torch.device) -> Tensor:
    """The log2 grid's level table (`fused_log2.level_powers`); a one-element placeholder on the uniform grid."""
    if spec.grid == LOG2:
        return fused_log2.level_powers(spec.tau, spec.bits, device)
    return torch.ones(1, dtype=torch.float32, device=device)


def can_fuse(logits: Tensor, quantizer: FakeQuantizer) -> bool:
    """Whether `quantized_softmax` applies: Triton is present, the logits are float32 CUDA and need
    gradients (a training step; evaluation keeps torch's softmax), and the quantizer quantizes per
    tensor, with its scale on their device."""
    return (torch.is_grad_enabled() and logits.requires_grad
            and fused_lsq.quantizes_per_tensor_on(quantizer, logits))


def quantized_softmax(logits: Tensor, quantizer: FakeQuantizer, row_bias: Tensor | None = None,
                      col_bias: Tensor | None = None) -> Tensor:
    """quantizer(softmax(logits + bias, dim=-1)) in fused kernels (see the module docstring).

    logits: float32 CUDA [..., K], contiguous. Without bias the keys are one row (h = 1, w = K);
    with bias, row_bias [..., h] and col_bias [..., w] (the leading dims those of logits' rows)
    with h * w = K, and key i * w + j gets row_bias[..., i] + col_bias[..., j].
    quantizer: a `FakeQuantizer` in mode "quantize", per tensor (`can_fuse`): its scale (learnable
    or not), zero point, grid, quantize_prob and generator are used as its own forward uses them.
    Returns [..., K].
    """
    keys = logits.shape[-1]
    h, w = (1, keys) if row_bias is None else (row_bias.shape[-1], col_bias.shape[-1])
    if h * w != keys:
        raise ValueError(f"a key grid of {h} x {w} does not cover {keys} keys")
    log2 = quantizer.log2_tau is not None
    lsq_factor = lsq_grad_scale(logits.numel(), quantizer.bits) if quantizer.learns_scale and not log2 else 1.0
    spec = SoftmaxQuantSpec(h, w, LOG2 if log2 else UNIFORM, quantizer.bits, quantizer.log2_tau or 1,
                            float(quantizer.quantize_prob), lsq_factor)
    seed = fused_lsq.qdrop_seed(quantizer, logits.device)
    if row_bias is not None:
        row_bias, col_bias = row_bias.contiguous(), col_bias.contiguous()
    return _QuantizedSoftmax.apply(logits.contiguous(), row_bias, col_bias, quantizer.positive_scale(),
                                   quantizer.zero_point.float(), seed, spec)
