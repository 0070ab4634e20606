"""The one image reader of the tasks: every task decodes its images with `read_image`.

Decoding is OpenCV's, as the reference codes do (SAQ-SAM / PTQ4SAM through mmdetection,
DOTA_devkit, mmsegmentation and SSA all read with `cv2.imread`): `cv2.imread(path,
IMREAD_COLOR)`, then BGR -> RGB. So an EXIF orientation tag is applied (JPEG, PNG, WebP), grey
images get three equal channels, an alpha channel is dropped and 16-bit samples are scaled to
8 bits.

Checked on every image of the real data slices (32 + 6 COCO JPEGs, 2 DOTA PNGs, 3 ADE20K JPEGs)
and of the demo data: OpenCV 5.1.0 and Pillow 13.0.0 (`Image.convert("RGB")`, which ADE20K
used before) give identical pixels. They need not agree in general: JPEG decoding is only
specified to a tolerance, so another libjpeg build or IDCT / chroma upsampling choice can
change some pixels slightly; Pillow ignores the EXIF orientation and clips 16-bit samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqbench.errors import DataError

# EXIF orientations that turn the stored image by 90 degrees (its sides swap when applied).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError(f"image {path} cannot be read: {reason} (truncated or not an image)")


def read_image(path: Path, expected_hw: tuple[int, int] | None = None, *,
               size_from: str = "its header") -> np.ndarray:
    """The image file `path` as uint8 RGB [H, W, 3] (see the module docstring).

    expected_hw: the (H, W) it must have, e.g. `image_size(path)` or an annotation's; size_from
    says where that size comes from, for the error. DataError naming the file when it is
    missing, cannot be decoded, or has another size.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise _unreadable(path, "OpenCV cannot decode it")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if expected_hw is not None and rgb.shape[:2] != tuple(expected_hw):
        raise DataError(f"image {path} is {rgb.shape[1]}x{rgb.shape[0]} but {size_from} says "
                        f"{expected_hw[1]}x{expected_hw[0]}")
    return rgb


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of `read_image(path)`, from the file's header: Pillow opens it without decoding
    pixels; sides swapped when an EXIF orientation turns it by 90 degrees, as OpenCV does.
    DataError naming the file when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION)
    except (OSError, UnidentifiedImageError) as error:
        raise _unreadable(path, str(error)) from error
    return (width, height) if orientation in TRANSPOSING_ORIENTATIONS else (height, width)
