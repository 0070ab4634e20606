"""DOTA Task-1 mAP re-scored on resampled image multisets with the exact devkit rule.

The devkit matches each class's detections greedily in its ranking (`np.argsort(-confidence)`
over the class file), but a detection only ever competes for GT of its own image, so its outcome
(TP, FP, or neither when it hits a difficult GT) does not change when images are dropped or
repeated. `DotaImageStats` keeps, per class, the detections in the devkit's order (its own tie
order, taken from `dota_eval.class_matches`) with their image and outcome, and the non-difficult
GT count per (image, class).

`rescore(counts)` is the devkit on the multiset (image i counted `counts[b, i]` times): npos =
sum of counts x non-difficult GT, the ranked list repeats each detection `counts` times in place
(`ranked_precision`: the identity resample is the devkit's list itself, so its numbers come out
bit for bit), prec = tp / max(tp + fp, eps), the VOC07 11-point AP summed in the devkit's order
(`ap = ap + p / 11.0`; 0 when npos is 0), mAP = the class APs summed in class order / 15.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptqbench.tasks.dota_eval import (
    DOTA_CLASSES,
    METRIC_KEYS,
    ClassMatches,
    DotaLabels,
    Task1Detections,
    class_matches,
    empty_detections,
    matches_ap,
    task1_metrics,
)
from ptqbench.tasks.ranked_precision import VOC_RULE, image_weights, min_count_reaching, ranked_precision

VOC07_THRESHOLDS = np.arange(0.0, 1.1, 0.1)  # exactly voc07_ap's
TP, FP, NEITHER = 1, 0, 2  # det_outcome codes


@dataclass(frozen=True)
class DotaImageStats:
    """What `rescore` needs of one DOTA cell (see the module docstring).

    image_names: str [I] evaluated images in evaluation order; det_offsets: int64 [16]: class c's
    detections (DOTA_CLASSES order) are rows det_offsets[c]:det_offsets[c+1], in the devkit's
    ranking; det_image: int32 [N] image index; det_outcome: uint8 [N] TP / FP / NEITHER;
    npos: int32 [I, 15] non-difficult GT per image and class.
    """

    image_names: np.ndarray
    det_offsets: np.ndarray
    det_image: np.ndarray
    det_outcome: np.ndarray
    npos: np.ndarray

    @property
    def image_keys(self) -> np.ndarray:
        return self.image_names

    @classmethod
    def from_matches(cls, labels: Mapping[str, DotaLabels], matches: Mapping[str, ClassMatches]) -> DotaImageStats:
        """From {image: DotaLabels} of the evaluated images and each class's `class_matches`."""
        names = list(labels)
        position = {name: index for index, name in enumerate(names)}
        npos = np.zeros((len(names), len(DOTA_CLASSES)), dtype=np.int32)
        for i, objects in enumerate(labels.values()):
            for name, difficult in zip(objects.names, objects.difficult):
                npos[i, DOTA_CLASSES.index(name)] += int(not difficult)
        images, outcomes, offsets = [], [], [0]
        for name in DOTA_CLASSES:
            found = matches[name]
            images.append(np.array([position[image] for image in found.image_ids], dtype=np.int32))
            outcomes.append(np.where(found.tp > 0, TP, np.where(found.fp > 0, FP, NEITHER)).astype(np.uint8))
            offsets.append(offsets[-1] + len(found.image_ids))
        return cls(image_names=np.array(names, dtype=str), det_offsets=np.array(offsets, dtype=np.int64),
                   det_image=np.concatenate(images), det_outcome=np.concatenate(outcomes), npos=npos)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A plain dict of arrays for storage; `from_arrays` inverts it."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> DotaImageStats:
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__})

    def rescore(self, counts: np.ndarray, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{metric: float64 [B]} in percent (keys METRIC_KEYS by default) for counts int64 [B, I]."""
        aps = {name: self._class_ap(counts, c) for c, name in enumerate(DOTA_CLASSES)}
        result = task1_metrics(aps)
        return {key: result[key] for key in (METRIC_KEYS if metrics is None else metrics)}

    def _class_ap(self, counts: np.ndarray, c: int) -> np.ndarray:
        """The devkit's AP (a fraction) of class c per resample: float64 [B]."""
        rows = slice(self.det_offsets[c], self.det_offsets[c + 1])
        npos = counts @ self.npos[:, c].astype(np.int64)
        ap = np.zeros(len(counts))
        if rows.stop == rows.start:
            return ap
        outcome = self.det_outcome[rows]
        weights, cumulative = image_weights(counts, self.det_image[rows])
        needed = min_count_reaching(VOC07_THRESHOLDS, npos)
        precision, _ = ranked_precision(weights, cumulative, outcome == TP, outcome == NEITHER, needed, VOC_RULE)
        for r in range(len(VOC07_THRESHOLDS)):
            ap = ap + precision[:, r] / 11.0
        ap[npos == 0] = 0.0
        return ap


def evaluate_task1_with_statistics(labels: Mapping[str, DotaLabels], detections: Mapping[str, Task1Detections]
                                   ) -> tuple[dict[str, float], DotaImageStats]:
    """`dota_eval.evaluate_task1` and the cell's `DotaImageStats` from one matching."""
    matches = {name: class_matches(labels, detections.get(name, empty_detections()), name) for name in DOTA_CLASSES}
    metrics = task1_metrics({name: matches_ap(found) for name, found in matches.items()})
    return metrics, DotaImageStats.from_matches(labels, matches)
