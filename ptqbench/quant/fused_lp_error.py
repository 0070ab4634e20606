"""The MSE range searches' losses on the GPU, in Triton kernels that read the data once per
candidate and never leave the device.

Per tensor (`FusedLpError`, the activations' lockstep searches): every pending candidate of a
lockstep step is scored in two kernel launches, where `lockstep.lp_error` makes five launches and
about ten passes over the tensor per candidate. The first launch computes, for every (search,
chunk of its tensor) pair, the partial sum of |Q(x) - x|^p over the chunk; the second adds each
search's partials.

Per channel (`channel_grid_minima`, the weights' 2-D grid): one launch scores every (range, zero
point) candidate of every channel and keeps each range's best zero point, where the eager walk
makes tens of launches and a host round trip per range.

Element arithmetic: that of the eager torch expressions (the fake quantization `rint(x * (1.0f /
s)) + z` per tensor, `rint(x / s) + z` with a correctly rounded division per channel; clamp, minus
z, times s, minus x, absolute value; floating-point contraction off, so no fused multiply-add
changes a bit), with one exception: for a non-integer p, `|e|^p` is `e^floor(p)` (products) times
libdevice's `exp2(frac(p) * log2(e))`, which differs from torch's `pow` in the last bits of some
elements (p = 2 is the exact `e * e` on both); single elements stay within 4e-7 relative of
torch's `pow` (`tests/test_lockstep.py`). libdevice's `powf`, used before, made the searches
compute-bound with its extended-precision logarithm (SAM-B `mse` activations on an H200, 32
images: 44.7 s with `powf`, 28.9 s with this). Summation: float32, in an order fixed by the
tensor alone (chunks start at its first element, partials are added in one pattern), so a search
scores the same whichever searches share its launch; torch's own GPU reduction order depends on
the tensor size and the GPU's number of multiprocessors. A loss therefore differs from the eager
one in the last bits, and a bounded search that sees it may stop at a point that differs within
its tolerance; on a flat loss it can stop near another local minimum of about equal loss. Of the
reference's twelve averaged-MSE fixtures, one (post-GELU activations at 6 bits) ends outside the
fixture's tolerance on a GPU for that reason (two did with `powf`); the CPU path matches every
one (`tests/test_parity_primitives.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.functional import quant_range
from ptqbench.transfer import upload

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

HAS_TRITON = triton is not None
BLOCK = 1024
CHUNK = 32 * BLOCK


def power_split(p: float) -> dict[str, object]:
    """The kernels' form of the exponent: p = P_INT + p_frac with P_INT = floor(float32(p)) (the
    exponent torch's pow uses is float32(p)) and p_frac in [0, 1) exact in float32."""
    p32 = np.float32(p)
    whole = int(np.floor(p32))
    return {"p_frac": float(p32 - np.float32(whole)), "P_INT": whole, "HAS_FRAC": bool(p32 != np.float32(whole))}


if HAS_TRITON:

    @triton.jit
    def _abs_power(error, p_frac, P_INT: tl.constexpr, HAS_FRAC: tl.constexpr):
        """|error|^p for error >= 0: error^P_INT by repeated products, times 2^(p_frac log2(error))."""
        power = tl.full(error.shape, 1.0, tl.float32)
        for _ in tl.static_range(P_INT):
            power = power * error
        if HAS_FRAC:
            power = power * libdevice.exp2(p_frac * libdevice.log2(error))
        return power

    @triton.jit
    def _partial_sums_kernel(address_ptr, numel_ptr, first_chunk_ptr, qparams_ptr, chunk_row_ptr, partial_ptr,
                             qmin, qmax, p_frac, P_INT: tl.constexpr, HAS_FRAC: tl.constexpr, BLOCK: tl.constexpr,
                             CHUNK: tl.constexpr):
        """Program c: the sum of |Q(x) - x|^p over chunk c (of its search's tensor) -> partial[c]."""
        chunk = tl.program_id(0)
        row = tl.load(chunk_row_ptr + chunk)
        x_ptr = tl.load(address_ptr + row).to(tl.pointer_type(tl.float32))
        numel = tl.load(numel_ptr + row)
        start = (chunk - tl.load(first_chunk_ptr + row)).to(tl.int64) * CHUNK
        scale = tl.load(qparams_ptr + 3 * row)
        inv_scale = tl.load(qparams_ptr + 3 * row + 1)
        zero_point = tl.load(qparams_ptr + 3 * row + 2)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(0, CHUNK, BLOCK):
            index = start + offset + tl.arange(0, BLOCK)
            inside = index < numel
            x = tl.load(x_ptr + index, mask=inside, other=0.0)
            level = tl.minimum(tl.maximum(libdevice.rint(x * inv_scale) + zero_point, qmin), qmax)
            error = tl.abs((level - zero_point) * scale - x)
            total += tl.where(inside, _abs_power(error, p_frac, P_INT, HAS_FRAC), 0.0)
        tl.store(partial_ptr + chunk, tl.sum(total, axis=0))

    @triton.jit
    def _row_means_kernel(partial_ptr, first_chunk_ptr, chunk_count_ptr, inv_numel_ptr, out_ptr,
                          BLOCK: tl.constexpr):
        """Program r: the mean of row r's errors (its partials added in a fixed pattern) -> out[r]."""
        row = tl.program_id(0)
        first = tl.load(first_chunk_ptr + row)
        count = tl.load(chunk_count_ptr + row)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(0, count, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            total += tl.load(partial_ptr + first + index, mask=index < count, other=0.0)
        tl.store(out_ptr + row, tl.sum(total, axis=0) * tl.load(inv_numel_ptr + row))


    @triton.jit
    def _channel_grid_kernel(x_ptr, scale_ptr, zero_point_ptr, best_error_ptr, best_index_ptr,
                             channels, k, inv_k, zero_points, qmin, qmax, p_frac,
                             P_INT: tl.constexpr, HAS_FRAC: tl.constexpr, BLOCK: tl.constexpr):
        """Program (c, i): mean_K |Q(x[c]) - x[c]|^p under (scale, zero point)[i, j, c] for every
        zero-point index j; the smallest (the first on ties) -> best_error[i, c], best_index[i, c]."""
        channel = tl.program_id(0)
        width = tl.program_id(1)
        row_ptr = x_ptr + channel.to(tl.int64) * k
        best_error = float("inf")
        best_index = 0
        for j in range(0, zero_points):
            candidate = (width * zero_points + j).to(tl.int64) * channels + channel
            scale = tl.load(scale_ptr + candidate)
            zero_point = tl.load(zero_point_ptr + candidate)
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for offset in range(0, k, BLOCK):
                index = offset + tl.arange(0, BLOCK)
                inside = index < k
                x = tl.load(row_ptr + index, mask=inside, other=0.0)
                level = tl.minimum(tl.maximum(libdevice.rint(libdevice.div_rn(x, scale)) + zero_point, qmin), qmax)
                error = tl.abs((level - zero_point) * scale - x)
                total += tl.where(inside, _abs_power(error, p_frac, P_INT, HAS_FRAC), 0.0)
            mean = tl.sum(total, axis=0) * inv_k
            better = mean < best_error
            best_error = tl.where(better, mean, best_error)
            best_index = tl.where(better, j, best_index)
        out = width.to(tl.int64) * channels + channel
        tl.store(best_error_ptr + out, best_error)
        tl.store(best_index_ptr + out, best_index)


def channel_grid_minima(rows: Tensor, scale: Tensor, zero_point: Tensor, bits: int, p: float) -> tuple[Tensor, Tensor]:
    """For each channel and range, the zero point of the smallest mean(|Q(x) - x|^p) and that loss.

    rows: [C, K] float32 CUDA; scale, zero_point: [W, Z, C] float32, the grid of range w and
    zero-point index j for channel c -> (best_error [W, C] float32, best_index [W, C] int32: the
    first j reaching the minimum).
    """
    qmin, qmax = quant_range(bits)
    widths, zero_points, channels = scale.shape
    k = rows.shape[1]
    best_error = torch.empty(widths, channels, dtype=torch.float32, device=rows.device)
    best_index = torch.empty(widths, channels, dtype=torch.int32, device=rows.device)
    inv_k = float(np.float32(1.0) / np.float32(k))
    _channel_grid_kernel[(channels, widths)](
        rows.contiguous(), scale.contiguous(), zero_point.contiguous(), best_error, best_index,
        channels, k, inv_k, zero_points, float(qmin), float(qmax), **power_split(p),
        BLOCK=min(1024, triton.next_power_of_2(k)), enable_fp_fusion=False)
    return best_error, best_index


def can_fuse(tensors: Sequence[Tensor]) -> bool:
    """Whether `FusedLpError` applies: Triton is present and the tensors are float32 on one CUDA device."""
    return (HAS_TRITON and len(tensors) > 0 and all(t.is_cuda and t.dtype == torch.float32 for t in tensors)
            and len({t.device for t in tensors}) == 1)


class FusedLpError:
    """mean(|Q(x) - x|^p) of per-tensor grid candidates for a fixed list of CUDA tensors.

    tensors: float32, any shapes, one CUDA device (made contiguous and kept alive here);
    bits, p: the grid's bit width and the loss exponent.
    """

    def __init__(self, tensors: Sequence[Tensor], bits: int, p: float) -> None:
        self.tensors = [t.contiguous() for t in tensors]
        self.device = self.tensors[0].device
        self.qmin, self.qmax = (float(v) for v in quant_range(bits))
        self.p = float(p)
        self.addresses = np.array([t.data_ptr() for t in self.tensors], dtype=np.int64)
        self.numels = np.array([t.numel() for t in self.tensors], dtype=np.int64)
        self.chunks = np.maximum(-(-self.numels // CHUNK), 1)
        numel_f32 = self.numels.astype(np.float32)
        self.inv_numels = np.float32(1.0) / numel_f32

    def losses(self, rows: Sequence[int], qparams: Sequence[tuple[float, int]]) -> Tensor:
        """rows: tensor indices; qparams: one (scale, zero point) per row, as `lockstep.grid_qparams`
        gives them -> float32 losses [len(rows)] on the device (queued, nothing read back)."""
        rows = np.asarray(rows, dtype=np.int64)
        scales = np.array([s for s, _ in qparams], dtype=np.float32)
        table = np.stack([scales, np.float32(1.0) / scales, np.array([z for _, z in qparams], dtype=np.float32)], 1)
        counts = self.chunks[rows]
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        chunk_row = np.repeat(np.arange(len(rows), dtype=np.int32), counts)
        ints = self._to_device(np.concatenate([self.addresses[rows], self.numels[rows], first, counts]))
        address, numel, first_chunk, chunk_count = ints.view(4, len(rows))
        floats = self._to_device(np.concatenate([table.reshape(-1), self.inv_numels[rows]]))
        partials = torch.empty(int(chunk_row.size), dtype=torch.float32, device=self.device)
        out = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        _partial_sums_kernel[(int(chunk_row.size),)](
            address, numel, first_chunk, floats, self._to_device(chunk_row), partials,
            self.qmin, self.qmax, **power_split(self.p), BLOCK=BLOCK, CHUNK=CHUNK,
            enable_fp_fusion=False)
        _row_means_kernel[(len(rows),)](partials, first_chunk, chunk_count, floats[3 * len(rows):], out,
                                        BLOCK=BLOCK, enable_fp_fusion=False)
        return out

    def _to_device(self, array: np.ndarray) -> Tensor:
        """A host array on the device, through pinned memory without waiting."""
        return upload(torch.from_numpy(np.ascontiguousarray(array)), self.device)
