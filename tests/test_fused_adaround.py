"""AdaRound's fused soft weight and regulariser (`ptqbench.quant.fused_adaround`) against the eager
expressions of `AdaRoundQuantizer`, per channel and per tensor, before and after V moved; a beta
given as a device tensor (the in-graph update) against a Python number."""

from __future__ import annotations

import pytest
import torch

from ptqbench.quant import fused_adaround
from ptqbench.quant.adaround import AdaRoundQuantizer, rectified_sigmoid
from ptqbench.quant.quantizer import FakeQuantizer

needs_fused = pytest.mark.skipif(not (torch.cuda.is_available() and fused_adaround.HAS_TRITON),
                                 reason="needs a CUDA GPU and Triton")


def rounding(device: str, per_channel: bool, seed: int) -> AdaRoundQuantizer:
    """AdaRound on a random [16, 300] weight's 4-bit grid, V moved off its start by N(0, 2)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 300, generator=generator)
    base = FakeQuantizer(4, is_weight=True, channel_axis=0 if per_channel else None)
    if per_channel:
        base.set_range(weight.amin(1) * 0.8, weight.amax(1) * 0.8)
    else:
        base.set_range(weight.min() * 0.8, weight.max() * 0.8)
    quantizer = AdaRoundQuantizer(weight, base).to(device)
    with torch.no_grad():
        quantizer.v.add_(torch.randn(quantizer.v.shape, generator=generator).to(device) * 2)
    return quantizer


def eager_regularizer(quantizer: AdaRoundQuantizer, beta) -> torch.Tensor:
    return (1.0 - (2.0 * rectified_sigmoid(quantizer.v) - 1.0).abs().pow(beta)).sum()


def test_the_cpu_runs_the_eager_expressions_and_takes_a_tensor_beta() -> None:
    quantizer = rounding("cpu", True, 0)
    assert not fused_adaround.can_fuse(quantizer.v)
    as_number = torch.autograd.grad(quantizer.regularizer(7.5), quantizer.v)[0]
    as_tensor = torch.autograd.grad(quantizer.regularizer(torch.tensor(7.5)), quantizer.v)[0]
    torch.testing.assert_close(as_tensor, as_number, rtol=1e-5, atol=1e-9)


@needs_fused
@pytest.mark.parametrize("per_channel", [True, False])
def test_fused_soft_weight_matches_the_eager_one(per_channel: bool) -> None:
    quantizer = rounding("cuda", per_channel, 1)
    weight = torch.empty(quantizer.v.shape, device="cuda")
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)).cuda()
    fused = quantizer(weight)
    eager = quantizer._on_grid(rectified_sigmoid(quantizer.v))
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-7)
    fused_grad = torch.autograd.grad(fused, quantizer.v, grad)[0]
    eager_grad = torch.autograd.grad(eager, quantizer.v, grad)[0]
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-9)


@needs_fused
@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0])
def test_fused_regularizer_matches_the_eager_one(beta: float) -> None:
    quantizer = rounding("cuda", True, 3)
    beta_tensor = torch.tensor(beta, device="cuda")
    fused = quantizer.regularizer(beta_tensor)
    eager = eager_regularizer(quantizer, beta_tensor)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    fused_grad = torch.autograd.grad(fused * 0.01, quantizer.v)[0]
    eager_grad = torch.autograd.grad(eager * 0.01, quantizer.v)[0]
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-10)
