"""SAM-1's calibration set (identical for every method) and one SAM forward on a calibration sample."""

from __future__ import annotations

import hashlib

import torch
from segment_anything.modeling import Sam
from torch import Tensor

from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.inference import BoxPredictor, decode_single_mask
from ptqbench.types import CalibrationItem


def build_calibration_set(model: Sam, items: list[CalibrationItem], device: torch.device | str) -> CalibrationSet:
    """Preprocess calibration items exactly as evaluation does and move them to `device`."""
    predictor = BoxPredictor(model, device)
    digest = hashlib.sha256()
    samples = []
    for item in items:
        image, _ = predictor.preprocess(item.image)
        boxes = torch.as_tensor(item.boxes, dtype=torch.float, device=predictor.device)
        boxes = predictor.transform.apply_boxes_torch(boxes, item.image.shape[:2])
        samples.append(CalibrationSample(image=image, boxes=boxes))
        digest.update(item.image.tobytes())
        digest.update(item.boxes.astype("float64").tobytes())
    return CalibrationSet(samples=tuple(samples), fingerprint=digest.hexdigest()[:16])


def sam_forward(model: Sam, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt encoder + image encoder + single-mask decoder.

    The prompt encoder runs first (it does not depend on the image), so hooks that read the prompt
    embeddings fire before the image encoder: a capture that then stops the forward inside the
    encoder never runs the later blocks (PAR's layer skipping relies on it).
    image: [1, 3, S, S] model input; boxes: [N, 4] input coordinates.
    Returns low-res mask logits [N, 1, S/4, S/4] and predicted IoU [N, 1].
    """
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return decode_single_mask(model, model.image_encoder(image), sparse, dense)


def decode_prompts(model: Sam, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """`sam_forward` from the image encoder's output: prompt encoder + single-mask decoder.
    embedding: [1, 256, S/16, S/16]; boxes: [N, 4] input coordinates. Returns as `sam_forward`."""
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return decode_single_mask(model, embedding, sparse, dense)


def forward_with_graph(model: Sam, sample: CalibrationSample) -> Tensor:
    """Mask logits [N, 1, S/4, S/4] of `sam_forward` with every intermediate tensor in the autograd
    graph: the image and the sparse prompt tokens require grad, so gradients reach any encoder or
    decoder tensor (BRECQ's Fisher weights). Bit-identical to `sam_forward`'s logits."""
    embedding = model.image_encoder(sample.image.detach().requires_grad_(True))
    sparse, dense = model.prompt_encoder(points=None, boxes=sample.boxes, masks=None)
    logits, _ = decode_single_mask(model, embedding, sparse.detach().requires_grad_(True), dense)
    return logits


def sample_forward(model: Sam, sample: CalibrationSample) -> tuple[Tensor, Tensor]:
    """`sam_forward` on one calibration sample: the forward the reconstruction engine runs
    (`ptqbench.recon.engine.ReconstructionSettings.forward`) to reach a unit's hook points."""
    return sam_forward(model, sample.image, sample.boxes)
