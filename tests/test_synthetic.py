"""The synthetic demo data: determinism, the three official layouts, atomic caching, scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptqbench.demo import drawing, writers
from ptqbench.demo.ade20k_priors import semantic_prior
from ptqbench.demo.ade20k_scenes import ADE_STYLE, region_scene
from ptqbench.demo.aerial_scenes import aerial_scene
from ptqbench.demo.coco_scenes import COCO_CATEGORIES, object_scene
from ptqbench.demo.install import MARKER_NAME, default_demo_root, ensure_demo_data
from ptqbench.demo.writers import DemoSizes
from ptqbench.errors import ConfigError, DataError
from ptqbench.tasks.dota_eval import DOTA_CLASSES

TINY = DemoSizes(coco_val=3, coco_train=2, dota_val=1, dota_train=1, ade_val=3, ade_train=2)
TINIER = DemoSizes(coco_val=1, coco_train=1, dota_val=1, dota_train=1, ade_val=1, ade_train=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_data(tmp_path_factory.mktemp("a") / "demo", TINY)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(demo: Path, tmp_path: Path) -> None:
    again = ensure_demo_data(tmp_path / "other", TINY)
    first, second = _files(demo), _files(again)
    assert len(first) == 1 + 2 + 5 + 4 + 3 * 5  # marker, COCO json, COCO jpg, DOTA, ADE
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_splits_use_different_seeds(demo: Path) -> None:
    val = sorted((demo / "coco" / "val2017").iterdir())[0].read_bytes()
    train = sorted((demo / "coco" / "train2017").iterdir())[0].read_bytes()
    assert val != train
    ade = demo / "ADEChallengeData2016" / "annotations"
    assert (ade / "validation" / "ADE_val_00000001.png").read_bytes() != \
        (ade / "training" / "ADE_train_00000001.png").read_bytes()


def test_coco_layout_loads_and_areas_match(demo: Path) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    known = {c[0]: c[1] for c in COCO_CATEGORIES}
    ids = {}
    for split, count in (("val2017", TINY.coco_val), ("train2017", TINY.coco_train)):
        coco = COCO(str(demo / "coco" / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == count
        ids[split] = set(coco.imgs)
        assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == known
        for image in coco.imgs.values():
            with Image.open(demo / "coco" / split / image["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (image["width"], image["height"])
            assert coco.getAnnIds(imgIds=image["id"])  # every image has objects
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["iscrowd"] == 0 and ann["category_id"] in known
            assert isinstance(ann["segmentation"], list)
            assert all(len(polygon) >= 6 for polygon in ann["segmentation"])
            mask = coco.annToMask(ann)
            assert int(mask.sum()) == ann["area"] > 0
            rle = mask_utils.encode(np.asfortranarray(mask))
            assert list(mask_utils.toBbox(rle)) == ann["bbox"]
    assert not ids["val2017"] & ids["train2017"]


def test_coco_polygons_decode_to_the_mask_exactly() -> None:
    from pycocotools import mask as mask_utils

    mask = np.zeros((30, 40), dtype=bool)
    mask[3:13, 5:25] = True        # a 10 x 20 rectangle ...
    mask[13:20, 5:9] = True        # ... with a 7 x 4 leg: an L of 228 pixels
    mask[25, 30] = True            # a single-pixel fragment
    annotation = writers._coco_annotation(mask)
    assert annotation["area"] == 200 + 28 + 1
    assert annotation["bbox"] == [5.0, 3.0, 26.0, 23.0]
    decoded = mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects(annotation["segmentation"], 30, 40))).astype(bool)
    assert np.array_equal(decoded, mask)


def test_dota_layout(demo: Path) -> None:
    for split in ("val", "train"):
        labels = sorted((demo / "DOTA" / split / "labelTxt").glob("*.txt"))
        images = sorted((demo / "DOTA" / split / "images").glob("*.png"))
        assert [p.stem for p in labels] == [p.stem for p in images] and len(labels) == 1
        with Image.open(images[0]) as im:
            width, height = im.size
            assert im.mode == "RGB" and 480 <= width <= 544 and 480 <= height <= 544
        lines = labels[0].read_text().splitlines()
        assert lines[0] == "imagesource:ptqbench-synthetic"
        assert lines[1].startswith("gsd:") and 0.0 < float(lines[1][4:]) < 1.0
        objects = [line.split() for line in lines[2:]]
        assert 20 <= len(objects) <= 40
        for tokens in objects:
            assert len(tokens) == 10
            corners = np.array([float(v) for v in tokens[:8]]).reshape(4, 2)
            assert tokens[8] in DOTA_CLASSES and tokens[9] in ("0", "1")
            assert (corners >= 0).all() and (corners[:, 0] < width).all()
            assert (corners[:, 1] < height).all()
    assert {p.stem for p in (demo / "DOTA" / "val" / "images").iterdir()}.isdisjoint(
        {p.stem for p in (demo / "DOTA" / "train" / "images").iterdir()})


def test_ade_layout_and_priors(demo: Path) -> None:
    ade = demo / "ADEChallengeData2016"
    for split, prefix, count in (("validation", "val", TINY.ade_val),
                                 ("training", "train", TINY.ade_train)):
        images = sorted((ade / "images" / split).glob("*.jpg"))
        assert [p.name for p in images] == [f"ADE_{prefix}_{i:08d}.jpg" for i in range(1, count + 1)]
        for image_path in images:
            label_path = ade / "annotations" / split / f"{image_path.stem}.png"
            prior_path = ade / "ptqbench_priors" / split / f"{image_path.stem}.png"
            with Image.open(image_path) as im, Image.open(label_path) as lab, \
                    Image.open(prior_path) as pri:
                assert im.mode == "RGB" and lab.mode == "L" and pri.mode == "L"
                assert im.size == lab.size == pri.size
                labels, prior = np.array(lab), np.array(pri)
            assert set(np.unique(labels)) <= set(ADE_STYLE) | {0}
            assert len(np.unique(labels)) >= 5
            assert set(np.unique(prior)) <= set(range(150)) | {255}
            reduced = labels.astype(np.int16) - 1
            reduced[labels == 0] = 255
            valid = reduced != 255
            agreement = (prior[valid] == reduced[valid]).mean()
            assert 0.4 < agreement < 1.0  # imperfect but plausible


def test_complete_folder_is_reused_and_other_sizes_regenerate(tmp_path: Path) -> None:
    root = ensure_demo_data(tmp_path / "demo", TINIER)
    (root / "sentinel").write_text("kept")
    assert ensure_demo_data(root, TINIER) == root
    assert (root / "sentinel").exists()
    ensure_demo_data(root, DemoSizes(coco_val=2, coco_train=1, dota_val=0, dota_train=0,
                                     ade_val=1, ade_train=0))
    assert not (root / "sentinel").exists()
    assert json.loads((root / MARKER_NAME).read_text())["sizes"]["coco_val"] == 2
    assert len(list((root / "coco" / "val2017").iterdir())) == 2
    assert list((root / "DOTA" / "val" / "images").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]


def test_leftover_temporary_folder_is_ignored_and_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".demo.tmp-crashed"
    (leftover / "coco").mkdir(parents=True)
    (leftover / MARKER_NAME).write_text("{}")
    root = ensure_demo_data(tmp_path / "demo", TINIER)
    assert not leftover.exists()
    assert (root / "coco" / "annotations" / "instances_val2017.json").is_file()


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers, "_write_ade", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_data(tmp_path / "demo", TINIER)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock"]


def test_foreign_folder_is_never_touched(tmp_path: Path) -> None:
    (tmp_path / "data" / "coco").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "mine.json").write_text("real data")
    with pytest.raises(DataError, match="not a ptqbench demo folder"):
        ensure_demo_data(tmp_path / "data", TINIER)
    assert (tmp_path / "data" / "coco" / "mine.json").read_text() == "real data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "data"]


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path))
    assert default_demo_root() == tmp_path / "demo-v1"
    monkeypatch.setenv("PTQBENCH_CACHE", "~/elsewhere")
    assert default_demo_root() == Path.home() / "elsewhere" / "demo-v1"
    monkeypatch.setenv("PTQBENCH_CACHE", "")
    assert default_demo_root() == Path.home() / ".cache" / "ptqbench" / "demo-v1"


def test_sizes_are_validated() -> None:
    with pytest.raises(ConfigError, match="coco_val"):
        DemoSizes(coco_val=-1)


def test_object_scene_masks_are_disjoint_visible_parts() -> None:
    image, masks, category_ids = object_scene(np.random.default_rng(3), 240, 320)
    assert image.shape == (240, 320, 3) and image.dtype == np.uint8
    assert masks.dtype == bool and masks.shape[1:] == (240, 320)
    assert 1 <= len(masks) == len(category_ids) <= 8
    assert set(category_ids) <= {c[0] for c in COCO_CATEGORIES}
    assert masks.sum(axis=0).max() == 1  # occluded pixels left the occluded masks
    assert all(m.sum() >= 60 and not drawing.has_hole(m) for m in masks)
    assert image.std() > 10  # textured, not flat


def test_aerial_scene_quads_enclose_their_masks() -> None:
    import cv2

    image, masks, names, quads = aerial_scene(np.random.default_rng(5), 512, 512)
    assert image.shape == (512, 512, 3) and quads.shape == (len(masks), 4, 2)
    assert 20 <= len(masks) == len(names) <= 40 and set(names) <= set(DOTA_CLASSES)
    assert masks.sum(axis=0).max() == 1
    for mask, quad in zip(masks, quads):
        ys, xs = np.nonzero(mask)
        inside = [cv2.pointPolygonTest(quad.astype(np.float32), (float(x), float(y)), True)
                  for x, y in zip(xs, ys)]
        assert min(inside) > -1.0  # every pixel centre within a pixel of the rotated box
        assert mask.sum() > 0.15 * cv2.contourArea(quad.astype(np.float32))


def test_region_scene_labels() -> None:
    image, labels = region_scene(np.random.default_rng(7), 256, 320)
    assert image.shape == (256, 320, 3) and labels.shape == (256, 320)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(ADE_STYLE) | {0}


def test_semantic_prior_by_hand() -> None:
    rng = np.random.default_rng(0)
    assert (semantic_prior(rng, np.zeros((40, 60), dtype=np.uint8)) == 255).all()
    sky = semantic_prior(rng, np.full((40, 60), 3, dtype=np.uint8))
    assert set(np.unique(sky)) <= {2, 5, 16}  # sky, or its confusions ceiling / mountain
    half = np.zeros((200, 300), dtype=np.uint8)
    half[:, 150:] = 1  # wall on the right, "other" on the left
    prior = semantic_prior(np.random.default_rng(1), half)
    assert (prior[:, :140] == 255).mean() > 0.9 and (prior[:, 160:] != 255).mean() > 0.9
    assert set(np.unique(prior)) <= {255, 0, 1, 5}  # other, wall, or wall's confusions
