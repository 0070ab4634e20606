"""The decomposed relative-position add of SAM's encoder attention as one pass on the GPU.

segment_anything adds the height and the width term in two broadcasting passes,
`(attn + rel_h) + rel_w`, and each pass reads and writes the whole attention-logit tensor. In a
SAM-H global block that tensor is 1 GiB per image. `add_rel_pos_` does both additions in one
pass, in place. Each element gets the same two float32 additions in the same order, so the result
is bit-identical.

It is a Triton kernel, used on CUDA tensors with autograd off (evaluation). Platforms without
Triton (the macOS wheels of PyTorch) keep segment_anything's two passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HAS_TRITON = triton is not None


if HAS_TRITON:

    @triton.jit
    def _add_rel_pos_kernel(attn_ptr, rel_h_ptr, rel_w_ptr,
                            h: tl.constexpr, w: tl.constexpr, BLOCK: tl.constexpr):
        """One program per query row r of attn [R, h*w]: attn[r, k*w + l] = (attn + rel_h[r, k]) + rel_w[r, l]."""
        row = tl.program_id(0).to(tl.int64)
        keys: tl.constexpr = h * w
        for start in range(0, keys, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < keys
            logits = tl.load(attn_ptr + row * keys + cols, mask=inside)
            height_term = tl.load(rel_h_ptr + row * h + cols // w, mask=inside)
            width_term = tl.load(rel_w_ptr + row * w + cols % w, mask=inside)
            tl.store(attn_ptr + row * keys + cols, (logits + height_term) + width_term, mask=inside)


def can_fuse(attn: Tensor) -> bool:
    """Whether `add_rel_pos_` applies: Triton is present and these are float32 CUDA logits computed
    with autograd off (evaluation; never inside a calibration step, which may be a CUDA graph)."""
    return HAS_TRITON and attn.is_cuda and attn.dtype == torch.float32 and not torch.is_grad_enabled()


def add_rel_pos_(attn: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """attn [B, h*w, h*w] += rel_h [B, h, w, h] (over the key's row) + rel_w [B, h, w, w] (over the
    key's column), in place and in segment_anything's order; returns attn."""
    batch, h, w, _ = rel_h.shape
    keys = h * w
    if attn.shape != (batch, keys, keys) or not attn.is_contiguous():
        raise ValueError(f"attention logits {tuple(attn.shape)} are not a contiguous [{batch}, {keys}, {keys}]")
    block = min(1024, triton.next_power_of_2(keys))
    _add_rel_pos_kernel[(batch * keys,)](attn, rel_h.contiguous(), rel_w.contiguous(), h, w, BLOCK=block)
    return attn
