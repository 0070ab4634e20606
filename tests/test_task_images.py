"""The tasks' one image reader (`ptqbench.tasks.images`): the pixels each task read before it, on
real and demo images; the header size; one DataError line for a bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptqbench.errors import DataError
from ptqbench.tasks.images import image_size, read_image

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def opencv_rgb(path: Path) -> np.ndarray:
    """What COCO (`read_coco_image`) and DOTA (`read_rgb`) read: OpenCV, then BGR -> RGB."""
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def pillow_rgb(path: Path) -> np.ndarray:
    """What ADE20K (`read_rgb_image`) read: Pillow, converted to RGB."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def task_images(root: Path) -> list[tuple[Path, object]]:
    """(image file, the task's former reader) for every evaluation and calibration image below root."""
    found = []
    for pattern, reader in (("coco/*2017/*.jpg", opencv_rgb), ("DOTA/*/images/*.png", opencv_rgb),
                            ("ADEChallengeData2016/images/*/*.jpg", pillow_rgb)):
        found += [(path, reader) for path in sorted(root.glob(pattern))]
    return found


def assert_same_pixels(images: list[tuple[Path, object]]) -> None:
    for path, former in images:
        image = read_image(path)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous
        np.testing.assert_array_equal(image, former(path), err_msg=str(path))
        assert image_size(path) == image.shape[:2]


def test_real_images_read_as_each_task_read_them():
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    images = task_images(REALDATA)
    assert len(images) == 43  # 38 COCO, 2 DOTA, 3 ADE20K
    assert_same_pixels(images)


def test_demo_images_read_as_each_task_read_them(small_demo):
    images = task_images(small_demo)
    kinds = {path.suffix for path, _ in images}
    assert len(images) >= 10 and kinds == {".jpg", ".png"}
    assert_same_pixels(images)


def test_grey_and_palette_files_get_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    for name in ("grey.jpg", "grey.png", "palette.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (20, 30, 3)
        np.testing.assert_array_equal(image, pillow_rgb(tmp_path / name))
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png")[..., 1], grey)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_and_the_header_size_follows(tmp_path, suffix):
    """A 60 x 40 image tagged EXIF orientation 6 (turned by 90 degrees) reads as 40 x 60; its
    header size says so too, and a size that disagrees is one DataError line."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
        path, exif=exif.tobytes())
    image = read_image(path, image_size(path))
    assert image.shape == (60, 40, 3) and image_size(path) == (60, 40)
    np.testing.assert_array_equal(image, opencv_rgb(path))
    with pytest.raises(DataError, match=rf"rotated\{suffix} is 40x60 but labels.json says 60x40"):
        read_image(path, (40, 60), size_from="labels.json")


def test_bad_files_are_one_data_error_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    cases = [(read_image, "missing.jpg", r"missing\.jpg does not exist"),
             (image_size, "missing.jpg", r"missing\.jpg does not exist"),
             (read_image, "broken.png", r"broken\.png cannot be read: OpenCV cannot decode it"),
             (image_size, "broken.png", r"broken\.png cannot be read"),
             (read_image, "truncated.png", r"truncated\.png cannot be read")]
    for reader, name, message in cases:
        with pytest.raises(DataError, match=message) as error:
            reader(tmp_path / name)
        assert "\n" not in str(error.value)
