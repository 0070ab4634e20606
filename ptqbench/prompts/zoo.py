"""The detectors `ptqbench prompts coco` runs and their post-processing settings (no torch here).

Detectors are torchvision's COCO models, each named as torchvision names its builder. Their
outputs use torchvision's 91-id COCO label map, which is COCO's own `category_id` scheme, so a
label is written as the category id unchanged.

The default settings are the reference's Faster R-CNN test settings (SAQ-SAM / PTQ4SAM run
mmdetection's `faster_rcnn_r50_fpn_2x_coco.py`: `rcnn=dict(score_thr=0.05, nms=dict(iou_threshold=0.5),
max_per_img=100)` after an image scale of (1333, 800), keep ratio), applied to every detector of
the zoo so that detectors differ only in their weights and architecture.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace

from ptqbench.errors import ConfigError, UnknownNameError

DEFAULT_DETECTOR = "fasterrcnn_resnet50_fpn"
# name -> the builder's keyword names of (score threshold, NMS IoU, detections per image).
_RCNN_KEYS = ("box_score_thresh", "box_nms_thresh", "box_detections_per_img")
_DENSE_KEYS = ("score_thresh", "nms_thresh", "detections_per_img")
DETECTORS: dict[str, tuple[str, str, str]] = {
    "fasterrcnn_resnet50_fpn": _RCNN_KEYS,
    "fasterrcnn_resnet50_fpn_v2": _RCNN_KEYS,
    "retinanet_resnet50_fpn_v2": _DENSE_KEYS,
    "fcos_resnet50_fpn": _DENSE_KEYS,
}
RANDOM_WEIGHTS = "random"


def check_detector(name: str) -> str:
    """The detector's canonical (lower-case) name; UnknownNameError listing the zoo otherwise."""
    key = name.strip().lower()
    if key in DETECTORS:
        return key
    close = difflib.get_close_matches(key, list(DETECTORS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownNameError(f"unknown detector {name!r}.{hint} Valid detectors: {', '.join(sorted(DETECTORS))}")


@dataclass(frozen=True)
class DetectorSettings:
    """How the detector runs and what it keeps; every field is part of the cache key.

    score_threshold: boxes scoring at most this are dropped (torchvision keeps score > it);
    nms: per-class NMS IoU threshold; max_per_image: the best this many boxes per image are kept;
    min_size / max_size: torchvision's resize (shorter side to min_size, longer side at most
    max_size; mmdetection's (1333, 800) keep-ratio scale); batch_size: images per forward
    (batched images are padded to a common size, which changes features near the padded border,
    so it is part of the key).
    """

    score_threshold: float = 0.05
    nms: float = 0.5
    max_per_image: int = 100
    min_size: int = 800
    max_size: int = 1333
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"detector setting {name} must lie in [0, 1], got {value}")
        for name in ("max_per_image", "min_size", "max_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"detector setting {name} must be at least 1, got {getattr(self, name)}")
        if self.min_size > self.max_size:
            raise ConfigError(f"detector setting min_size ({self.min_size}) exceeds max_size ({self.max_size})")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def builder_kwargs(self, detector: str) -> dict[str, float | int]:
        """The keyword arguments of torchvision's builder that apply these settings."""
        score, nms, count = DETECTORS[detector]
        return {score: self.score_threshold, nms: self.nms, count: self.max_per_image,
                "min_size": self.min_size, "max_size": self.max_size}


def parse_detector_options(pairs: tuple[tuple[str, str], ...], base: DetectorSettings | None = None
                           ) -> DetectorSettings:
    """`base` (default: the defaults) with the (name, text value) pairs set; ConfigError naming an
    unknown name (and the valid ones) or a value that is not a number of the field's type."""
    settings = base or DetectorSettings()
    types = {field.name: field.type for field in fields(DetectorSettings)}
    values: dict[str, float | int] = {}
    for name, text in pairs:
        key = name.strip().replace("-", "_")
        if key not in types:
            raise ConfigError(f"unknown detector option {name!r}; valid options: {', '.join(types)}")
        try:
            values[key] = float(text) if types[key] == "float" else int(text)
        except ValueError:
            what = "a number" if types[key] == "float" else "an integer"
            raise ConfigError(f"detector option {name}={text!r}: expected {what}") from None
    return replace(settings, **values)
