"""Fake-quantization primitives against hand-computed values."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqbench.quant.functional import affine_qparams, fake_quant_affine, fake_quant_log2, quant_range
from ptqbench.quant.quantizer import FakeQuantizer


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_quant_range() -> None:
    assert quant_range(2) == (0, 3)
    assert quant_range(4) == (0, 15)
    assert quant_range(8) == (0, 255)


def test_affine_qparams_per_tensor() -> None:
    # s = (1.0 - (-0.5)) / 3 = 0.5; z = 0 - round(-0.5 / 0.5) = 1
    scale, zero_point = affine_qparams(torch.tensor(-0.5), torch.tensor(1.0), 2)
    assert scale.shape == () and zero_point.shape == ()
    assert scale.item() == pytest.approx(0.5)
    assert zero_point.item() == 1.0


def test_affine_qparams_widens_to_include_zero() -> None:
    # all positive [0.2, 1.0] -> [0, 1.0]: s = 1/15, z = 0
    scale, zero_point = affine_qparams(torch.tensor(0.2), torch.tensor(1.0), 4)
    assert scale.item() == pytest.approx(1.0 / 15)
    assert zero_point.item() == 0.0
    # all negative [-2, -1] -> [-2, 0]: s = 2/3, z = -round(-3) = 3 = qmax, the upper clamp bound
    scale, zero_point = affine_qparams(torch.tensor(-2.0), torch.tensor(-1.0), 2)
    assert scale.item() == pytest.approx(2.0 / 3)
    assert zero_point.item() == 3.0


def test_affine_qparams_scale_floor() -> None:
    # an all-zero tensor: width max(0, 1e-8) -> s = 1e-8 / 15, z = 0
    scale, zero_point = affine_qparams(torch.tensor(0.0), torch.tensor(0.0), 4)
    assert scale.item() == pytest.approx(1e-8 / 15)
    assert zero_point.item() == 0.0
    # a width below the floor: [-1e-9, 0] at 2 bits: s = 1e-8 / 3, z = -round(-0.3) = 0
    scale, zero_point = affine_qparams(torch.tensor(-1e-9), torch.tensor(0.0), 2)
    assert scale.item() == pytest.approx(1e-8 / 3)
    assert zero_point.item() == 0.0


def test_affine_qparams_zero_point_stays_in_grid() -> None:
    generator = torch.Generator().manual_seed(0)
    x_min = -torch.rand(1000, generator=generator) * 10 ** torch.randint(-9, 4, (1000,), generator=generator)
    x_max = torch.rand(1000, generator=generator) * 10 ** torch.randint(-9, 4, (1000,), generator=generator)
    for bits in (2, 4, 8):
        qmin, qmax = quant_range(bits)
        for lo, hi in ((x_min, x_max), (x_min, x_min / 2), (x_max / 2, x_max)):
            _, zero_point = affine_qparams(lo, hi, bits)
            assert bool(((zero_point >= qmin) & (zero_point <= qmax)).all())
            assert torch.equal(zero_point, torch.round(zero_point))


def test_affine_qparams_per_channel() -> None:
    # 3 bits (qmax 7): ch0 [-1, 2]: s = 3/7, z = -round(-7/3) = 2; ch1 [0.5, 1.5] -> [0, 1.5]:
    # s = 1.5/7, z = 0; ch2 [-0.2, -0.1] -> [-0.2, 0]: s = 0.2/7, z = 7
    scale, zero_point = affine_qparams(t(-1.0, 0.5, -0.2), t(2.0, 1.5, -0.1), 3)
    assert torch.allclose(scale, t(3 / 7, 1.5 / 7, 0.2 / 7))
    assert torch.equal(zero_point, t(2, 0, 7))


def test_fake_quant_affine_per_tensor() -> None:
    # s = 0.5, z = 1, 2 bits: x/s = -1.8 -0.4 0.2 0.6 1.48 3.2 0.5 1.5
    # round + z = -1 1 1 2 2 4 1 3 (0.5 -> 0 and 1.5 -> 2: half to even)
    # clamp [0, 3] - z = -1 0 0 1 1 2 0 2; times s:
    x = t(-0.9, -0.2, 0.1, 0.3, 0.74, 1.6, 0.25, 0.75)
    x_hat = fake_quant_affine(x, torch.tensor(0.5), torch.tensor(1.0), 2)
    assert torch.allclose(x_hat, t(-0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0))


def test_fake_quant_affine_per_channel_clamps_outside_values() -> None:
    scale, zero_point = affine_qparams(t(-1.0, 0.5, -0.2), t(2.0, 1.5, -0.1), 3)
    x = torch.tensor(
        [
            [-1.2, 0.2, 0.5, 2.5],  # s = 3/7, z = 2: levels -3+2 -> 0, 0, 1, 6+2 -> 7
            [0.1, 0.7, 1.0, 3.0],  # s = 1.5/7, z = 0: levels 0, 3, 5, 14 -> 7
            [-0.35, -0.05, 0.0, 0.02],  # s = 0.2/7, z = 7: -12+7 -> 0, -2+7, 7, 1+7 -> 7
        ]
    )
    x_hat = fake_quant_affine(x, scale[:, None], zero_point[:, None], 3)
    expected = torch.tensor(
        [
            [-2 * 3 / 7, 0.0, 3 / 7, 5 * 3 / 7],
            [0.0, 3 * 1.5 / 7, 5 * 1.5 / 7, 1.5],
            [-0.2, -2 * 0.2 / 7, 0.0, 0.0],
        ]
    )
    assert torch.allclose(x_hat, expected, atol=1e-6)


def test_fake_quant_affine_gradients() -> None:
    # s = 0.5, z = 1, 2 bits; x/s = -1.8 0.6 3.2 1.2 -> round + z = -1 2 4 2: the first and third
    # are clamped (outside), the others inside.
    x = t(-0.9, 0.3, 1.6, 0.6).requires_grad_()
    scale = torch.full((4,), 0.5, requires_grad=True)
    fake_quant_affine(x, scale, torch.tensor(1.0), 2).sum().backward()
    assert torch.equal(x.grad, t(0.0, 1.0, 0.0, 1.0))
    # LSQ: inside d/ds = round(x/s) - x/s (1 - 0.6, 1 - 1.2); clamped: qmin - z = -1, qmax - z = 2
    assert torch.allclose(scale.grad, t(-1.0, 0.4, 2.0, -0.2))


@pytest.mark.parametrize(
    ("tau", "a", "expected"),
    [
        # 3 bits (levels 0..7), s = 1. tau 1: levels 2^-k
        (1, [1.0, 2.0, 0.5, 0.3, 2**-7, 2**-7.4, 2**-7.6, 2**-8, 0.0], [1.0, 1.0, 0.5, 0.25, 2**-7, 2**-7, 0, 0, 0]),
        # tau 2: levels 2^(-k/2); -2 log2(0.6) = 1.47 -> 1; smallest level 2^-3.5; 2^-3.6 -> 7.2 -> 7
        (2, [1.0, 0.5, 2**-0.5, 0.6, 2**-3.6, 2**-4, 0.0], [1.0, 0.5, 2**-0.5, 2**-0.5, 2**-3.5, 0, 0]),
        # tau 4: levels 2^(-k/4); -4 log2(0.3) = 6.95 -> 7; smallest level 2^-1.75 = 0.2973
        (4, [1.0, 0.5, 0.3, 0.25, 0.0], [1.0, 0.5, 2**-1.75, 0, 0]),
    ],
)
def test_fake_quant_log2_hand_values(tau: int, a: list[float], expected: list[float]) -> None:
    out = fake_quant_log2(torch.tensor(a), torch.tensor(1.0), tau, 3)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    below_grid = torch.tensor(expected) == 0
    assert torch.equal(out[below_grid], torch.zeros(int(below_grid.sum())))


@pytest.mark.parametrize("tau", [1, 2, 4])
def test_fake_quant_log2_scale_and_zero(tau: int) -> None:
    scale = torch.tensor(0.37)
    out = fake_quant_log2(torch.tensor([0.37, 0.0, 1.5]), scale, tau, 8)
    assert out[0].item() == pytest.approx(0.37)  # a = s maps to s
    assert out[1].item() == 0.0  # exactly 0, even at 8 bits where -log2(1e-30) < 2^8 levels
    assert out[2].item() == pytest.approx(0.37)  # above s: clamped to the top level s
    # a value between two levels rounds in the log domain: s * 2^(-2.4 / tau) -> s * 2^(-2 / tau)
    mid = fake_quant_log2(scale * 2 ** (-2.4 / tau), scale, tau, 8)
    assert mid.item() == pytest.approx(0.37 * 2 ** (-2 / tau), rel=1e-6)


def test_quantizer_refuses_float64_qparams_on_the_cpu_too() -> None:
    """torch's CPU fake quantization computes with a float64 scale where its CUDA kernel raises, so
    the quantizer refuses float64 qparams itself; a float64 range is converted first."""
    quantizer = FakeQuantizer(4, is_weight=False)
    scale, zero_point = affine_qparams(torch.tensor(-1.0), torch.tensor(2.0), 4)
    with pytest.raises(TypeError, match="float32"):
        quantizer.set_qparams(scale.double(), zero_point)
    with pytest.raises(TypeError, match="float32"):
        quantizer.set_qparams(scale, zero_point.double())
    quantizer.set_range(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert quantizer.scale.dtype == quantizer.zero_point.dtype == torch.float32
    assert float(quantizer.scale) == float(scale) and float(quantizer.zero_point) == float(zero_point)


def test_quantizer_int_zero_point_follows_every_change_of_the_buffer() -> None:
    """The int32 zero point the fused kernel takes is kept between calls, and remade when the
    buffer gets a new range, is written in place, is loaded, or the module is copied."""
    quantizer = FakeQuantizer(4, is_weight=False)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(2.0))  # s = 0.2, z = 5
    kept = quantizer.int_zero_point()
    assert kept.dtype == torch.int32 and int(kept) == 5 and quantizer.int_zero_point() is kept
    quantizer.set_range(torch.tensor(-2.0), torch.tensor(1.0))
    assert int(quantizer.int_zero_point()) == 10
    quantizer.zero_point.fill_(3.0)
    assert int(quantizer.int_zero_point()) == 3
    quantizer.load_state_dict({"zero_point": torch.tensor(7.0), "scale": torch.tensor(0.5)})
    assert int(quantizer.int_zero_point()) == 7
    x = torch.linspace(-6.0, 6.0, 101)
    expected = fake_quant_affine(x, torch.tensor(0.5), torch.tensor(7.0), 4)
    twin = copy.deepcopy(quantizer)
    twin.zero_point.fill_(0.0)
    assert torch.equal(quantizer(x), expected)
    assert torch.equal(twin(x), fake_quant_affine(x, torch.tensor(0.5), torch.tensor(0.0), 4))
