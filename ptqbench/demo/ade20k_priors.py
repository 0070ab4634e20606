"""Demo semantic priors: imperfect semantic-segmenter outputs for the ADE20K demo scenes.

The ADE20K task's SSA mode reads such priors (`ptqbench_priors/`); on the demo they stand in
for a real segmenter's predictions, degraded the way a segmenter errs.
"""

from __future__ import annotations

import numpy as np

from ptqbench.demo import drawing as draw

# Plausible confusions of a semantic segmenter, in ADE ids (used for the demo priors).
_ADE_CONFUSIONS: dict[int, tuple[int, ...]] = {
    1: (2, 6), 2: (1, 26), 3: (6, 17), 4: (29, 7), 5: (10, 18), 6: (1, 3), 7: (12, 4),
    8: (24, 32), 9: (15, 23), 10: (5, 14), 11: (36, 15), 12: (7, 4), 13: (93,), 15: (9, 11),
    16: (34, 65), 17: (69, 2), 20: (31, 24), 21: (84, 103), 23: (101, 9), 24: (31, 8),
    29: (4, 132),
}


def semantic_prior(rng: np.random.Generator, label_map: np.ndarray) -> np.ndarray:
    """A plausible but imperfect semantic-segmenter output for an ADE label map.

    label_map: uint8 [H, W] ADE ids 0..150. Returns uint8 [H, W] in the reduced label space
    (0..149, 255 = no prediction): the reduced GT predicted at 1/4 resolution with a random
    phase (blocky boundaries, small objects lost or grown), shifted by up to 3 pixels, with
    some connected regions relabelled to a confusable class (20% of the small ones, 5% of
    those covering >= 5% of the image) and up to two spurious blobs.
    """
    import cv2

    height, width = label_map.shape
    factor = 4
    oy, ox = (int(v) for v in rng.integers(0, factor, 2))
    dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
    coarse = label_map[oy::factor, ox::factor]
    rows = np.clip((np.arange(height) - dy - oy + factor // 2) // factor, 0, coarse.shape[0] - 1)
    cols = np.clip((np.arange(width) - dx - ox + factor // 2) // factor, 0, coarse.shape[1] - 1)
    shifted = coarse[rows][:, cols]
    prior = shifted.copy()
    for ade_id in np.unique(shifted):
        if ade_id == 0:
            continue
        count, components = cv2.connectedComponents((shifted == ade_id).astype(np.uint8))
        for component in range(1, count):
            region = components == component
            if rng.random() < (0.2 if region.sum() < 0.05 * height * width else 0.05):
                choices = _ADE_CONFUSIONS.get(int(ade_id), (int(ade_id),))
                prior[region] = choices[int(rng.integers(len(choices)))]
    present = [int(v) for v in np.unique(shifted) if v != 0]
    for _ in range(int(rng.integers(0, 3))):
        if not present:
            break
        blob = draw.place([draw.blob(rng, rng.uniform(5.0, 15.0))], rng.uniform(0, width),
                          rng.uniform(0, height), 0.0)[0]
        prior[draw.fill(blob, height, width)] = present[int(rng.integers(len(present)))]
    reduced = prior.astype(np.int16) - 1
    reduced[prior == 0] = 255
    return reduced.astype(np.uint8)
