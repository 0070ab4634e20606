"""scipy's bounded Brent search (`minimize_scalar(method="bounded")`), vectorised over lanes.

The reference observers call `scipy.optimize.minimize_scalar(..., method="Bounded")` once per
tensor and per calibration image, and every call evaluates a loss on the GPU and reads it back.
`BrentLanes` holds the state of many independent searches (lanes) in numpy arrays: the caller
reads the points the lanes want evaluated (`x`), scores all of them in one batched tensor
operation, and hands the losses back (`tell`), so one numpy step advances every lane at once
(`ptqbench.quant.lockstep` drives them).

The arithmetic is scipy's (`scipy.optimize._optimize._minimize_scalar_bounded`, default
`xatol=1e-5`, `maxiter=500`) element for element in float64, with one detail of the reference kept:
its losses arrive as float32 numbers (`loss.cpu().numpy()`), so differences of losses are taken in
float32 before they enter the parabolic fit. Given the same losses, each lane visits the same
points and ends at the same minimiser as scipy (`tests/test_lockstep.py` checks both).
"""

from __future__ import annotations

import math

import numpy as np

_SQRT_EPS = math.sqrt(2.2e-16)
_GOLDEN_MEAN = 0.5 * (3.0 - math.sqrt(5.0))
XATOL = 1e-5
MAX_ITER = 500

_FLOAT64_FIELDS = ("a", "b", "x", "xf", "nfc", "fulc", "rat", "e", "xm", "tol1", "tol2")
_FLOAT32_FIELDS = ("fx", "fnfc", "ffulc")


def _sign(values: np.ndarray) -> np.ndarray:
    """np.sign(v) + (v == 0), as scipy writes it: +1 for v >= 0, -1 below (and for NaN)."""
    return np.where(values >= 0, 1.0, -1.0)


class BrentLanes:
    """`size` independent bounded Brent searches (lanes), each started and advanced on its own
    schedule through index arrays.

    Per lane: `x` is the point it waits to have evaluated; after its last `tell`, `xf` and `fx`
    are its minimiser and minimum (scipy's `res.x`, `res.fun`). max_iter: the cap on evaluations
    per search (scipy's `maxiter`; None = 500).
    """

    def __init__(self, size: int, max_iter: int | None = None) -> None:
        self.max_fun = MAX_ITER if max_iter is None else max_iter
        for name in _FLOAT64_FIELDS:
            setattr(self, name, np.zeros(size, dtype=np.float64))
        for name in _FLOAT32_FIELDS:
            setattr(self, name, np.zeros(size, dtype=np.float32))
        self.num = np.zeros(size, dtype=np.int64)
        self.first = np.zeros(size, dtype=bool)
        self.point = np.zeros(size, dtype=bool)

    def start(self, lanes: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> None:
        """(Re)start the searches of `lanes` (int indices) on [lower, upper] (float64, per lane).
        A point interval (upper <= lower) evaluates `lower` once."""
        lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        fulc = lower + _GOLDEN_MEAN * (upper - lower)
        point = upper <= lower
        start = np.where(point, lower, fulc)
        self.a[lanes], self.b[lanes] = lower, upper
        self.x[lanes] = self.xf[lanes] = self.nfc[lanes] = self.fulc[lanes] = start
        self.rat[lanes] = self.e[lanes] = 0.0
        self.xm[lanes] = 0.5 * (lower + upper)
        self.tol1[lanes] = _SQRT_EPS * np.abs(start) + XATOL / 3.0
        self.tol2[lanes] = 2.0 * self.tol1[lanes]
        self.num[lanes] = 1
        self.first[lanes], self.point[lanes] = True, point

    def tell(self, lanes: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Hand `lanes` the losses at their points `x[lanes]` (cast to float32); each lane that goes
        on sets its next `x`. Returns a bool array: which of `lanes` have finished."""
        losses = np.asarray(losses).astype(np.float32)
        first = self.first[lanes]
        initial = lanes[first]
        self.fx[initial] = self.fnfc[initial] = self.ffulc[initial] = losses[first]
        self.first[initial] = False
        if not first.all():
            self._update(lanes[~first], losses[~first])
        finished = self.point[lanes].copy()
        searching = ~finished
        going = lanes[searching]
        within = np.abs(self.xf[going] - self.xm[going]) > self.tol2[going] - 0.5 * (self.b[going] - self.a[going])
        goes_on = within & (first[searching] | (self.num[going] < self.max_fun))
        finished[searching] = ~goes_on
        if goes_on.any():
            self._propose(going[goes_on])
        return finished

    def _update(self, lanes: np.ndarray, fu: np.ndarray) -> None:
        """scipy's bracket update after evaluating x[lanes] (loss fu), and the new tolerances."""
        x, xf, nfc, fulc = self.x[lanes], self.xf[lanes], self.nfc[lanes], self.fulc[lanes]
        fx, fnfc, ffulc = self.fx[lanes], self.fnfc[lanes], self.ffulc[lanes]
        a, b = self.a[lanes], self.b[lanes]
        better = fu <= fx
        self.a[lanes] = np.where(better, np.where(x >= xf, xf, a), np.where(x < xf, x, a))
        self.b[lanes] = np.where(better, np.where(x >= xf, b, xf), np.where(x < xf, b, x))
        second = ~better & ((fu <= fnfc) | (nfc == xf))
        third = ~better & ~second & ((fu <= ffulc) | (fulc == xf) | (fulc == nfc))
        shift = better | second
        self.fulc[lanes] = np.where(shift, nfc, np.where(third, x, fulc))
        self.ffulc[lanes] = np.where(shift, fnfc, np.where(third, fu, ffulc))
        self.nfc[lanes] = np.where(better, xf, np.where(second, x, nfc))
        self.fnfc[lanes] = np.where(better, fx, np.where(second, fu, fnfc))
        self.xf[lanes] = np.where(better, x, xf)
        self.fx[lanes] = np.where(better, fu, fx)
        self.num[lanes] += 1
        self.xm[lanes] = 0.5 * (self.a[lanes] + self.b[lanes])
        self.tol1[lanes] = _SQRT_EPS * np.abs(self.xf[lanes]) + XATOL / 3.0
        self.tol2[lanes] = 2.0 * self.tol1[lanes]

    def _propose(self, lanes: np.ndarray) -> None:
        """scipy's choice of the next point of `lanes`: a parabolic step where the fit is
        acceptable, else a golden-section step, never closer than tol1 to xf."""
        xf, nfc, fulc, a, b = self.xf[lanes], self.nfc[lanes], self.fulc[lanes], self.a[lanes], self.b[lanes]
        e, rat, xm = self.e[lanes], self.rat[lanes], self.xm[lanes]
        tol1, tol2 = self.tol1[lanes], self.tol2[lanes]
        fx = self.fx[lanes]
        with np.errstate(all="ignore"):
            r = (xf - nfc) * (fx - self.ffulc[lanes]).astype(np.float64)
            q = (xf - fulc) * (fx - self.fnfc[lanes]).astype(np.float64)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            p = np.where(q > 0.0, -p, p)
            q = np.abs(q)
            parabolic = ((np.abs(e) > tol1) & (np.abs(p) < np.abs(0.5 * q * e))
                         & (q * (a - xf) < p) & (p < q * (b - xf)))
            step = (p + 0.0) / np.where(parabolic, q, 1.0)
            near_end = ((xf + step) - a < tol2) | (b - (xf + step) < tol2)
            step = np.where(near_end, tol1 * _sign(xm - xf), step)
            golden_e = np.where(xf >= xm, a - xf, b - xf)
            self.e[lanes] = np.where(parabolic, rat, golden_e)
            rat = np.where(parabolic, step, _GOLDEN_MEAN * golden_e)
        self.rat[lanes] = rat
        self.x[lanes] = xf + _sign(rat) * np.maximum(np.abs(rat), tol1)
