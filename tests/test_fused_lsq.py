"""The fused training forward of a per-tensor uniform quantizer (`ptqbench.quant.fused_lsq`) against
the eager chain: the same values bit for bit, the same input gradient, the scale gradient up to
summation order, and QDrop's keep drawn afresh with its probability. On the CPU, in evaluation and
on the per-channel or log2 grids, the eager chain is what runs."""

from __future__ import annotations

import pytest
import torch

from ptqbench.quant import fused_lsq
from ptqbench.quant.quantizer import FakeQuantizer

needs_fused = pytest.mark.skipif(not (torch.cuda.is_available() and fused_lsq.HAS_TRITON),
                                 reason="needs a CUDA GPU and Triton")


def site(device: str, learnable: bool, quantize_prob: float = 1.0) -> FakeQuantizer:
    quantizer = FakeQuantizer(4, is_weight=False).to(device)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    if learnable:
        quantizer.make_scale_learnable()
    quantizer.quantize_prob = quantize_prob
    return quantizer


def test_only_gpu_training_steps_on_the_per_tensor_uniform_grid_are_fused() -> None:
    x = torch.randn(10, requires_grad=True)
    assert not fused_lsq.can_fuse(x, site("cpu", True))
    if torch.cuda.is_available():
        gpu = site("cuda", True)
        assert fused_lsq.can_fuse(x.detach().cuda(), gpu)  # the learnable scale needs its gradient
        with torch.no_grad():
            assert not fused_lsq.can_fuse(x.detach().cuda(), gpu)
        assert not fused_lsq.can_fuse(x.detach().cuda(), site("cuda", False))  # nothing needs a gradient
        log2 = site("cuda", True)
        log2.set_log2(2, torch.tensor(0.5))
        assert not fused_lsq.can_fuse(x.detach().cuda(), log2)


@needs_fused
@pytest.mark.parametrize("learnable", [True, False])
def test_fused_values_and_gradients_are_the_eager_ones(learnable: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3001, generator=generator) * 1.5).cuda().requires_grad_(True)
    grad = torch.randn(x.shape, generator=generator).cuda()
    quantizer = site("cuda", learnable)
    leaves = (x, quantizer.scale) if learnable else (x,)
    fused = quantizer(x)
    eager = quantizer.quantize(x)
    assert torch.equal(fused, eager)
    got, want = torch.autograd.grad(fused, leaves, grad), torch.autograd.grad(eager, leaves, grad)
    assert torch.equal(got[0], want[0])
    if learnable:
        assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-6 * float((grad * eager).abs().sum()))


@needs_fused
def test_qdrop_keeps_each_element_quantized_with_its_probability() -> None:
    quantizer = site("cuda", True, quantize_prob=0.5)
    quantizer.generator = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(4, 50_000) * 1.5).cuda().requires_grad_(True)
    grad = torch.randn(x.shape).cuda()
    out = quantizer(x)
    quantized = quantizer.quantize(x)
    kept = out == quantized
    distinct = quantized != x
    assert torch.equal(out, torch.where(kept, quantized, x))
    assert abs(float(kept[distinct].float().mean()) - 0.5) < 0.01
    reference = torch.where(kept, quantized, x)
    got = torch.autograd.grad(out, (x, quantizer.scale), grad)
    want = torch.autograd.grad(reference, (x, quantizer.scale), grad)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-6 * float((grad * reference).abs().sum()))
    assert not torch.equal(quantizer(x), out)  # a fresh draw every forward
