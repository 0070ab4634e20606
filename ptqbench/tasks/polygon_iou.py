"""DOTA_devkit's polygon IoU of quads (oriented boxes), vectorised over pairs.

Polygon IoU (`poly_iou`) re-implements the devkit's `polyiou.iou_poly` algorithm: the first 4
vertices of each quad; each quad is reversed when its shoelace area is negative; the
intersection is the sum, over every pair of edges, of the signed intersection of the two
triangles (origin, edge) clipped against each other (Sutherland-Hodgman, eps 1e-8);
IoU = inter / (|area1| + |area2| - inter) with IEEE division. For simple quads (convex or not)
this is the exact polygon IoU. For a self-intersecting ("bow-tie") quad it is a winding-number
weighted overlap: a symmetric bow-tie has area 0 and IoU 0 with a quad covering both lobes
equally, but a quad covering one lobe overlaps with +-lobe area, so the IoU can be any value,
including NaN or infinity where the union is 0 (the devkit behaves the same; shapely would
raise instead). The operation order follows the devkit, so results agree to the last bit
wherever the devkit's own behaviour is defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = 1e-8


def _differs(values: np.ndarray) -> np.ndarray:
    """The devkit's `sig(v) != 0`: |v| > 1e-8 (NaN counts as 0)."""
    return (values > _EPS) | (values < -_EPS)


def _sig(values: np.ndarray) -> np.ndarray:
    """The devkit's `sig`: 1 above 1e-8, -1 below -1e-8, else 0 (int8, same shape)."""
    return (values > _EPS).astype(np.int8) - (values < -_EPS).astype(np.int8)


def _next_vertex(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values[p, k + 1], wrapping to values[p, 0] at the last vertex k = counts[p] - 1; [P, C]."""
    shifted = np.empty_like(values)
    shifted[:, :-1] = values[:, 1:]
    shifted[np.arange(len(values)), np.maximum(counts - 1, 0)] = values[:, 0]
    return shifted


def _compact(xs: np.ndarray, ys: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move the kept vertices of every row [P, C] to the front, in order; returns xs, ys, counts [P].

    Columns past a row's count are zero."""
    counts = keep.sum(axis=1)
    width = max(int(counts.max(initial=0)), 1)
    flat = np.flatnonzero(keep)
    target = (flat // keep.shape[1]) * width + (np.cumsum(keep, axis=1) - 1).ravel()[flat]
    out_x = np.zeros((len(keep), width))
    out_y = np.zeros((len(keep), width))
    out_x.ravel()[target] = xs.ravel()[flat]
    out_y.ravel()[target] = ys.ravel()[flat]
    return out_x, out_y, counts


def _polygon_area(xs: np.ndarray, ys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Signed shoelace areas [P] of polygons given by their first `counts` vertices of xs, ys [P, C],
    summed vertex by vertex from 0.0 as the devkit's `area` does."""
    next_x, next_y = _next_vertex(xs, counts), _next_vertex(ys, counts)
    total = np.zeros(xs.shape[0])
    for k in range(xs.shape[1]):
        term = xs[:, k] * next_y[:, k] - ys[:, k] * next_x[:, k]
        total = total + np.where(k < counts, term, 0.0)
    return total / 2.0


def _cut(xs: np.ndarray, ys: np.ndarray, counts: np.ndarray, a: tuple[np.ndarray, np.ndarray],
         b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's `polygon_cut` on every row: keep the part of polygon p strictly left of the
    directed line a[p] -> b[p] (a, b: (x [P], y [P])), adding crossing points, then dropping
    consecutive duplicates and trailing copies of the first vertex (both within 1e-8)."""
    rows, width = xs.shape
    valid = np.arange(width)[None, :] < counts[:, None]
    ax, ay = a[0][:, None], a[1][:, None]
    dx, dy = b[0][:, None] - ax, b[1][:, None] - ay
    raw = dx * (ys - ay) - (xs - ax) * dy
    raw_next = _next_vertex(raw, counts)
    side = _sig(raw)
    den = raw_next - raw
    crossing = _differs(den)
    cross_x = np.where(crossing, (xs * raw_next - _next_vertex(xs, counts) * raw) / den, xs)
    cross_y = np.where(crossing, (ys * raw_next - _next_vertex(ys, counts) * raw) / den, ys)
    keep = np.stack([valid & (side > 0), valid & (side != _next_vertex(side, counts))], axis=2)
    kept_x, kept_y, kept = _compact(np.stack([xs, cross_x], axis=2).reshape(rows, 2 * width),
                                    np.stack([ys, cross_y], axis=2).reshape(rows, 2 * width),
                                    keep.reshape(rows, 2 * width))
    distinct = np.ones(kept_x.shape, dtype=bool)
    distinct[:, 1:] = _differs(kept_x[:, 1:] - kept_x[:, :-1]) | _differs(kept_y[:, 1:] - kept_y[:, :-1])
    distinct &= np.arange(kept_x.shape[1])[None, :] < kept[:, None]
    out_x, out_y, counts = _compact(kept_x, kept_y, distinct)
    row_index = np.arange(rows)
    while True:
        last = np.maximum(counts - 1, 0)
        same_as_first = ~(_differs(out_x[row_index, last] - out_x[:, 0])
                          | _differs(out_y[row_index, last] - out_y[:, 0]))
        drop = (counts > 1) & same_as_first
        if not drop.any():
            return out_x, out_y, counts
        counts = counts - drop


def _oriented_quads(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quads [P, 8] -> vertex xs, ys [P, 4], each row reversed where its signed area is < 0."""
    xs, ys = polygons[:, 0:8:2].copy(), polygons[:, 1:8:2].copy()
    negative = _polygon_area(xs, ys, np.full(len(xs), 4)) < 0
    xs[negative], ys[negative] = xs[negative, ::-1], ys[negative, ::-1]
    return xs, ys


def _iou_rows(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """poly_iou_batch for one chunk of rows (slots past a polygon's vertex count hold junk that
    may overflow; the masks keep it out of every result)."""
    with np.errstate(all="ignore"):
        return _iou_rows_unchecked(first, second)


def _triangle_overlaps(a_x: np.ndarray, a_y: np.ndarray, b_x: np.ndarray, b_y: np.ndarray,
                       c_x: np.ndarray, c_y: np.ndarray, d_x: np.ndarray, d_y: np.ndarray) -> np.ndarray:
    """The devkit's edge-pair `intersectArea` for every row [R]: the area of triangle (0, a, b)
    clipped by triangle (0, c, d), negated when exactly one of them is clockwise, 0 when either
    is degenerate. Rows clipped down to fewer than 2 vertices have area exactly 0 and are
    dropped early (adding 0.0 instead of -0.0 leaves every sum unchanged)."""
    s1 = _sig(a_x * b_y - b_x * a_y)
    s2 = _sig(c_x * d_y - d_x * c_y)
    flip1, flip2 = s1 == -1, s2 == -1
    a_x, b_x = np.where(flip1, b_x, a_x), np.where(flip1, a_x, b_x)
    a_y, b_y = np.where(flip1, b_y, a_y), np.where(flip1, a_y, b_y)
    c_x, d_x = np.where(flip2, d_x, c_x), np.where(flip2, c_x, d_x)
    c_y, d_y = np.where(flip2, d_y, c_y), np.where(flip2, c_y, d_y)
    alive = np.flatnonzero((s1 != 0) & (s2 != 0))
    zero = np.zeros(len(alive))
    xs = np.stack([zero, a_x[alive], b_x[alive]], axis=1)
    ys = np.stack([zero, a_y[alive], b_y[alive]], axis=1)
    counts = np.full(len(alive), 3)
    origin = (np.zeros_like(c_x), np.zeros_like(c_y))
    for start, end in ((origin, (c_x, c_y)), ((c_x, c_y), (d_x, d_y)), ((d_x, d_y), origin)):
        xs, ys, counts = _cut(xs, ys, counts, (start[0][alive], start[1][alive]), (end[0][alive], end[1][alive]))
        live = counts >= 2
        alive, xs, ys, counts = alive[live], xs[live], ys[live], counts[live]
    area = np.abs(_polygon_area(xs, ys, counts))
    result = np.zeros(len(s1))
    result[alive] = np.where(s1[alive] * s2[alive] == -1, -area, area)
    return result


def _iou_rows_unchecked(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    count = len(first)
    p_x, p_y = _oriented_quads(first)
    q_x, q_y = _oriented_quads(second)
    edge_i = np.repeat(np.arange(4), 4)
    edge_j = np.tile(np.arange(4), 4)
    pieces = _triangle_overlaps(p_x[:, edge_i].ravel(), p_y[:, edge_i].ravel(),
                                p_x[:, (edge_i + 1) % 4].ravel(), p_y[:, (edge_i + 1) % 4].ravel(),
                                q_x[:, edge_j].ravel(), q_y[:, edge_j].ravel(),
                                q_x[:, (edge_j + 1) % 4].ravel(), q_y[:, (edge_j + 1) % 4].ravel())
    pieces = pieces.reshape(count, 16)
    inter = np.zeros(count)
    for k in range(16):
        inter = inter + pieces[:, k]
    union = (np.abs(_polygon_area(p_x, p_y, np.full(count, 4)))
             + np.abs(_polygon_area(q_x, q_y, np.full(count, 4))) - inter)
    return inter / union


def poly_iou_batch(first: np.ndarray, second: np.ndarray, chunk: int = 512) -> np.ndarray:
    """DOTA_devkit polygon IoU of row pairs: first, second float64 [P, 8] -> IoU float64 [P].

    Row p of `first` plays the devkit's GT role and row p of `second` the detection's (the
    summation order, and so the last bits, depend on it). Each row's result is computed with
    exactly the devkit's sequence of float64 operations; see the module docstring for
    self-intersecting quads.
    """
    first = np.asarray(first, dtype=np.float64).reshape(-1, 8)
    second = np.asarray(second, dtype=np.float64).reshape(-1, 8)
    if len(first) != len(second):
        raise ValueError(f"poly_iou_batch needs as many rows in both arrays, got {len(first)} and {len(second)}")
    parts = [_iou_rows(first[s:s + chunk], second[s:s + chunk]) for s in range(0, len(first), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float64)


def poly_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """DOTA_devkit polygon IoU of two quads given as 8 numbers (x1 y1 ... x4 y4), `first` as GT."""
    return float(poly_iou_batch(np.asarray(first, dtype=np.float64)[None, :8],
                                np.asarray(second, dtype=np.float64)[None, :8])[0])
