"""The named groups of SAM modules that methods work on, so that methods never walk SAM's module
tree themselves: the mask decoder's attentions (PCC, BIG), its token-to-image attentions (BIG's
sign fold), every quantizable attention twin (AGQ's softmax sites) and the image encoder's stages
(PAR's units)."""

from __future__ import annotations

from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import nn

from ptqbench.models.sam1.quantized import QuantDecoderAttention, QuantEncoderAttention

DECODER = "mask_decoder.transformer"
"""The mask decoder's two-way transformer, whose attentions PCC and BIG work on."""
TOKEN_TO_IMAGE = ("cross_attn_token_to_image", "final_attn_token_to_image")


def decoder_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention of the mask decoder's transformer (7 in SAM), by module path, in forward order:
    the plain attentions of a plain SAM, the quantizable twins of a twin."""
    return {f"{DECODER}.{name}": module for name, module in model.get_submodule(DECODER).named_modules()
            if isinstance(module, DecoderAttention)}


def token_to_image_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder's token-to-image cross-attentions (every layer's and the final one), by module path."""
    return {f"{DECODER}.{name}": module for name, module in model.get_submodule(DECODER).named_modules()
            if name.rsplit(".", 1)[-1] in TOKEN_TO_IMAGE}


def softmax_attentions(qmodel: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable attention twin (encoder and decoder), by module path."""
    return {path: module for path, module in qmodel.named_modules()
            if isinstance(module, (QuantEncoderAttention, QuantDecoderAttention))}


def encoder_stages(model: nn.Module) -> list[tuple[int, ...]]:
    """Block indices of each encoder stage: the blocks up to and including each global-attention
    block (window size 0); trailing windowed blocks, if any, form a last stage."""
    stages: list[tuple[int, ...]] = []
    current: list[int] = []
    for index, block in enumerate(model.image_encoder.blocks):
        current.append(index)
        if block.window_size == 0:
            stages.append(tuple(current))
            current = []
    if current:
        stages.append(tuple(current))
    return stages
