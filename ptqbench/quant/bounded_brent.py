"""scipy's bounded Brent search (`minimize_scalar(method="bounded")`) as a generator.

The reference observers call `scipy.optimize.minimize_scalar(..., method="Bounded")` once per
tensor and per calibration image, and every call evaluates a loss on the GPU and reads it back.
Written as a generator, one search yields the point it wants evaluated and receives the loss, so
a driver (`ptqbench.quant.lockstep`) can advance hundreds of independent searches together and
evaluate all their candidates in one batched tensor operation per step.

The arithmetic is scipy's (`scipy.optimize._optimize._minimize_scalar_bounded`, default
`xatol=1e-5`, `maxiter=500`) step for step in float64, with one detail of the reference kept: its
losses arrive as float32 numbers (`loss.cpu().numpy()`), so differences of losses are taken in
float32 before they enter the parabolic fit. Given the same losses, the generator visits the same
points and returns the same minimiser as scipy.

A search protocol: `x = next(search)`, then repeatedly `x = search.send(loss_at_x)` until it
raises StopIteration, whose `value` is `(x_best, loss_best)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import TypeVar

import numpy as np

Search = Generator[float, np.float32, tuple[float, np.float32]]
Candidate = TypeVar("Candidate")
Result = TypeVar("Result")

_SQRT_EPS = math.sqrt(2.2e-16)
_GOLDEN_MEAN = 0.5 * (3.0 - math.sqrt(5.0))
XATOL = 1e-5
MAX_ITER = 500


def _sign(value: float) -> float:
    """np.sign(v) + (v == 0): +1 for v >= 0, -1 below."""
    return 1.0 if value >= 0 else -1.0


def bounded_brent(lower: float, upper: float, max_iter: int | None = None) -> Search:
    """Minimise a scalar function on [lower, upper] (scipy's bounded Brent search).

    Yields the points to evaluate (Python floats), receives each loss (a float32 number), returns
    (x_best, loss_best). A point interval (upper <= lower) evaluates `lower` once.
    max_iter: the cap on evaluations (scipy's `maxiter`; None = 500).
    """
    if upper <= lower:
        loss = yield lower
        return lower, np.float32(loss)
    max_fun = MAX_ITER if max_iter is None else max_iter
    a, b = lower, upper
    fulc = a + _GOLDEN_MEAN * (b - a)
    nfc = xf = fulc
    rat = e = 0.0
    fx = np.float32((yield xf))
    num = 1
    ffulc = fnfc = fx
    xm = 0.5 * (a + b)
    tol1 = _SQRT_EPS * abs(xf) + XATOL / 3.0
    tol2 = 2.0 * tol1
    while abs(xf - xm) > tol2 - 0.5 * (b - a):
        golden = True
        if abs(e) > tol1:
            golden = False
            r = (xf - nfc) * float(fx - ffulc)
            q = (xf - fulc) * float(fx - fnfc)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            r = e
            e = rat
            if abs(p) < abs(0.5 * q * r) and q * (a - xf) < p < q * (b - xf):
                rat = (p + 0.0) / q
                x = xf + rat
                if (x - a) < tol2 or (b - x) < tol2:
                    rat = tol1 * _sign(xm - xf)
            else:
                golden = True
        if golden:
            e = (a - xf) if xf >= xm else (b - xf)
            rat = _GOLDEN_MEAN * e
        x = xf + _sign(rat) * max(abs(rat), tol1)
        fu = np.float32((yield x))
        num += 1
        if fu <= fx:
            if x >= xf:
                a = xf
            else:
                b = xf
            fulc, ffulc = nfc, fnfc
            nfc, fnfc = xf, fx
            xf, fx = x, fu
        else:
            if x < xf:
                a = x
            else:
                b = x
            if fu <= fnfc or nfc == xf:
                fulc, ffulc = nfc, fnfc
                nfc, fnfc = x, fu
            elif fu <= ffulc or fulc == xf or fulc == nfc:
                fulc, ffulc = x, fu
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * abs(xf) + XATOL / 3.0
        tol2 = 2.0 * tol1
        if num >= max_fun:
            break
    return xf, fx


def drive(search: Search, evaluate: Callable[[float], Generator[Candidate, np.float32, np.float32]]
          ) -> Generator[Candidate, np.float32, tuple[float, np.float32]]:
    """Run `search`, evaluating each of its points x by the sub-search `evaluate(x)` (a generator
    that yields candidates and returns x's loss). Returns the search's (x_best, loss_best)."""
    x = next(search)
    while True:
        loss = yield from evaluate(x)
        try:
            x = search.send(loss)
        except StopIteration as stop:
            return stop.value


def loss_of(candidate: Candidate) -> Generator[Candidate, np.float32, np.float32]:
    """The sub-search that asks for one candidate's loss and returns it."""
    return np.float32((yield candidate))


def run_alone(search: Generator[Candidate, np.float32, Result],
              loss: Callable[[Candidate], float]) -> Result:
    """Run one search to its end, evaluating each candidate with `loss` (no batching)."""
    candidate = next(search)
    while True:
        try:
            candidate = search.send(np.float32(loss(candidate)))
        except StopIteration as stop:
            return stop.value
