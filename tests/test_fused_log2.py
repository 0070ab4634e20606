"""The fused AGQ log2 fake quantization (`ptqbench.quant.fused_log2`) against the eager expression.

On a GPU the fused forward and input gradient must equal the eager ones bit for bit (the AGQ
search and every evaluation see the same numbers either way), and the scale gradient must agree
up to summation order. On the CPU the eager expression is what runs.
"""

from __future__ import annotations

import pytest
import torch

from ptqbench.quant import functional as qf
from ptqbench.quant import fused_log2
from ptqbench.quant.quantizer import FakeQuantizer

needs_fused = pytest.mark.skipif(not (torch.cuda.is_available() and fused_log2.HAS_TRITON),
                                 reason="needs a CUDA GPU and Triton")


def softmax_maps(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    """Attention probabilities with exact zeros, denormal-small and near-one values: [*shape]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * 6.0
    logits.view(-1)[:: 97] = -200.0
    maps = torch.softmax(logits, dim=-1)
    maps.view(-1)[:: 89] = 0.0
    return maps.to(device)


def summation_tolerance(grad: torch.Tensor, out: torch.Tensor) -> float:
    """The float32 rounding scale of the scale gradient's sums: 1e-6 x sum |grad * a_hat| (the
    gradient is a sum of such terms, nearly cancelling inside the grid, added in another order)."""
    return 1e-6 * float((grad * out).abs().sum())


def test_cpu_runs_the_eager_expression() -> None:
    a = softmax_maps((3, 16, 16), 0, "cpu")
    scale = torch.tensor(0.8)
    assert not fused_log2.can_fuse(a, scale)
    assert torch.equal(qf.fake_quant_log2(a, scale, 2, 4), qf.fake_quant_log2_eager(a, scale, 2, 4))


def test_float64_or_mixed_device_inputs_are_not_fused() -> None:
    a = softmax_maps((2, 8, 8), 1, "cpu")
    assert not fused_log2.can_fuse(a.double(), torch.tensor(0.5, dtype=torch.float64))
    if torch.cuda.is_available():
        assert not fused_log2.can_fuse(a.cuda(), torch.tensor(0.5))


@needs_fused
@pytest.mark.parametrize("tau", [1, 2, 3, 4])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_fused_forward_and_gradients_match_eager(tau: int, bits: int) -> None:
    a = softmax_maps((4, 64, 300), tau * 10 + bits, "cuda")
    grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(bits)).cuda()
    results = []
    for function in (fused_log2.fused_fake_quant_log2, qf.fake_quant_log2_eager):
        leaf = a.clone().requires_grad_(True)
        raw_scale = torch.tensor(0.6, device="cuda", requires_grad=True)
        out = function(leaf, raw_scale.abs().clamp(min=1e-8), tau, bits)
        grad_a, grad_scale = torch.autograd.grad(out, (leaf, raw_scale), grad)
        results.append((out, grad_a, grad_scale))
    (fused_out, fused_grad_a, fused_grad_scale), (eager_out, eager_grad_a, eager_grad_scale) = results
    assert torch.equal(fused_out, eager_out)
    assert torch.equal(fused_grad_a, eager_grad_a)
    assert torch.allclose(fused_grad_scale, eager_grad_scale, rtol=1e-4, atol=summation_tolerance(grad, eager_out))


@needs_fused
def test_quantizer_with_learnable_log2_scale_trains_the_same_on_the_gpu() -> None:
    """A FakeQuantizer on the log2 grid with a learnable scale (ptq4sam's reconstruction): the
    fused path gives the eager path's output and input gradient."""
    quantizer = FakeQuantizer(4, is_weight=False).cuda()
    quantizer.set_log2(2, torch.tensor(0.9))
    quantizer.make_scale_learnable()
    a = softmax_maps((2, 32, 128), 7, "cuda").requires_grad_(True)
    grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(3)).cuda()
    out = quantizer(a)
    grad_a, grad_scale = torch.autograd.grad(out, (a, quantizer.scale), grad)
    eager = qf.fake_quant_log2_eager(a, quantizer.scale.abs().clamp(min=1e-8), 2, 4)
    eager_grad_a, eager_grad_scale = torch.autograd.grad(eager, (a, quantizer.scale), grad)
    assert torch.equal(out, eager) and torch.equal(grad_a, eager_grad_a)
    assert torch.allclose(grad_scale, eager_grad_scale, rtol=1e-4, atol=summation_tolerance(grad, eager))


@needs_fused
def test_tables_made_inside_a_graph_capture_are_not_kept() -> None:
    """The level table and the int32 zero point are kept between calls, but not when the first
    call is inside a CUDA-graph capture (their values would exist only after a replay)."""
    quantizer = FakeQuantizer(4, is_weight=False).cuda()
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin()
        fused_log2.level_powers(3, 5, torch.device("cuda", torch.cuda.current_device()))
        quantizer.int_zero_point()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    powers = fused_log2.level_powers(3, 5, torch.device("cuda", torch.cuda.current_device()))
    eager = torch.pow(2.0, -torch.arange(32, dtype=torch.float32, device="cuda") / 3)
    assert torch.equal(powers, eager)
    assert int(quantizer.int_zero_point()) == 5
