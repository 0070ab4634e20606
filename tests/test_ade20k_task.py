"""The ADE20K task: reading, gt prompts and painting, SSA voting, calibration, evaluation."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    generate_crop_boxes,
    mask_to_rle_pytorch,
)

from ptqbench.errors import ConfigError, DataError
from ptqbench.tasks.ade20k import (
    SSA_SETTINGS,
    Ade20kTask,
    component_boxes,
    paint_masks,
    read_prior,
    vote_with_prior,
)
from ptqbench.tasks.ade20k_classes import ADE20K_CLASSES
from ptqbench.tasks.ade20k_metric import read_annotation
from ptqbench.tasks.base import TASKS, TaskConfig

REAL_ROOT = Path(__file__).parents[2] / "shared" / "realdata"
REAL_ADE = REAL_ROOT / "ADEChallengeData2016"


def write_ade(root: Path, labels: dict[str, np.ndarray], split: str = "validation") -> Path:
    """Write images (seeded noise) and raw annotation PNGs for `labels` {stem: raw [H, W]}."""
    ade = root / "ADEChallengeData2016"
    (ade / "images" / split).mkdir(parents=True, exist_ok=True)
    (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, raw in labels.items():
        image = rng.integers(0, 256, size=(*raw.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(ade / "images" / split / f"{stem}.jpg")
        Image.fromarray(raw.astype(np.uint8)).save(ade / "annotations" / split / f"{stem}.png")
    return ade


def square_scene() -> np.ndarray:
    """16x16 raw labels: class 0 (raw 1) around a 8x8 class-2 square (raw 3) at rows/cols 4..11,
    a 2x2 class-4 block (raw 5, 4 px: too small for a prompt) at rows 0..1, cols 14..15, and an
    ignored bottom row (raw 0)."""
    raw = np.ones((16, 16), dtype=np.uint8)
    raw[4:12, 4:12] = 3
    raw[0:2, 14:16] = 5
    raw[15, :] = 0
    return raw


class BoxFillPredictor:
    """A fake Predictor: each mask is its box's rectangle; records the prompts."""

    def __init__(self):
        self.boxes = []
        self.shape = None

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_boxes(self, boxes):
        self.boxes.append(np.array(boxes))
        masks = np.zeros((len(boxes), *self.shape), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
            mask[y0:y1, x0:x1] = True
        return masks, np.ones(len(boxes), dtype=np.float32)

    def stream(self, loaders):
        for loader in loaders:
            item = loader()
            self.set_image(item.image)
            yield item, *self.predict_boxes(item.boxes)


def test_component_boxes():
    label = np.full((32, 32), 255, dtype=np.uint8)
    label[0:5, 0:5] = 3            # 25 px: below 64, dropped
    label[20:30, 20:30] = 3        # 100 px -> box (20, 20, 30, 30)
    label[0:8, 12:20] = 7          # two 8x8 blocks of class 7 that touch only at a corner,
    label[8:16, 4:12] = 7          # (7, 12) and (8, 11): one 8-connected component
    boxes, classes, areas = component_boxes(label)
    np.testing.assert_array_equal(classes, [3, 7])
    np.testing.assert_array_equal(boxes, [[20, 20, 30, 30], [4, 0, 20, 16]])
    np.testing.assert_array_equal(areas, [100, 128])
    boxes, classes, _ = component_boxes(label, min_area=101)
    np.testing.assert_array_equal(classes, [7])
    assert component_boxes(label, min_area=200)[0].shape == (0, 4)


def test_paint_masks_largest_first():
    masks = np.zeros((3, 2, 4), dtype=bool)
    masks[0, :, :2] = True          # area 4, class 9
    masks[1, :, :] = True           # area 8, class 1: painted first
    masks[1, 1, 3] = False          # pixel (1, 3) stays uncovered
    masks[2, 0, 1:3] = True         # area 2, class 5: painted last
    painted = paint_masks(masks, np.array([9, 1, 5]))
    np.testing.assert_array_equal(painted, [[9, 5, 5, 1], [9, 9, 1, 255]])
    assert painted.dtype == np.uint8


def test_vote_with_prior():
    prior = np.array([[0, 0, 3, 3, 255],
                      [4, 4, 255, 255, 255]], dtype=np.uint8)
    big = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=bool)     # 0:2 3:2 4:2 -> tie
    small = np.array([[0, 0, 0, 1, 0], [0, 0, 1, 1, 0]], dtype=bool)   # 3:1, rest unknown
    unknown = np.array([[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]], dtype=bool)  # only 255: skipped
    semantic = vote_with_prior([small, unknown, big], prior)
    # big (largest) first: tie between 0, 3 and 4 -> smallest id 0; then small -> 3.
    np.testing.assert_array_equal(semantic, [[0, 0, 0, 3, 255], [0, 0, 3, 3, 255]])


def test_gt_mode_with_box_fill_predictor(tmp_path):
    write_ade(tmp_path, {"scene": square_scene()})
    task = Ade20kTask(TaskConfig(data_root=tmp_path))
    predictor = BoxFillPredictor()
    scores = task.evaluate(predictor, limit=None, progress=False, out_dir=tmp_path / "out")
    # prompts: class 0 (172 px, rows 0..14 full width) then the class-2 square.
    np.testing.assert_array_equal(predictor.boxes[0], [[0, 0, 16, 15], [4, 4, 12, 12]])
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[4:12, 4:12] = 2
    expected[15, :] = 255
    written = np.array(Image.open(tmp_path / "out" / "ade20k_pred" / "scene.png"))
    np.testing.assert_array_equal(written, expected)
    # class 0: I 172, U 176; class 2: I = U = 64; class 4: I 0, U 4 (in GT, never predicted).
    assert scores == pytest.approx({"mIoU": 100 * (172 / 176 + 1 + 0) / 3,
                                    "aAcc": 100 * 236 / 240, "mAcc": 100 * 2 / 3})
    assert tuple(scores) == task.metrics and task.metric == "mIoU"


def test_image_without_prompt_predicts_nothing(tmp_path):
    write_ade(tmp_path, {"tiny": np.pad(np.full((4, 4), 7, dtype=np.uint8), 2)})
    scores = Ade20kTask(TaskConfig(data_root=tmp_path)).evaluate(
        BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path / "out")
    written = np.array(Image.open(tmp_path / "out" / "ade20k_pred" / "tiny.png"))
    assert (written == 255).all()
    assert scores == {"mIoU": 0.0, "aAcc": 0.0, "mAcc": 0.0}


def test_limit_and_sorted_order(tmp_path):
    write_ade(tmp_path, {"b": square_scene(), "a": np.full((16, 16), 9, dtype=np.uint8)})
    task = Ade20kTask(TaskConfig(data_root=tmp_path))
    scores = task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "ade20k_pred").iterdir()] == ["a.png"]
    assert scores == {"mIoU": 100.0, "aAcc": 100.0, "mAcc": 100.0}


def test_calibration_items(tmp_path, caplog):
    labels = {f"v{i}": square_scene() for i in range(3)}
    many = np.ones((64, 64), dtype=np.uint8)
    for k in range(20):                       # 20 separate blocks of 80, 90 or 100 px
        row, col = divmod(k, 5)
        many[row * 16 : row * 16 + 10, col * 12 : col * 12 + 8 + (k % 3)] = 3 + k % 2
    write_ade(tmp_path, labels)
    task = Ade20kTask(TaskConfig(data_root=tmp_path))
    with caplog.at_level(logging.WARNING):
        items = task.calibration_items(2, seed=0)
    assert "calibrating on the validation split" in caplog.text
    assert len(items) == 2 and items[0].image.shape == (16, 16, 3)
    np.testing.assert_array_equal(items[0].boxes, [[0, 0, 16, 15], [4, 4, 12, 12]])

    write_ade(tmp_path, {"t0": np.zeros((16, 16)), "t1": many}, split="training")
    items = Ade20kTask(TaskConfig(data_root=tmp_path)).calibration_items(5, seed=0)
    assert len(items) == 1                   # t0 is all "other": no component, skipped
    boxes, _, areas = component_boxes(read_annotation(
        tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "t1.png"))
    assert len(boxes) == 21 and items[0].boxes.shape == (16, 4)
    np.testing.assert_array_equal(items[0].boxes, boxes[np.argsort(-areas, kind="stable")[:16]])
    np.testing.assert_array_equal(items[0].boxes[0], [0, 0, 64, 64])  # the background first
    override = Ade20kTask(TaskConfig(data_root=tmp_path, calib_split="validation"))
    assert len(override.calibration_items(5, seed=0)) == 3


def test_fingerprint(tmp_path):
    ade = write_ade(tmp_path, {"a": square_scene()})
    first = Ade20kTask(TaskConfig(data_root=tmp_path)).fingerprint()
    assert len(first) == 16 and first == Ade20kTask(TaskConfig(data_root=tmp_path)).fingerprint()
    changed = square_scene()
    changed[0, 0] = 2
    Image.fromarray(changed).save(ade / "annotations" / "validation" / "a.png")
    assert Ade20kTask(TaskConfig(data_root=tmp_path)).fingerprint() != first
    priors = tmp_path / "priors"
    priors.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(priors / "a.png")
    ssa = Ade20kTask(TaskConfig(data_root=tmp_path, options=(
        ("mode", "ssa"), ("semantic_prior", str(priors)))))
    assert ssa.fingerprint() != Ade20kTask(TaskConfig(data_root=tmp_path)).fingerprint()
    assert "ssa mode" in ssa.describe()


def test_bad_data(tmp_path):
    ade = write_ade(tmp_path, {"a": square_scene()})
    Image.fromarray(np.ones((16, 15), dtype=np.uint8)).save(ade / "annotations" / "validation" / "a.png")
    task = Ade20kTask(TaskConfig(data_root=tmp_path))
    with pytest.raises(DataError, match=r"a\.png: size 15x16 \(WxH\), expected 16x16"):
        task.evaluate(BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path / "out")
    Image.fromarray(np.full((16, 16), 200, dtype=np.uint8)).save(
        ade / "annotations" / "validation" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: label value 200 above 150"):
        task.calibration_items(1, seed=0)
    (ade / "images" / "validation" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"a\.png: no image .*a\.jpg"):
        Ade20kTask(TaskConfig(data_root=tmp_path)).describe()
    with pytest.raises(DataError, match="ADE20K not found"):
        Ade20kTask(TaskConfig(data_root=tmp_path / "missing")).describe()


def test_missing_or_bad_priors(tmp_path):
    write_ade(tmp_path, {"a": square_scene()})
    predictor = BoxFillPredictor()
    predictor.device = None
    no_folder = Ade20kTask(TaskConfig(data_root=tmp_path, options=(("mode", "ssa"),)))
    with pytest.raises(DataError, match=r"ptqbench_priors/validation does not exist"):
        no_folder.evaluate(predictor, limit=None, progress=False, out_dir=tmp_path / "out")
    priors = tmp_path / "priors"
    priors.mkdir()
    task = Ade20kTask(TaskConfig(data_root=tmp_path, options=(
        ("mode", "ssa"), ("semantic_prior", str(priors)))))
    with pytest.raises(DataError, match=r"missing semantic prior map .*priors/a\.png"):
        task.fingerprint()
    Image.fromarray(np.full((16, 16), 150, dtype=np.uint8)).save(priors / "a.png")
    with pytest.raises(DataError, match=r"a\.png: prior value 150 is not a training id"):
        read_prior(priors / "a.png", (16, 16))


def test_options_are_checked(tmp_path):
    write_ade(tmp_path, {"a": square_scene()})
    with pytest.raises(ConfigError, match="mode='sam'"):
        Ade20kTask(TaskConfig(data_root=tmp_path, options=(("mode", "sam"),)))
    with pytest.raises(ConfigError, match="unknown ade20k option.*point_per_side"):
        Ade20kTask(TaskConfig(data_root=tmp_path, options=(("point_per_side", "8"),)))
    with pytest.raises(ConfigError, match="points_per_side='0'"):
        Ade20kTask(TaskConfig(data_root=tmp_path, options=(("points_per_side", "0"),)))
    with pytest.raises(ConfigError, match="takes no prompts file"):
        Ade20kTask(TaskConfig(data_root=tmp_path, prompts="dets.json"))
    assert TASKS.get("ade20k") is Ade20kTask


def test_class_names():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:4] == ("wall", "building", "sky", "floor")
    csv_path = REAL_ADE / "objectInfo150.csv"
    if not csv_path.is_file():
        pytest.skip("../shared/realdata is absent")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["Idx"]) for row in rows] == list(range(1, 151))
    for name, row in zip(ADE20K_CLASSES, rows):
        # The csv joins the words of its synonyms with ';'.
        assert set(name.split()) <= set(row["Name"].split(";")), (name, row["Name"])


def _tiny_predictor():
    models = pytest.importorskip("ptqbench.models.sam1.models")
    inference = pytest.importorskip("ptqbench.models.sam1.inference")
    return inference.BoxPredictor(models.build_sam_tiny(), device="cpu")


def test_gt_mode_on_real_images_with_sam_tiny(tmp_path):
    if not REAL_ADE.is_dir():
        pytest.skip("../shared/realdata is absent")
    task = Ade20kTask(TaskConfig(data_root=REAL_ROOT, model_input_size=256))
    scores = task.evaluate(_tiny_predictor(), limit=None, progress=False, out_dir=tmp_path)
    assert set(scores) == {"mIoU", "aAcc", "mAcc"}
    assert all(0.0 <= value <= 100.0 for value in scores.values())
    for path in sorted((REAL_ADE / "annotations" / "validation").glob("*.png")):
        written = np.array(Image.open(tmp_path / "ade20k_pred" / path.name))
        assert written.shape == read_annotation(path).shape
        assert set(np.unique(written)) <= set(range(150)) | {255}


def test_ssa_mode_with_sam_tiny(tmp_path):
    raw = square_scene()
    write_ade(tmp_path, {"a": raw})
    priors = tmp_path / "priors"
    priors.mkdir()
    prior = read_annotation(tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / "a.png")
    prior[0, :] = 255                         # unknown prior pixels are allowed
    Image.fromarray(prior).save(priors / "a.png")
    task = Ade20kTask(TaskConfig(data_root=tmp_path, options=(
        ("mode", "ssa"), ("semantic_prior", str(priors)), ("points_per_side", "4"))))
    scores = task.evaluate(_tiny_predictor(), limit=None, progress=False, out_dir=tmp_path / "o")
    assert set(scores) == {"mIoU", "aAcc", "mAcc"}
    written = np.array(Image.open(tmp_path / "o" / "ade20k_pred" / "a.png"))
    assert written.shape == (16, 16)
    assert set(np.unique(written)) <= set(np.unique(prior))


class ScriptedGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator whose crops return scripted masks instead of running SAM."""

    def __init__(self, model, masks_per_crop):
        super().__init__(model, points_per_side=4, **SSA_SETTINGS)
        self.masks_per_crop = masks_per_crop

    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size):
        masks = self.masks_per_crop.get(tuple(crop_box), [])
        stack = torch.as_tensor(np.stack(masks)) if masks else torch.zeros((0, *orig_size), dtype=bool)
        count = len(masks)
        return MaskData(
            rles=mask_to_rle_pytorch(stack), boxes=batched_mask_to_box(stack),
            iou_preds=torch.linspace(0.9, 0.95, count), points=torch.zeros(count, 2),
            stability_score=torch.ones(count),
            crop_boxes=torch.tensor([crop_box for _ in range(count)]))


def test_automatic_masks_match_generate():
    image = np.zeros((40, 56, 3), dtype=np.uint8)
    full, first, *_ = generate_crop_boxes((40, 56), 1, 512 / 1500)[0]

    def rectangle(rows, cols):
        mask = np.zeros((40, 56), dtype=bool)
        mask[rows, cols] = True
        return mask

    holed = rectangle(slice(5, 25), slice(5, 30))
    holed[10, 10:12] = False                     # a 2 px hole: filled by the cleanup
    islanded = rectangle(slice(2, 12), slice(44, 54))
    islanded[30, 2:4] = True                     # a 2 px island: removed by the cleanup
    scripted = {
        tuple(full): [holed, rectangle(slice(30, 38), slice(40, 54))],
        # the same box again from a smaller crop: NMS between crops keeps this one
        tuple(first): [rectangle(slice(5, 25), slice(5, 30)), islanded],
    }
    model = pytest.importorskip("ptqbench.models.sam1.models").build_sam_tiny()
    from ptqbench.models.sam1.automatic import automatic_masks

    generator = ScriptedGenerator(model, scripted)
    expected = [record["segmentation"] for record in generator.generate(image)]
    masks = automatic_masks(generator, image)
    assert len(expected) == 3 and len(masks) == 3
    for mask, reference in zip(masks, expected):
        np.testing.assert_array_equal(mask, reference)
    # The small-crop duplicate beat the holed full-image mask; the island is gone.
    np.testing.assert_array_equal(masks[0], rectangle(slice(5, 25), slice(5, 30)))
    np.testing.assert_array_equal(masks[2], rectangle(slice(2, 12), slice(44, 54)))
    # No mask anywhere: segment_anything 1.0 fails there with crop layers on; we return [].
    assert automatic_masks(ScriptedGenerator(model, {}), image) == []
