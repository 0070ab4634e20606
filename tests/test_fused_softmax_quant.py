"""The fused quantized softmax of training steps (`ptqbench.quant.fused_softmax_quant`) against the
eager chain: bias add, torch's softmax, the quantizer's own forward, QDrop's mix.

On a GPU the fused softmax may differ from torch's in the last bit of a probability, so a quantized
value can move by one grid step where a probability sits on a rounding boundary: the tests allow
that for a few elements in ten thousand and compare gradients by their relative error. On the CPU,
and without gradients, the eager chain is what runs.
"""

from __future__ import annotations

import pytest
import torch

from ptqbench.models.sam1.quantized import QuantEncoderAttention
from ptqbench.quant import fused_softmax_quant
from ptqbench.quant.quantizer import FakeQuantizer

needs_fused = pytest.mark.skipif(not (torch.cuda.is_available() and fused_softmax_quant.HAS_TRITON),
                                 reason="needs a CUDA GPU and Triton")


def quantizer(grid: str, bits: int, device: str, quantize_prob: float = 1.0) -> FakeQuantizer:
    """A softmax-site quantizer with a learnable scale, on the uniform or the log2 grid."""
    site = FakeQuantizer(bits, is_weight=False).to(device)
    if grid == "log2":
        site.set_log2(2, torch.tensor(0.9))
    else:
        site.set_range(torch.tensor(0.0), torch.tensor(0.6))
    site.make_scale_learnable()
    site.quantize_prob = quantize_prob
    return site


def eager(logits: torch.Tensor, site: FakeQuantizer, row_bias=None, col_bias=None) -> torch.Tensor:
    """The unfused chain: (logits + row_bias) + col_bias over an [h, w] key grid, softmax, the site."""
    if row_bias is not None:
        h, w = row_bias.shape[-1], col_bias.shape[-1]
        grid = logits.view(*logits.shape[:-1], h, w)
        logits = ((grid + row_bias[..., :, None]) + col_bias[..., None, :]).view(logits.shape)
    return site(logits.softmax(dim=-1))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_cpu_and_no_grad_keep_the_eager_chain() -> None:
    site = quantizer("uniform", 4, "cpu")
    logits = torch.randn(2, 5, 9, requires_grad=True)
    assert not fused_softmax_quant.can_fuse(logits, site)
    if torch.cuda.is_available():
        site = site.cuda()
        with torch.no_grad():
            assert not fused_softmax_quant.can_fuse(logits.detach().cuda(), site)
        assert not fused_softmax_quant.can_fuse(logits.detach().cuda().double().requires_grad_(True), site)


@needs_fused
@pytest.mark.parametrize("grid", ["uniform", "log2"])
@pytest.mark.parametrize("keys", [(1, 7), (1, 300), (14, 14), (16, 16)])
def test_fused_forward_and_gradients_match_the_eager_chain(grid: str, keys: tuple[int, int]) -> None:
    h, w = keys
    generator = torch.Generator().manual_seed(h * 100 + w)
    logits = (torch.randn(3, 40, h * w, generator=generator) * 4).cuda().requires_grad_(True)
    bias = [] if h == 1 else [torch.randn(3, 40, n, generator=generator).cuda().requires_grad_(True) for n in (h, w)]
    grad = torch.randn(logits.shape, generator=generator).cuda()
    site = quantizer(grid, 4, "cuda")
    leaves = [logits, *bias, site.scale]
    fused = fused_softmax_quant.quantized_softmax(logits, site, *bias)
    reference = eager(logits, site, *bias)
    moved = (fused - reference).abs() > 1e-6
    assert moved.float().mean() < 1e-3
    assert torch.allclose(fused[~moved], reference[~moved], rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad(fused, leaves, grad)
    want = torch.autograd.grad(reference, leaves, grad)
    assert all(relative_error(g, w) < 1e-3 for g, w in zip(got[:-1], want[:-1]))
    # the scale's gradient is a sum of nearly cancelling terms: compare it at their rounding scale
    tolerance = 1e-5 * float((grad * reference).abs().sum().detach())
    assert torch.allclose(got[-1], want[-1], rtol=1e-3, atol=tolerance)


@needs_fused
@pytest.mark.parametrize("grid", ["uniform", "log2"])
def test_qdrop_keeps_each_probability_quantized_with_its_probability(grid: str) -> None:
    site = quantizer(grid, 4, "cuda", quantize_prob=0.5)
    site.generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4, 64, 16 * 16) * 4).cuda().requires_grad_(True)
    grad = torch.randn(logits.shape).cuda()
    out = fused_softmax_quant.quantized_softmax(logits, site)
    probabilities = logits.softmax(dim=-1)
    quantized = site.quantize(probabilities)
    kept = (out - quantized).abs() < (out - probabilities).abs()
    distinct = (quantized - probabilities).abs() > 1e-6
    assert abs(float(kept[distinct].float().mean()) - 0.5) < 0.01
    # the backward draws the forward's mask again: its gradients are those of the mix the forward made
    reference = torch.where(kept, quantized, probabilities)
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad(out, (logits, site.scale), grad)
    want = torch.autograd.grad(reference, (logits, site.scale), grad)
    assert relative_error(got[0], want[0]) < 1e-3
    assert torch.allclose(got[1], want[1], rtol=1e-3, atol=1e-5 * float((grad * reference).abs().sum().detach()))
    again = fused_softmax_quant.quantized_softmax(logits, site)
    assert not torch.equal(again, out)  # a fresh draw every forward


@needs_fused
def test_encoder_attention_trains_through_the_fused_softmax(monkeypatch) -> None:
    """A quantized encoder attention with the relative-position terms: the fused training forward
    and its gradients (to the input, the qkv weight and every learnable scale) are the eager ones."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    twin = QuantEncoderAttention.from_float(Attention(64, num_heads=4, use_rel_pos=True, input_size=(7, 7)), 4, 4)
    twin = twin.cuda()
    for name in ("q", "k", "v", "softmax"):
        site = getattr(twin, f"{name}_quantizer")
        low, high = (0.0, 0.5) if name == "softmax" else (-3.0, 3.0)
        site.set_range(torch.tensor(low), torch.tensor(high))
        site.make_scale_learnable()
    x = torch.randn(2, 7, 7, 64, device="cuda", requires_grad=True)
    grad = torch.randn(2, 7, 7, 64, device="cuda")
    leaves = [x, twin.qkv.weight] + [getattr(twin, f"{n}_quantizer").scale for n in ("q", "k", "v", "softmax")]
    fused = twin(x)
    fused_grads = torch.autograd.grad(fused, leaves, grad)
    monkeypatch.setattr(fused_softmax_quant, "can_fuse", lambda *args: False)
    reference = twin(x)
    reference_grads = torch.autograd.grad(reference, leaves, grad)
    assert relative_error(fused, reference) < 1e-5
    assert all(relative_error(g, r) < 1e-3 for g, r in zip(fused_grads[:-1], reference_grads[:-1]))
    assert torch.allclose(fused_grads[-1], reference_grads[-1], rtol=1e-4)  # measured on an H200: 1e-7
