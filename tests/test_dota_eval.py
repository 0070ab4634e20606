"""DOTA Task-1 readers and the DOTA_devkit evaluator: hand-computed IoUs and APs, ties,
difficult objects, empty classes, bow-tie quads, bad input, and the real DOTA slice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ptqbench.errors import DataError
from ptqbench.tasks.dota_eval import (
    DOTA_CLASSES,
    METRIC_KEYS,
    DotaLabels,
    Task1Detections,
    class_ap,
    evaluate_task1,
    list_split,
    read_dota_labels,
    read_task1_file,
    read_task1_folder,
    score_task1_folder,
    voc07_ap,
)
from ptqbench.tasks.polygon_iou import poly_iou, poly_iou_batch

REAL_DOTA = Path(__file__).parents[2] / "shared" / "realdata"

SQUARE = [0, 0, 2, 0, 2, 2, 0, 2]
BOW_TIE = [0, 0, 2, 2, 2, 0, 0, 2]  # edges cross at (1, 1): a left and a right triangle lobe


def labels_of(*objects: tuple[list[float], str, bool]) -> DotaLabels:
    return DotaLabels(polygons=np.array([o[0] for o in objects], dtype=np.float64).reshape(-1, 8),
                      names=tuple(o[1] for o in objects),
                      difficult=np.array([o[2] for o in objects], dtype=bool))


def dets_of(*lines: tuple[str, float, list[float]]) -> Task1Detections:
    return Task1Detections(image_ids=tuple(line[0] for line in lines),
                           scores=np.array([line[1] for line in lines], dtype=np.float64),
                           polygons=np.array([line[2] for line in lines], dtype=np.float64).reshape(-1, 8))


def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# --- a line-by-line scalar transcription of the devkit's polyiou algorithm (test oracle) ---

def _ref_sig(v: float) -> int:
    return (v > 1e-8) - (v < -1e-8)


def _ref_cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (b[0] - o[0]) * (a[1] - o[1])


def _ref_area(ps) -> float:
    res = 0.0
    for i in range(len(ps)):
        res += ps[i][0] * ps[(i + 1) % len(ps)][1] - ps[i][1] * ps[(i + 1) % len(ps)][0]
    return res / 2.0


def _ref_cut(p, a, b):
    pp = []
    for i in range(len(p)):
        c, d = p[i], p[(i + 1) % len(p)]
        if _ref_sig(_ref_cross(a, b, c)) > 0:
            pp.append(c)
        if _ref_sig(_ref_cross(a, b, c)) != _ref_sig(_ref_cross(a, b, d)):
            s1, s2 = _ref_cross(a, b, c), _ref_cross(a, b, d)
            pp.append(((c[0] * s2 - d[0] * s1) / (s2 - s1), (c[1] * s2 - d[1] * s1) / (s2 - s1)))
    same = lambda u, v: _ref_sig(u[0] - v[0]) == 0 and _ref_sig(u[1] - v[1]) == 0  # noqa: E731
    out = [pt for i, pt in enumerate(pp) if i == 0 or not same(pt, pp[i - 1])]
    while len(out) > 1 and same(out[-1], out[0]):
        out.pop()
    return out


def _ref_pair(a, b, c, d) -> float:
    o = (0.0, 0.0)
    s1, s2 = _ref_sig(_ref_cross(o, a, b)), _ref_sig(_ref_cross(o, c, d))
    if s1 == 0 or s2 == 0:
        return 0.0
    if s1 == -1:
        a, b = b, a
    if s2 == -1:
        c, d = d, c
    p = _ref_cut(_ref_cut(_ref_cut([o, a, b], o, c), c, d), d, o)
    res = abs(_ref_area(p))
    return -res if s1 * s2 == -1 else res


def ref_poly_iou(g, q) -> float:
    ps1 = [(float(g[2 * i]), float(g[2 * i + 1])) for i in range(4)]
    ps2 = [(float(q[2 * i]), float(q[2 * i + 1])) for i in range(4)]
    if _ref_area(ps1) < 0:
        ps1.reverse()
    if _ref_area(ps2) < 0:
        ps2.reverse()
    inter = 0.0
    for i in range(4):
        for j in range(4):
            inter += _ref_pair(ps1[i], ps1[(i + 1) % 4], ps2[j], ps2[(j + 1) % 4])
    union = abs(_ref_area(ps1)) + abs(_ref_area(ps2)) - inter
    if union == 0.0:
        return math.nan if inter == 0.0 else math.copysign(math.inf, inter)
    return inter / union


# --- polygon IoU ---

def test_poly_iou_hand_values() -> None:
    assert poly_iou(SQUARE, SQUARE) == 1.0
    assert poly_iou(SQUARE, [1, 0, 3, 0, 3, 2, 1, 2]) == pytest.approx(2 / 6, abs=1e-12)
    assert poly_iou(SQUARE, [0, 2, 2, 2, 2, 0, 0, 0]) == 1.0  # clockwise order is reversed first
    assert abs(poly_iou(SQUARE, box(5, 5, 7, 7))) < 1e-12
    assert poly_iou(box(0, 0, 4, 4), box(0, 0, 4, 2)) == 0.5


def test_poly_iou_matches_shapely_on_simple_quads() -> None:
    shapely_geometry = pytest.importorskip("shapely.geometry")
    dart = [0, 0, 4, 0, 1, 1, 0, 4]  # simple but not convex
    rng = np.random.default_rng(0)
    pairs = [(dart, SQUARE)]
    def rotated_rect(centre: np.ndarray) -> np.ndarray:
        w, h, theta = rng.uniform(5, 40), rng.uniform(5, 40), rng.uniform(0, np.pi)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        return (corners @ rotation.T + centre).ravel()

    for _ in range(50):
        centre = rng.uniform(0, 1000, 2)
        pairs.append((rotated_rect(centre), rotated_rect(centre + rng.uniform(-6, 6, 2))))
    for first, second in pairs:
        a = shapely_geometry.Polygon(np.reshape(first, (4, 2)))
        b = shapely_geometry.Polygon(np.reshape(second, (4, 2)))
        assert poly_iou(first, second) == pytest.approx(a.intersection(b).area / a.union(b).area, abs=1e-9)


def test_bow_tie_quads_follow_the_devkit_signed_area_semantics() -> None:
    # Signed shoelace area of the bow-tie is 0 (its lobes wind in opposite directions), so the
    # union is just the other quad's area and the overlap is weighted by each lobe's winding.
    assert poly_iou(SQUARE, BOW_TIE) == 0.0            # both lobes covered: +1 - 1 = 0
    assert poly_iou(BOW_TIE, SQUARE) == 0.0
    assert poly_iou(box(0, 0, 1, 2), BOW_TIE) == pytest.approx(1.0, abs=1e-12)   # left lobe: +1 / (2 - 1)
    assert poly_iou(box(1, 0, 2, 2), BOW_TIE) == pytest.approx(-1 / 3, abs=1e-12)  # right lobe: -1 / (2 + 1)
    assert poly_iou(BOW_TIE, BOW_TIE) == pytest.approx(-1.0, abs=1e-12)         # 2 / (0 + 0 - 2)


def test_batch_iou_is_bit_identical_to_the_scalar_algorithm() -> None:
    rng = np.random.default_rng(1)
    first, second = [], []
    for k in range(600):
        if k % 3 == 0:  # overlapping integer quads at image scale
            base = np.round(rng.uniform(0, 2000, 2).repeat(4).reshape(2, 4).T.ravel() + rng.uniform(-30, 30, 8))
            first.append(base)
            second.append(base + np.round(rng.uniform(-8, 8, 8)))
        elif k % 3 == 1:  # real-valued quads
            base = rng.uniform(0, 2000, 2).repeat(4).reshape(2, 4).T.ravel() + rng.uniform(-30, 30, 8)
            first.append(base)
            second.append(base + rng.uniform(-8, 8, 8))
        else:  # tiny grid: bow-ties, degenerate quads, unions of 0
            first.append(np.round(rng.uniform(0, 4, 8)))
            second.append(np.round(rng.uniform(0, 4, 8)))
    got = poly_iou_batch(np.array(first), np.array(second))
    expected = np.array([ref_poly_iou(f, s) for f, s in zip(first, second)])
    assert np.isnan(got).sum() > 0  # the sample does exercise 0 / 0
    np.testing.assert_array_equal(got, expected)  # NaN == NaN here; values bit for bit


# --- AP ---

def test_voc07_ap_uses_the_exact_arange_thresholds() -> None:
    # rec 0.3 is below np.arange's 0.30000000000000004, so only t = 0, 0.1, 0.2 count.
    assert voc07_ap(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11, abs=1e-15)
    assert voc07_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        (6 * 1.0 + 5 * 2 / 3) / 11, abs=1e-15)
    assert voc07_ap(np.array([]), np.array([])) == 0.0


def test_class_ap_hand_computed_with_difficult_and_duplicates() -> None:
    labels = {
        "A": labels_of((box(0, 0, 10, 10), "plane", False), (box(50, 50, 60, 60), "plane", True),
                       (box(100, 100, 110, 110), "ship", False)),
        "B": labels_of((box(0, 0, 20, 20), "plane", False)),
    }
    dets = dets_of(
        ("A", 0.9, box(0, 0, 10, 10)),       # TP
        ("A", 0.8, box(0, 0, 10, 10)),       # duplicate of a taken GT: FP
        ("A", 0.7, box(50, 50, 60, 60)),     # on a difficult GT: ignored
        ("A", 0.6, box(200, 200, 210, 210)),  # nothing there: FP
        ("B", 0.5, box(1, 1, 20, 20)),       # IoU 0.9025: TP
    )
    # tp 1 1 1 1 2, fp 0 1 1 2 2, npos 2 -> rec .5 .5 .5 .5 1, prec 1 .5 .5 1/3 .5
    assert class_ap(labels, dets, "plane") == pytest.approx((6 * 1.0 + 5 * 0.5) / 11, abs=1e-15)
    assert class_ap(labels, dets_of(), "ship") == 0.0          # GT but no detections
    assert class_ap(labels, dets, "bridge") == 0.0             # detections but no GT: npos 0


def test_class_ap_match_needs_iou_strictly_above_half() -> None:
    labels = {"A": labels_of((box(0, 0, 4, 4), "plane", False))}
    assert class_ap(labels, dets_of(("A", 1.0, box(0, 0, 4, 2))), "plane") == 0.0  # IoU exactly 0.5
    assert class_ap(labels, dets_of(("A", 1.0, box(0, 0, 4, 2.1))), "plane") == pytest.approx(1.0)


def test_class_ap_ties_keep_np_argsort_order_of_the_file() -> None:
    labels = {"A": labels_of((box(0, 0, 10, 10), "plane", False))}
    miss, hit = ("A", 0.5, box(100, 100, 110, 110)), ("A", 0.5, box(0, 0, 10, 10))
    # np.argsort(-[0.5, 0.5]) == [0, 1]: file order decides which tied detection comes first.
    assert class_ap(labels, dets_of(miss, hit), "plane") == pytest.approx(0.5)  # prec 0, 1/2
    assert class_ap(labels, dets_of(hit, miss), "plane") == pytest.approx(1.0)  # prec 1, 1/2


def test_bow_tie_detection_over_its_gt_is_a_false_positive() -> None:
    labels = {"A": labels_of((SQUARE, "plane", False))}
    assert class_ap(labels, dets_of(("A", 1.0, BOW_TIE)), "plane") == 0.0


def test_evaluate_task1_means_over_all_15_classes() -> None:
    labels = {"A": labels_of((box(0, 0, 10, 10), "plane", False), (box(20, 0, 30, 10), "ship", False))}
    result = evaluate_task1(labels, {"plane": dets_of(("A", 0.9, box(0, 0, 10, 10)))})
    assert tuple(result) == METRIC_KEYS
    assert result["AP_plane"] == pytest.approx(100.0)
    assert result["AP_ship"] == 0.0
    assert result["mAP"] == pytest.approx(100.0 / 15)


# --- readers and bad input ---

def write_split(root: Path, split: str, labels: dict[str, str], images: tuple[str, ...] = ()) -> Path:
    split_dir = root / "DOTA" / split
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "labelTxt").mkdir(parents=True)
    for name, text in labels.items():
        (split_dir / "labelTxt" / f"{name}.txt").write_text(text)
        (split_dir / "images" / f"{name}.png").write_bytes(b"")
    for name in images:
        (split_dir / "images" / f"{name}.png").write_bytes(b"")
    return split_dir


def test_read_dota_labels_headers_and_difficult(tmp_path: Path) -> None:
    path = tmp_path / "P1.txt"
    path.write_text("imagesource:GoogleEarth\ngsd:0.146\n"
                    "1 2 3 4 5 6 7 8 plane 0\n\n1.5 2 3 4 5 6 7 8 ship 1\n9 9 9 9 9 9 9 9 harbor\n")
    labels = read_dota_labels(path)
    assert labels.names == ("plane", "ship", "harbor")
    assert labels.difficult.tolist() == [False, True, False]
    assert labels.polygons.shape == (3, 8)
    assert labels.polygons[1, 0] == 1.5


@pytest.mark.parametrize("line, message", [
    ("1 2 3 4 5 6 7 8", "9 or 10 tokens"),
    ("1 2 3 4 5 6 7 8 plane 0 extra", "9 or 10 tokens"),
    ("1 2 3 x 5 6 7 8 plane 0", "coordinate 'x' is not a number"),
    ("1 2 3 4 5 6 7 nan plane 0", "not finite"),
    ("1 2 3 4 5 6 7 8 container-crane 0", "unknown class"),
    ("1 2 3 4 5 6 7 8 plane yes", "difficult flag"),
])
def test_malformed_label_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "P9.txt"
    path.write_text(f"gsd:0.1\n1 2 3 4 5 6 7 8 plane 0\n{line}\n")
    with pytest.raises(DataError, match=rf"P9\.txt, line 3: .*{message}"):
        read_dota_labels(path)


def test_image_without_labels_is_an_error(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, "val", {"P1": ""}, images=("P2",))
    with pytest.raises(DataError, match=r"P2\.png has no label file .*P2\.txt"):
        list_split(split_dir)


def test_task1_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "Task1_plane.txt"
    path.write_text("P1 0.5 1 2 3 4 5 6 7 8\nP7 0.5 1 2 3 4 5 6 7 8\n")
    with pytest.raises(DataError, match=r"Task1_plane\.txt, line 2: unknown image 'P7'"):
        read_task1_file(path, {"P1"})
    path.write_text("P1 0.5 1 2 3 4 5 6 7\n")
    with pytest.raises(DataError, match=r"line 1: .*10 tokens"):
        read_task1_file(path, {"P1"})
    path.write_text("P1 high 1 2 3 4 5 6 7 8\n")
    with pytest.raises(DataError, match=r"line 1: score 'high' is not a number"):
        read_task1_file(path, {"P1"})
    (tmp_path / "Task1_boat.txt").write_text("")
    with pytest.raises(DataError, match="'boat' is not a DOTA-v1.0 class"):
        read_task1_folder(tmp_path, {"P1"})


def test_task1_reader_keeps_full_precision_and_file_order(tmp_path: Path) -> None:
    (tmp_path / "Task1_ship.txt").write_text("P2 0.12345678901234567 1 2 3 4 5 6 7 8\n"
                                             "P1 0.9 0 0 1 0 1 1 0 1\n")
    detections = read_task1_folder(tmp_path, {"P1", "P2"})
    assert set(detections) == set(DOTA_CLASSES)
    assert detections["ship"].image_ids == ("P2", "P1")
    assert detections["ship"].scores[0] == 0.12345678901234567
    assert len(detections["plane"]) == 0


def test_score_task1_folder_on_a_written_split(tmp_path: Path) -> None:
    write_split(tmp_path, "val", {"P1": "imagesource:x\n0 0 10 0 10 10 0 10 plane 0\n",
                                  "P2": "0 0 10 0 10 10 0 10 ship 0\n"})
    det_dir = tmp_path / "dets"
    det_dir.mkdir()
    (det_dir / "Task1_plane.txt").write_text("P1 0.9 0 0 10 0 10 10 0 10\nP2 0.8 0 0 10 0 10 10 0 10\n")
    result = score_task1_folder(det_dir, tmp_path)
    assert tuple(result) == METRIC_KEYS
    assert result["AP_plane"] == pytest.approx(100.0)  # TP then FP: precision 1 at recall 1
    assert result["AP_ship"] == 0.0
    (det_dir / "Task1_ship.txt").write_text("P3 0.9 0 0 10 0 10 10 0 10\n")
    with pytest.raises(DataError, match=r"Task1_ship\.txt, line 1: unknown image 'P3'"):
        score_task1_folder(det_dir, tmp_path)
    with pytest.raises(DataError, match=r"DOTA/train/images does not exist"):
        score_task1_folder(det_dir, tmp_path, split="train")


def test_real_slice_gt_as_detections_scores_100_for_present_classes(tmp_path: Path) -> None:
    if not (REAL_DOTA / "DOTA" / "val").is_dir():
        pytest.skip("../shared/realdata/DOTA is absent")
    items = list_split(REAL_DOTA / "DOTA" / "val")
    lines: dict[str, list[str]] = {}
    total = 0
    for item in items:
        labels = read_dota_labels(item.label_path)
        total += len(labels)
        for k, (polygon, name) in enumerate(zip(labels.polygons, labels.names)):
            score = 1.0 - k / 1000.0
            lines.setdefault(name, []).append(f"{item.name} {score!r} " + " ".join(repr(float(v)) for v in polygon))
    for name, class_lines in lines.items():
        (tmp_path / f"Task1_{name}.txt").write_text("\n".join(class_lines) + "\n")
    result = score_task1_folder(tmp_path, REAL_DOTA)
    assert total == 600
    present = {"ship", "harbor", "large-vehicle", "small-vehicle"}
    assert set(lines) == present
    for name in DOTA_CLASSES:
        assert result[f"AP_{name}"] == (pytest.approx(100.0) if name in present else 0.0)
    assert result["mAP"] == pytest.approx(100.0 * 4 / 15)
