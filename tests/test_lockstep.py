"""The lockstep search engine: scipy's bounded Brent search as a generator, batched searches that
equal the searches run alone, deferred observer searches, and the loss arithmetic per device."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from ptqbench.quant.bounded_brent import bounded_brent, run_alone
from ptqbench.quant.fused_lp_error import HAS_TRITON, FusedLpError
from ptqbench.quant.lockstep import LpErrorRows, grid_qparams, lp_error, run_lockstep
from ptqbench.quant.mse_search import mse_fast_search, search_tensor_ranges, side_of, tensor_extrema
from ptqbench.quant.observers import DeferredSearches, make_observer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("max_iter", [None, 5, 17])
def test_bounded_brent_visits_what_scipy_visits(max_iter):
    """Same points, same minimiser, same minimum as scipy's bounded search, with the float32
    losses the reference hands it (`loss.cpu().numpy()`), on bumpy functions with plateaus."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = _bumpy(rng.normal(size=5))
        lo, hi = sorted(rng.normal(size=2) * 3)
        seen_scipy, seen_ours = [], []
        options = None if max_iter is None else {"maxiter": max_iter}
        expected = minimize_scalar(_recording(f, seen_scipy), bounds=(lo, hi), method="bounded", options=options)
        got = run_alone(bounded_brent(lo, hi, max_iter), _recording(f, seen_ours))
        assert seen_ours == seen_scipy
        assert got == (expected.x, expected.fun)


def _bumpy(c: np.ndarray) -> Callable[[float], np.ndarray]:
    """A float32 function with several minima and plateaus, returned as the reference's losses are
    (`loss.cpu().numpy()`, a 0-d float32 array)."""
    return lambda x: np.asarray(np.float32(np.sin(c[0] * x) + c[1] * x * x + c[2] * abs(x - c[3])
                                           + 0.1 * np.round(c[4] * x * 7)))


def _recording(f: Callable[[float], np.ndarray], seen: list[float]) -> Callable[[float], np.ndarray]:
    """f, appending every point it is called at to `seen`."""
    return lambda x: seen.append(x) or f(x)


def test_point_interval_evaluates_once():
    calls = []
    assert run_alone(bounded_brent(2.0, 2.0), lambda x: calls.append(x) or 1.5) == (2.0, np.float32(1.5))
    assert calls == [2.0]


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = []
    for i, n in enumerate([300, 300, 500, 300, 500, 700, 300]):
        x = torch.randn(n, generator=g) * (1 + i)
        xs.append(x.abs() if i % 3 == 0 else -x.abs() if i == 4 else x)
    return xs


@pytest.mark.parametrize("device", DEVICES)
def test_batched_searches_equal_the_searches_alone(device):
    xs = [x.to(device) for x in _tensors()]
    extrema = tensor_extrema(xs)
    sides = [side_of(*e) for e in extrema]
    bits = [4, 4, 6, 4, 6, 4, 8]
    together = search_tensor_ranges(xs, sides, bits, 2.4)
    alone = [search_tensor_ranges([x], [side], [b], 2.4)[0] for x, side, b in zip(xs, sides, bits)]
    assert together == alone
    assert {"pos", "neg", "no"} <= set(sides)


@pytest.mark.parametrize("device", DEVICES)
def test_lanes_change_no_result(device):
    """The searches give the same ranges whether they run in one lane or take turns in two or three."""
    xs = [x.to(device) for x in _tensors()]
    extrema = tensor_extrema(xs)

    def ranges(lanes: int) -> list[object]:
        searches = [mse_fast_search(side_of(*e), *e, 4) for e in extrema]
        return run_lockstep([(LpErrorRows(xs, 4, 2.4), searches)], lanes=lanes)[0]

    one = ranges(1)
    assert ranges(2) == one
    assert ranges(3) == one


def test_lanes_take_turns():
    """With two lanes, lane 0 (even searches) and lane 1 (odd ones) are scored alternately, each
    step's candidates chosen from the losses of that lane's previous step."""
    calls: list[list[int]] = []

    class Parabolas:
        def losses(self, rows, candidates):
            calls.append(list(rows))
            return torch.tensor([(float(x) - row) ** 2 for row, x in zip(rows, candidates)])

    searches = [bounded_brent(-10.0, 10.0 + i, max_iter=6 + i) for i in range(4)]
    found = run_lockstep([(Parabolas(), searches)], lanes=2)[0]
    assert [round(x, 4) for x, _ in found] == [0.0, 1.0, 2.0, 3.0]
    assert [sorted({row % 2 for row in rows}) for rows in calls[:12]] == [[0], [1]] * 6
    expected = [[run_alone(bounded_brent(-10.0, 10.0 + i, max_iter=6 + i), lambda x, i=i: np.float32((x - i) ** 2))
                 for i in range(4)]]
    assert [found] == expected


@pytest.mark.parametrize("max_bytes", [1, 5000])
def test_deferred_observer_searches_equal_immediate_ones(max_bytes):
    """Observers whose updates wait in a `DeferredSearches` (flushed after every update, or
    after several) report the ranges they report when searching each update at once."""
    xs = _tensors()
    immediate = [make_observer("mse", bits=4) for _ in range(3)]
    deferred = [make_observer("mse", bits=4) for _ in range(3)]
    batch = DeferredSearches(max_bytes=max_bytes)
    for observer in deferred:
        observer.defer_searches(batch)
    for step, x in enumerate(xs):
        for i in range(3):
            immediate[i].update(x * (i + 1) + step)
            deferred[i].update(x * (i + 1) + step)
    for a, b in zip(immediate, deferred):
        assert [float(v) for v in a.compute_range(4)] == [float(v) for v in b.compute_range(4)]
        assert a.side == b.side


@pytest.mark.parametrize("device", DEVICES)
def test_loss_arithmetic_per_device(device):
    """On the CPU the loss quantizes with true division, as the reference's `x / scale`; on a GPU
    torch computes the reference's `x / scale` (a Python number) as a product with the float32
    reciprocal, which the fused kernel reproduces. Both paths keep float32 data in float32."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4000, generator=g) * 3).to(device)
    for lo, hi in [(-2.0, 3.1), (-0.7, 0.9), (0.0, 5.0)]:
        s, z = grid_qparams(lo, hi, 4)
        for reciprocal in (False, True):
            got = lp_error(x, s, z, 4, 2.4, reciprocal=reciprocal)
            assert got.dtype == torch.float32 and got.device == x.device
            scaled = x * (1.0 / torch.tensor(s, dtype=torch.float32)).item() if reciprocal else x / s
            x_hat = (torch.clamp(torch.round(scaled) + z, 0, 15) - z) * s
            assert got == (x_hat - x).abs().pow(2.4).mean()
        assert lp_error(x, s, z, 4, 2.4).equal(lp_error(x, s, z, 4, 2.4, reciprocal=device != "cpu"))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("p", [2.4, 2.0])
def test_fused_loss_is_the_eager_arithmetic(p):
    """The fused GPU loss computes each element's error as torch's fake quantization and pow do
    (one-element tensors, whose loss is the error: exact for p = 2, within a few ulp of torch's pow
    otherwise), sums large tensors to within float32 rounding of the eager mean, and scores a
    tensor the same whichever rows share its launch."""
    g = torch.Generator().manual_seed(2)
    singles = [(torch.randn(1, generator=g) * 4).cuda() for _ in range(300)]
    ranges = [(-2.0, 3.1), (-0.7, 0.9), (0.0, 5.0), (-1e-3, 2e-3)]
    qparams = [grid_qparams(*ranges[i % 4], 4) for i in range(300)]
    fused = FusedLpError(singles, 4, p).losses(list(range(300)), qparams)
    eager = torch.stack([lp_error(x, s, z, 4, p) for x, (s, z) in zip(singles, qparams)])
    if p == 2.0:
        assert fused.equal(eager)
    else:
        assert torch.allclose(fused, eager, rtol=4e-7, atol=0)
    large = [(torch.randn(n, generator=g) * 2).cuda() for n in (5, 70_000, 300_001, 1 << 20)]
    scorer = FusedLpError(large, 6, p)
    qparams = [grid_qparams(-1.5 - i, 2.0 + i, 6) for i in range(4)]
    together = scorer.losses([0, 1, 2, 3], qparams)
    for i, (x, (s, z)) in enumerate(zip(large, qparams)):
        assert scorer.losses([i], [(s, z)]).equal(together[i : i + 1])
        assert torch.isclose(together[i], lp_error(x, s, z, 6, p), rtol=1e-5, atol=0)
