"""Range observers against hand-computed values and brute-force searches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqbench.errors import ConfigError, PtqbenchError, UnknownNameError
from ptqbench.quant import mse_search
from ptqbench.quant.functional import affine_qparams, fake_quant_affine
from ptqbench.quant.mse_search import bounded_search_per_tensor, grid_search_per_channel
from ptqbench.quant.observers import (
    OBSERVERS,
    AvgMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    OMSEObserver,
    PercentileObserver,
    make_observer,
    row_quantile,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def lp(x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int, p: float) -> torch.Tensor:
    """mean |Q(x) - x|^p over the last dim, Q from affine_qparams(x_min, x_max) (per row when [C])."""
    scale, zero_point = affine_qparams(x_min, x_max, bits)
    if scale.dim() == 1:
        scale, zero_point = scale[:, None], zero_point[:, None]
    return (fake_quant_affine(x, scale, zero_point, bits) - x).abs().pow(p).mean(dim=-1)


def test_minmax_two_updates() -> None:
    observer = MinMaxObserver()
    observer.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    observer.update(t(-1.0, 4.0, 2.0))
    x_min, x_max = observer.compute_range(8)
    assert x_min.shape == () and x_max.shape == ()
    assert (x_min.item(), x_max.item()) == (-2.0, 4.0)


def test_minmax_per_channel() -> None:
    observer = MinMaxObserver(channel_axis=0)
    observer.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 1.0]]))
    observer.update(torch.tensor([[-3.0, 0.0, 0.0], [2.0, 2.0, 5.0]]))
    x_min, x_max = observer.compute_range(4)
    assert torch.equal(x_min, t(-3.0, 0.5)) and torch.equal(x_max, t(1.0, 5.0))
    columns = MinMaxObserver(channel_axis=1)
    columns.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 1.0]]))
    x_min, x_max = columns.compute_range(4)
    assert torch.equal(x_min, t(1.0, -2.0, 0.0)) and torch.equal(x_max, t(3.0, 0.5, 1.0))


def test_avgminmax_two_updates() -> None:
    observer = AvgMinMaxObserver()
    observer.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))  # min -2, max 3
    observer.update(t(-1.0, 4.0, 2.0))  # min -1, max 4
    x_min, x_max = observer.compute_range(8)
    assert (x_min.item(), x_max.item()) == (-1.5, 3.5)
    per_channel = AvgMinMaxObserver(channel_axis=0)
    per_channel.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    per_channel.update(torch.tensor([[0.0, 4.0], [-1.0, 1.0]]))
    x_min, x_max = per_channel.compute_range(8)
    assert torch.equal(x_min, t(-1.0, -0.25)) and torch.equal(x_max, t(2.5, 2.0))


def test_reset_and_no_update() -> None:
    observer = MinMaxObserver()
    with pytest.raises(PtqbenchError, match="before any update"):
        observer.compute_range(8)
    observer.update(t(1.0, 2.0))
    observer.reset()
    observer.update(t(-1.0, 0.5))
    assert tuple(v.item() for v in observer.compute_range(8)) == (-1.0, 0.5)
    observer.reset()
    with pytest.raises(PtqbenchError):
        observer.compute_range(8)


def test_update_is_detached() -> None:
    x = t(-1.0, 3.0).requires_grad_()
    observer = MinMaxObserver()
    observer.update(x * 2)
    x_min, x_max = observer.compute_range(8)
    assert not x_min.requires_grad and not x_max.requires_grad
    assert (x_min.item(), x_max.item()) == (-2.0, 6.0)


def test_percentile_ema_two_updates() -> None:
    observer = PercentileObserver(percentile=90.0, momentum=0.5)
    observer.update(torch.arange(11.0))  # 10th / 90th percentiles of 0..10: 1, 9
    assert tuple(v.item() for v in observer.compute_range(8)) == (1.0, 9.0)
    observer.update(torch.arange(21.0))  # 2, 18; EMA: 1 + 0.5 (2 - 1), 9 + 0.5 (18 - 9)
    assert tuple(v.item() for v in observer.compute_range(8)) == (1.5, 13.5)


def test_percentile_interpolates_and_default_momentum() -> None:
    observer = PercentileObserver(percentile=90.0)
    observer.update(t(10.0, 0.0))  # positions 0.1 and 0.9 between 0 and 10
    assert observer.compute_range(8)[1].item() == pytest.approx(9.0)
    observer.update(t(0.0, 110.0))  # default momentum 0.01: 9 + 0.01 (99 - 9)
    x_min, x_max = observer.compute_range(8)
    assert x_max.item() == pytest.approx(9.9)
    assert x_min.item() == pytest.approx(1.0 + 0.01 * (11.0 - 1.0))


def test_percentile_default_matches_numpy() -> None:
    x = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(1))
    x64 = x.double().numpy()
    observer = PercentileObserver()
    observer.update(x)
    x_min, x_max = observer.compute_range(8)
    assert x_max.item() == pytest.approx(np.quantile(x64, 0.99999), rel=1e-6)
    assert x_min.item() == pytest.approx(np.quantile(x64, 1e-5), rel=1e-6)
    per_channel = PercentileObserver(channel_axis=0)
    per_channel.update(x)
    x_min, x_max = per_channel.compute_range(8)
    assert np.allclose(x_max.numpy(), np.quantile(x64, 0.99999, axis=1), rtol=1e-6)
    assert np.allclose(x_min.numpy(), np.quantile(x64, 1e-5, axis=1), rtol=1e-6)


def test_percentile_beyond_torch_quantile_size_limit() -> None:
    n = 2**24 + 2  # torch.quantile refuses more than 2^24 elements
    x = (torch.arange(n) * 7919 % n).float()  # a permutation of 0..n-1 (7919 is prime, n % 7919 != 0)
    # position q (n - 1) in 0..n-1, linear interpolation between neighbours
    assert row_quantile(x[None], 0.99999).item() == pytest.approx(0.99999 * (n - 1), rel=1e-7)
    assert row_quantile(x[None], 1e-5).item() == pytest.approx(1e-5 * (n - 1), rel=1e-6)


def test_mse_per_tensor_clips_a_huge_outlier() -> None:
    x = torch.randn(16_384, generator=torch.Generator().manual_seed(0))
    x[123] = 40.0  # 40 sigma
    observer = MSEObserver(bits=3)
    observer.update(x)
    x_min, x_max = observer.compute_range(3)
    assert x_min.shape == ()
    assert x_max.item() < 0.2 * 40.0  # far inside [min, max]
    assert x.min().item() <= x_min.item() <= 0.0 <= x_max.item()
    assert lp(x, x_min, x_max, 3, 2.4) < 0.5 * lp(x, x.min(), x.max(), 3, 2.4)


def test_mse_per_tensor_averages_updates_and_lazy_matches_eager() -> None:
    generator = torch.Generator().manual_seed(3)
    updates = [torch.randn(2, 500, generator=generator) * scale + shift for scale, shift in ((1.0, 0.5), (3.0, -1.0))]
    per_update = [bounded_search_per_tensor(x, 3, 2.4) for x in updates]
    eager, lazy = MSEObserver(bits=3), MSEObserver()
    for x in updates:
        eager.update(x)
        lazy.update(x)
    updates[0].zero_()  # the lazy observer keeps its own copy
    x_min, x_max = eager.compute_range(3)
    assert x_min.item() == pytest.approx((per_update[0][0] + per_update[1][0]) / 2, rel=1e-6)
    assert x_max.item() == pytest.approx((per_update[0][1] + per_update[1][1]) / 2, rel=1e-6)
    lazy_min, lazy_max = lazy.compute_range(3)
    assert torch.equal(x_min, lazy_min) and torch.equal(x_max, lazy_max)
    with pytest.raises(ConfigError):
        eager.compute_range(4)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force_grid(rows: torch.Tensor, bits: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's exhaustive loop (PTQ4SAM `MSEObserver.perform_2D_search` / `perform_1D_search`),
    one channel and candidate at a time: width w = span / 100 * i, range (-z d, w - z d) with
    d = w / qmax ((0, w) / (-w, 0) for one-sided data), qparams recomputed from the range, strict <."""
    qmax = 2**bits - 1
    one_sided = "pos" if bool(rows.min() >= 0) else "neg" if bool(rows.max() <= 0) else None
    zero_points = [0] if one_sided else list(range(qmax + 1))
    x_min, x_max = torch.zeros(rows.shape[0], device=rows.device), torch.zeros(rows.shape[0], device=rows.device)
    for c, x in enumerate(rows):
        span = x.max().clamp(min=0) - x.min().clamp(max=0)
        best = float("inf")
        for i in range(1, 101):
            width = span / 100 * i
            for z in zero_points:
                if one_sided == "neg":
                    lo, hi = -width, torch.zeros((), device=rows.device)
                else:
                    lo, hi = 0.0 - z * (width / qmax), width - z * (width / qmax)
                scale, zero_point = affine_qparams(lo, hi, bits)
                x_hat = (torch.clamp(torch.round(x / scale) + zero_point, 0, qmax) - zero_point) * scale
                loss = (x_hat - x).abs().pow(p).mean().item()
                if loss < best:
                    best, x_min[c], x_max[c] = loss, lo, hi
    return x_min, x_max


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [0, 1, -1])
def test_mse_grid_equals_brute_force(sign: int, device: str) -> None:
    """The grid search (a zero-point walk on the CPU, every candidate scored on a GPU) finds the
    reference's exhaustive minimiser, computed by the brute-force loop on the same device."""
    generator = torch.Generator().manual_seed(7 + sign)
    rows = torch.randn(3, 9, generator=generator) * t(0.5, 2.0, 1.0)[:, None] + t(0.3, -0.5, 0.0)[:, None]
    if sign != 0:  # one-sided data: the 1-D search (z = 0 for >= 0 data, z = qmax for <= 0 data)
        rows = sign * rows.abs()
    rows = rows.to(device)
    x_min, x_max = grid_search_per_channel(rows, 3, 2.4)
    expected_min, expected_max = brute_force_grid(rows, 3, 2.4)
    assert torch.equal(x_min, expected_min) and torch.equal(x_max, expected_max)
    if sign > 0:
        assert bool((x_min == 0).all())
    if sign < 0:
        assert bool((x_max == 0).all())


def test_mse_per_channel_beats_minmax() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 256, generator=generator) * 0.05
    weight[::3, 7] = 0.6  # outliers in some channels
    observer = make_observer("mse", channel_axis=0, bits=4)
    observer.update(weight)
    x_min, x_max = observer.compute_range(4)
    assert x_min.shape == (16,)
    mse_loss = lp(weight, x_min, x_max, 4, 2.4)
    minmax_loss = lp(weight, weight.amin(dim=1), weight.amax(dim=1), 4, 2.4)
    assert bool((mse_loss <= minmax_loss * (1 + 1e-5)).all())  # minmax is one of the grid's candidates
    assert bool((mse_loss[::3] < 0.95 * minmax_loss[::3]).all())  # outlier channels clip
    # the proposed range maps back to a grid point: scale (x_max - x_min) / 15, integer zero point
    scale, zero_point = affine_qparams(x_min, x_max, 4)
    assert torch.allclose(zero_point * scale, -x_min, atol=1e-7)


def test_omse_picks_the_hand_computed_grid_point() -> None:
    # 1 bit, data [0, 6, 10]: candidates [0, h], h = 10 (1 - 0.01 i); levels {0, h}; 6 and 10 both
    # map to h (6/h > 0.5 for every h <= 10), so the loss is (6 - h)^2 + (10 - h)^2: h = 8, i = 20
    observer = OMSEObserver()
    observer.update(t(0.0, 6.0, 10.0))
    x_min, x_max = observer.compute_range(1)
    assert x_min.item() == 0.0 and x_max.item() == pytest.approx(8.0)
    observer.update(t(0.0, 12.0, 20.0))  # the same scaled by 2: (0, 16); averaged: (0, 12)
    x_min, x_max = observer.compute_range(1)
    assert x_min.item() == 0.0 and x_max.item() == pytest.approx(12.0)
    per_channel = OMSEObserver(channel_axis=0, bits=1)
    per_channel.update(torch.tensor([[0.0, 6.0, 10.0], [-10.0, -6.0, 0.0]]))  # mirrored: (-8, 0)
    x_min, x_max = per_channel.compute_range(1)
    assert torch.allclose(x_min, t(0.0, -8.0)) and torch.allclose(x_max, t(8.0, 0.0))


def test_make_observer() -> None:
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("avgminmax", channel_axis=0), AvgMinMaxObserver)
    percentile = make_observer("percentile", percentile=99.9, momentum=0.1)
    assert isinstance(percentile, PercentileObserver) and percentile.percentile == 99.9
    mse = make_observer("mse", channel_axis=0, p=2.0, bits=4)
    assert isinstance(mse, MSEObserver) and (mse.p, mse.channel_axis, mse.bits) == (2.0, 0, 4)
    assert isinstance(make_observer("omse"), OMSEObserver)
    with pytest.raises(UnknownNameError, match="avgminmax, minmax, mse, omse, percentile"):
        make_observer("minmaxx")
    with pytest.raises(ConfigError, match="minmax"):
        make_observer("minmax", percentile=99.0)
    with pytest.raises(ConfigError):
        make_observer("mse", p=0.5)
    with pytest.raises(ConfigError):
        make_observer("percentile", percentile=120.0)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", OBSERVERS.names())
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_every_observer_reports_float32_ranges_on_the_data_device(name: str, channel_axis: int | None,
                                                                  device: str) -> None:
    """The one dtype/device rule of the observers: whatever a search computes on the host, the range
    it reports is float32 on the device of the data it observed, per tensor (one value) or per channel ([C])."""
    g = torch.Generator().manual_seed(3)
    observer = make_observer(name, channel_axis=channel_axis)
    for _ in range(2):
        observer.update((torch.randn(6, 50, generator=g) * 3 + 0.5).to(device))
    for bits in (4, 8):
        x_min, x_max = observer.compute_range(bits)
        for v in (x_min, x_max):
            assert v.dtype == torch.float32 and v.device.type == device
            assert v.numel() == 1 if channel_axis is None else v.shape == (6,)
        assert bool((x_min <= x_max).all())


def test_strided_sample_keeps_extremes_and_caps_size():
    from ptqbench.quant.mse_search import strided_sample

    x = torch.arange(100_000, dtype=torch.float32).roll(777)
    sample = strided_sample(x, 1000)
    assert sample.numel() <= 1002
    assert sample.min() == 0 and sample.max() == 99_999
    assert strided_sample(x, None) is x and strided_sample(x, 10**6) is x


def test_cpu_grid_search_is_remembered_by_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second search of equal bytes and settings reuses the first result (no new search) and
    returns a copy equal to it; other bytes or settings search again."""
    calls = []
    search = mse_search.search_grid_per_channel
    monkeypatch.setattr(mse_search, "search_grid_per_channel",
                        lambda *args: calls.append(args) or search(*args))
    monkeypatch.setattr(mse_search, "_CPU_GRID_MEMO", type(mse_search._CPU_GRID_MEMO)())
    rows = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    first = grid_search_per_channel(rows, 4, 2.4, 20)
    first[0].zero_()  # the caller's copy, not the remembered result
    again = grid_search_per_channel(rows.clone(), 4, 2.4, 20)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(again, search(rows, 4, 2.4, 20)))
    grid_search_per_channel(rows, 6, 2.4, 20)
    changed = rows.clone()
    changed[1, 5] = torch.nextafter(changed[1, 5], torch.tensor(9.0))
    grid_search_per_channel(changed, 4, 2.4, 20)
    assert len(calls) == 3
