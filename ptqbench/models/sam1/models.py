"""SAM-1's models: `sam_vit_b`, `sam_vit_l`, `sam_vit_h` (segment_anything's builders, Meta's
official weights) and `sam_tiny` (the same architecture scaled down for CPU: input 256, encoder
dim 192, depth 6; its trained weights ship with the package), registered with their adapter
(`ptqbench.models.sam1.adapter.ADAPTER`) and default preset (`fast` for sam_tiny, `paper` otherwise).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ptqbench.models.sam1.adapter import ADAPTER
from ptqbench.models.spec import MODELS, ModelSpec

OFFICIAL_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_TINY_PACKAGED = Path(__file__).resolve().parents[2] / "data" / "sam_tiny.pt"
SAM_TINY_SHA256: str | None = "f9be84099403a92581b8fe80e2741423146de42a4418fb5fcc039f7caacfc1ce"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam_official(kind: str) -> Sam:
    """segment_anything's builder `kind` ("vit_b", "vit_l", "vit_h") without weights, eval mode.

    The random init draws from a forked RNG so building never moves the global torch RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = sam_model_registry[kind](checkpoint=None)
    return sam.eval()


def build_sam_tiny(seed: int = 0) -> Sam:
    """SAM scaled down for CPU: input 256, image embedding [256, 16, 16], random init from `seed`.

    Encoder: ViT with patch 16, dim 192, depth 6, 3 heads, window 8, global attention at
    blocks 2 and 5, neck to 256 channels. Prompt encoder and mask decoder are SAM's exactly
    (dim 256, two-way transformer of depth 2, 8 heads, MLP 2048). The global RNG is untouched.
    """
    img_size, patch_size, prompt_dim = 256, 16, 256
    embedding_side = img_size // patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=patch_size,
                embed_dim=192,
                depth=6,
                num_heads=3,
                mlp_ratio=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                use_rel_pos=True,
                window_size=8,
                global_attn_indexes=(2, 5),
                out_chans=prompt_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(embedding_side, embedding_side),
                input_image_size=(img_size, img_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
                transformer_dim=prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=list(SAM_PIXEL_MEAN),
            pixel_std=list(SAM_PIXEL_STD),
        )
    return sam.eval()


def _official_spec(name: str, kind: str, file_name: str, sha256: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=partial(build_sam_official, kind),
        input_size=1024,
        file_name=file_name,
        url=OFFICIAL_URL_BASE + file_name,
        sha256=sha256,
        md5_prefix=file_name.rsplit("_", 1)[1].split(".")[0],
        adapter=ADAPTER,
    )


@MODELS.register("sam_vit_b", aliases=("vit_b",))
def sam_vit_b_spec() -> ModelSpec:
    return _official_spec(
        "sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    )


@MODELS.register("sam_vit_l", aliases=("vit_l",))
def sam_vit_l_spec() -> ModelSpec:
    return _official_spec(
        "sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    )


@MODELS.register("sam_vit_h", aliases=("vit_h",))
def sam_vit_h_spec() -> ModelSpec:
    return _official_spec(
        "sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    )


@MODELS.register("sam_tiny", aliases=("tiny",))
def sam_tiny_spec() -> ModelSpec:
    return ModelSpec(
        name="sam_tiny",
        build=build_sam_tiny,
        input_size=256,
        sha256=SAM_TINY_SHA256,
        packaged=SAM_TINY_PACKAGED,
        adapter=ADAPTER,
        default_preset="fast",
    )
