"""AGQ (Adaptive Granularity Quantization): the log2 grid, its error, and the tau / scale search."""

from __future__ import annotations

import math

import pytest
import torch
from segment_anything.modeling.transformer import Attention as DecoderAttention

from ptqbench.methods.ptq4sam.agq import AgqCapture, AgqSearch, agq_error, agq_scale_bounds, split_heads
from ptqbench.models.sam1.quantized import QuantDecoderAttention
from ptqbench.quant.functional import fake_quant_log2
from ptqbench.quant.quantizer import FakeQuantizer


def test_log2_grid_matches_the_formula_by_hand():
    # tau = 2, 2 bits, s = 1: levels 1, 2^-0.5, 2^-1, 2^-1.5; a_int = round(-2 log2 a)
    a = torch.tensor([2.0, 1.0, 0.7, 0.5, 0.3, 0.29, 0.2, 0.001, 0.0])
    # a_int:         -2 -> 0, 0, 1.03 -> 1, 2, 3.47 -> 3, 3.57 -> 4 (zero), 4.64 -> 5 (zero), 19.9, inf
    expected = torch.tensor([1.0, 1.0, 2**-0.5, 0.5, 2**-1.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(fake_quant_log2(a, torch.tensor(1.0), 2, 2), expected, rtol=0, atol=1e-7)
    # tau = 1, 3 bits, s = 0.5: levels 0.5 * 2^-k, k = 0..7 (smallest 0.5 / 128)
    a = torch.tensor([0.6, 0.1, 0.003, 0.0025])
    # a_int: -0.26 -> 0, 2.32 -> 2, 7.38 -> 7, 7.64 -> 8 (zero)
    expected = torch.tensor([0.5, 0.125, 0.5 / 128, 0.0])
    torch.testing.assert_close(fake_quant_log2(a, torch.tensor(0.5), 1, 3), expected, rtol=0, atol=1e-9)


def test_values_below_the_smallest_level_become_exactly_zero():
    scale, tau, bits = 0.25, 4, 4
    # a_int >= 16 <=> -4 log2(a / s) >= 15.5 <=> a <= s * 2^(-15.5 / 4)
    threshold = scale * 2 ** (-15.5 / 4)
    small = torch.linspace(0.0, threshold * 0.999, 200)
    quantizer = FakeQuantizer(bits, is_weight=False)
    quantizer.set_log2(tau, torch.tensor(scale))
    assert torch.equal(quantizer(small), torch.zeros_like(small))
    smallest_level = scale * 2 ** (-15 / 4)
    just_above = torch.tensor([threshold * 1.001])
    torch.testing.assert_close(quantizer(just_above), torch.tensor([smallest_level]))


def test_error_is_the_lp_mean_of_the_attention_output_error():
    attn = torch.tensor([[[0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]])  # [1, Nq=2, Nk=3]
    value = torch.tensor([[[1.0, -2.0], [0.5, 1.0], [3.0, 0.0]]])  # [1, Nk=3, D=2]
    a_hat = fake_quant_log2(attn, torch.tensor(0.9), 2, 2)
    expected = ((a_hat - attn) @ value).abs().pow(2.4).mean().item()
    assert agq_error(attn, value, 0.9, 2, 2) == pytest.approx(expected, rel=1e-6)
    assert agq_error(attn, value, 0.9, 2, 2, p=2.0) == pytest.approx(
        ((a_hat - attn) @ value).pow(2).mean().item(), rel=1e-6)
    assert agq_scale_bounds(0.9) == (pytest.approx(0.009), 0.9)
    assert agq_scale_bounds(20.0) == (0.1, 20.0)


def test_error_reuses_a_precomputed_target():
    generator = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(6, 16, 16, generator=generator) * 3, dim=-1)
    value = torch.randn(6, 16, 8, generator=generator)
    assert agq_error(attn, value, 0.5, 2, 4, target=attn @ value) == agq_error(attn, value, 0.5, 2, 4)
    assert agq_error(attn, value, 0.5, 2, 4, target=torch.zeros(6, 16, 8)) != agq_error(attn, value, 0.5, 2, 4)


def _map_on_levels(levels: list[float]) -> torch.Tensor:
    """A [1, 8, 16] map whose entries are the given levels, shuffled."""
    generator = torch.Generator().manual_seed(1)
    values = torch.tensor(levels * (128 // len(levels)))
    return values[torch.randperm(128, generator=generator)].reshape(1, 8, 16)


def test_tau_search_finds_the_grid_the_values_lie_on():
    bits, scale = 4, 0.8
    attn = _map_on_levels([scale * 2.0**-k for k in range(2**bits)])  # 16 octaves: only tau = 1 spans them
    value = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(2))
    search = AgqSearch(bits)
    search.update(attn, value)
    result = search.result()
    assert result.tau == 1
    assert result.scale == pytest.approx(scale, rel=1e-3)
    assert result.errors[1] < 1e-3 * min(result.errors[2], result.errors[4])
    for tau in (1, 2, 4):  # every scale lies in the search interval and scores its error
        low, high = agq_scale_bounds(scale)
        assert low <= result.scales[tau] <= high
        assert agq_error(attn, value, result.scales[tau], tau, bits) == pytest.approx(result.errors[tau], rel=1e-6)


def test_tau_search_prefers_fine_steps_for_values_within_one_octave():
    generator = torch.Generator().manual_seed(4)
    attn = 0.4 + 0.4 * torch.rand(2, 8, 16, generator=generator)  # all in [0.4, 0.8]
    value = torch.randn(2, 16, 4, generator=generator)
    search = AgqSearch(4)
    search.update(attn, value)
    result = search.result()
    assert result.tau == 4
    assert result.errors[4] < result.errors[2] < result.errors[1]


def test_scales_are_averaged_and_errors_summed_over_images():
    generator = torch.Generator().manual_seed(3)
    images = [(torch.softmax(torch.randn(2, 8, 12, generator=generator) * t, dim=-1),
               torch.randn(2, 12, 4, generator=generator)) for t in (2.0, 5.0)]
    singles = []
    for attn, value in images:
        search = AgqSearch(3)
        search.update(attn, value)
        singles.append(search.result())
    both = AgqSearch(3)
    for attn, value in images:
        both.update(attn, value)
    result = both.result()
    for tau in (1, 2, 4):
        assert result.errors[tau] == pytest.approx(singles[0].errors[tau] + singles[1].errors[tau], rel=1e-12)
        assert result.scales[tau] == pytest.approx((singles[0].scales[tau] + singles[1].scales[tau]) / 2, rel=1e-12)
    assert result.tau == min((1, 2, 4), key=lambda t: result.errors[t])
    assert result.scale == result.scales[result.tau]
    with pytest.raises(RuntimeError, match="without seeing"):
        AgqSearch(3).result()


def test_capture_on_the_decoder_twin_sees_the_attention_map_and_values():
    torch.manual_seed(0)
    fp = DecoderAttention(embedding_dim=256, num_heads=8, downsample_rate=2)
    twin = QuantDecoderAttention.from_float(fp, 4, 4)
    q, k, v = torch.randn(2, 7, 256), torch.randn(2, 40, 256), torch.randn(2, 40, 256)
    with torch.no_grad():
        qh, kh = fp._separate_heads(fp.q_proj(q), 8), fp._separate_heads(fp.k_proj(k), 8)
        attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(16), dim=-1)  # [2, 8, 7, 40]
        value = fp.v_proj(v)  # [2, 40, 128], before the head split
        assert torch.equal(split_heads(attn, value), fp._separate_heads(value, 8))
        expected = AgqSearch(4)
        expected.update(attn, value)
        with AgqCapture({"attn": twin}) as capture:
            twin(q=q, k=k, v=v)
    result, reference = capture.results()["attn"], expected.result()
    assert result.tau == reference.tau
    for tau in (1, 2, 4):
        assert result.scales[tau] == pytest.approx(reference.scales[tau], rel=1e-5)
        assert result.errors[tau] == pytest.approx(reference.errors[tau], rel=1e-4)
    assert not twin.softmax_quantizer._forward_pre_hooks and not twin.v_quantizer._forward_hooks
