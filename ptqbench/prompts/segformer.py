"""SegFormer ADE20K class maps as SSA (Semantic Segment Anything) computes them.

Checkpoints come from Hugging Face `transformers` (`SegformerForSemanticSegmentation.from_pretrained`,
the hub cache, `$HF_HOME`): `nvidia/segformer-b{0..4}-finetuned-ade-512-512` and, for b5, SSA's
own choice `nvidia/segformer-b5-finetuned-ade-640-640` (SSA's `scripts/main_ssa.py`; its README
also reports b0 and b2 at 512). Offline with no cached copy: one CheckpointError naming the
checkpoint and the cache folder.

SSA's preprocessing (`scripts/segformer.py` with transformers 4.27's `SegformerFeatureExtractor`),
written out here so that it does not change with the installed transformers (whose default image
processor is torchvision-based since version 5):

1. the image exactly as SSA's `mmcv.imread` gives it: **BGR** channel order, which SSA passes on
   unconverted to a processor that expects RGB (`bgr=True`, the default: SSA's quirk, kept so
   the priors are SSA's; `bgr=False` feeds RGB);
2. PIL bilinear resize to S x S, ignoring the aspect ratio (S = the checkpoint's training crop:
   512, 640 for b5-640);
3. x / 255, then ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

SSA's upsampling: the logits [150, S/4, S/4] are resized to the image's H x W with
`F.interpolate(mode="bilinear", align_corners=True)`, then argmax over the classes; the class
map holds ADE20K training ids 0..149 (the checkpoints' labels; 0 = wall), which is what the
ADE20K task's `semantic_prior` reads (255 = no class never occurs in an argmax).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ptqbench.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

NUM_CLASSES = 150
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"
RANDOM_LABEL = "random-seed0"
# variant -> (hidden sizes, depths, decoder hidden size): the MiT-B0..B5 encoders of the paper.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


def check_variant(name: str) -> str:
    """'b0'..'b5' (also given as 'B5' or 'segformer-b5'); ConfigError otherwise."""
    key = name.strip().lower().removeprefix("segformer-").removeprefix("mit-")
    if key not in ARCHITECTURES:
        raise ConfigError(f"unknown SegFormer variant {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return key


def checkpoint_id(variant: str) -> str:
    """The Hugging Face id of the variant's ADE20K checkpoint (b5: SSA's 640 x 640 one)."""
    crop = 640 if variant == "b5" else 512
    return f"nvidia/segformer-{variant}-finetuned-ade-{crop}-{crop}"


def input_size(variant: str) -> int:
    """The square input side S of the variant's checkpoint (its training crop)."""
    return 640 if variant == "b5" else 512


@dataclass(frozen=True)
class SegformerWeights:
    """source: "hf:<id>", "dir:<path>" or "random-seed0"; sha256: of the loaded state dict
    (tensor names, dtypes, shapes and bytes), "random-seed0" for random weights."""

    source: str
    sha256: str


def state_sha256(model: nn.Module) -> str:
    """The sha256 of a model's state dict: every tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).numpy().tobytes())
    return digest.hexdigest()


def random_config(variant: str) -> Any:
    """A SegformerConfig of the variant's architecture with ADE20K's 150 labels."""
    from transformers import SegformerConfig

    hidden, depths, decoder = ARCHITECTURES[variant]
    return SegformerConfig(hidden_sizes=list(hidden), depths=list(depths), decoder_hidden_size=decoder,
                           num_labels=NUM_CLASSES)


def _from_hub(source: str) -> nn.Module:
    from huggingface_hub.constants import HF_HUB_CACHE
    from transformers import SegformerForSemanticSegmentation

    try:
        return SegformerForSemanticSegmentation.from_pretrained(source)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        folder = Path(HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
        raise CheckpointError(f"SegFormer checkpoint {source} is not in the Hugging Face cache and could not be "
                              f"downloaded ({reason}): put it in {folder} (e.g. `hf download {source}` where there "
                              "is network, then copy that folder; $HF_HOME moves the cache)") from None


def load_segformer(variant: str, weights: str | None = None, *, config: Any = None
                   ) -> tuple[nn.Module, SegformerWeights]:
    """The SegFormer of `variant` in eval mode on the CPU, and where its weights come from.

    weights: None or "default" (the variant's hub checkpoint), "random" (seeded random
    initialisation of `config`, default `random_config(variant)`; for tests and timing) or a
    local folder saved by `save_pretrained`.
    """
    import torch
    from transformers import SegformerForSemanticSegmentation

    variant = check_variant(variant)
    if weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = SegformerForSemanticSegmentation(config if config is not None else random_config(variant))
        return model.eval(), SegformerWeights(RANDOM_LABEL, RANDOM_LABEL)
    if weights in (None, "default"):
        source = checkpoint_id(variant)
        model, label = _from_hub(source), f"hf:{source}"
    else:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"SegFormer weights folder {folder} does not exist (--weights takes a "
                              "save_pretrained folder, 'default' or 'random')")
        model, label = _from_hub(str(folder)), f"dir:{folder}"
    if model.config.num_labels != NUM_CLASSES:
        raise CheckpointError(f"SegFormer {label} has {model.config.num_labels} labels, not ADE20K's {NUM_CLASSES}")
    return model.eval(), SegformerWeights(label, state_sha256(model))


def preprocess(image: np.ndarray, size: int, *, bgr: bool = True) -> np.ndarray:
    """SSA's SegFormer input of one image: uint8 RGB [H, W, 3] -> float32 [3, size, size]
    (channels reversed to BGR first when `bgr`; see the module docstring)."""
    from PIL import Image

    pixels = np.ascontiguousarray(image[..., ::-1] if bgr else image)
    resized = np.asarray(Image.fromarray(pixels).resize((size, size), resample=Image.BILINEAR), dtype=np.float64)
    normalised = (resized / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return normalised.transpose(2, 0, 1).astype(np.float32)


def class_maps(model: nn.Module, images: Sequence[np.ndarray], size: int, device: torch.device, *,
               bgr: bool = True) -> list[np.ndarray]:
    """The class maps of a batch of images: uint8 [H, W] training ids 0..149 per uint8 RGB
    [H, W, 3] image (SSA's upsampling of the [B, 150, size/4, size/4] logits, then argmax)."""
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.stack([preprocess(image, size, bgr=bgr) for image in images])).to(device)
    with torch.inference_mode():
        logits = model(pixel_values=batch).logits
        maps = []
        for index, image in enumerate(images):
            upsampled = F.interpolate(logits[index:index + 1], size=image.shape[:2], mode="bilinear",
                                      align_corners=True)
            maps.append(upsampled.argmax(dim=1)[0].to(torch.uint8).cpu().numpy())
    return maps
