"""The quantizable twin of SAM: sites, bit-exact FP path, quantization effect, sealing."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ptqbench.errors import ConfigError
from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation, select_sites, weight_layers


def _reduced_vit_b() -> Sam:
    """ViT-B's widths (768 dim, 12 heads, 14x14 windows, rel-pos) at depth 2 and a 448 input (28x28 tokens)."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=448, patch_size=16, embed_dim=768, depth=2, num_heads=12, window_size=14,
                              global_attn_indexes=(1,), out_chans=256, use_rel_pos=True, qkv_bias=True, mlp_ratio=4,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model = Sam(encoder, PromptEncoder(embed_dim=256, image_embedding_size=(28, 28), input_image_size=(448, 448),
                                       mask_in_chans=16),
                MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                                   mlp_dim=2048, num_heads=8),
                            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
                pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0, 0.1)
    return model.eval()


def _inputs(model: Sam, n_boxes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.image_encoder.img_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=generator)
    xy = torch.rand(n_boxes, 2, generator=generator) * size * 0.6
    wh = torch.rand(n_boxes, 2, generator=generator) * size * 0.4 + 4
    return image, torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("builder", ["sam_tiny", "reduced_vit_b"])
def test_all_sites_off_is_bit_exact(builder, sam_tiny):
    model = sam_tiny if builder == "sam_tiny" else _reduced_vit_b()
    qmodel = quantize_sam(model, 4, 4)
    image, boxes = _inputs(model)
    with torch.no_grad():
        fp_masks, fp_iou = sam_forward(model, image, boxes)
        q_masks, q_iou = sam_forward(qmodel, image, boxes)
    assert torch.equal(fp_masks, q_masks)
    assert torch.equal(fp_iou, q_iou)


def test_site_inventory_matches_the_spec(sam_tiny):
    sites = quantizer_sites(quantize_sam(sam_tiny, 4, 4))
    depth = len(sam_tiny.image_encoder.blocks)
    # per encoder block: qkv/proj/lin1/lin2 input+weight (8) + q, k, v, softmax (4); neck: 2 convs x 2
    # decoder: 7 attentions x (4 projections x 2 + q, k, v, softmax) + 2 MLPs x 4
    assert len(sites) == depth * 12 + 4 + 7 * 12 + 2 * 4
    for name in ("image_encoder.blocks.3.attn.k", "image_encoder.blocks.0.attn.softmax",
                 "image_encoder.blocks.5.mlp.lin2.input", "image_encoder.neck.2.weight",
                 "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.input",
                 "mask_decoder.transformer.final_attn_token_to_image.softmax",
                 "mask_decoder.transformer.layers.1.mlp.lin1.weight"):
        assert name in sites
    assert not any(name.startswith(("mask_decoder.output", "mask_decoder.iou", "prompt_encoder"))
                   for name in sites)
    weights = [q for q in sites.values() if q.is_weight]
    assert all(q.channel_axis == 0 for q in weights)
    assert all(q.channel_axis is None for q in sites.values() if not q.is_weight)


def test_glob_selection_and_typos(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 4, 4)
    keys = select_sites(qmodel, "mask_decoder.*.k")
    assert len(keys) == 7 and all(name.endswith(".k") for name in keys)
    with pytest.raises(ConfigError, match="matches no site"):
        select_sites(qmodel, "image_encoder.blocks.*.atn.q")


def test_quantizing_changes_outputs_and_bits_matter(sam_tiny):
    image, boxes = _inputs(sam_tiny)
    with torch.no_grad():
        fp_masks, _ = sam_forward(sam_tiny, image, boxes)
    errors = {}
    for bits in (4, 8):
        qmodel = quantize_sam(sam_tiny, bits, bits)
        for quantizer in quantizer_sites(qmodel).values():
            if quantizer.is_weight:
                continue
            quantizer.set_range(torch.tensor(-8.0), torch.tensor(8.0))
        for layer in weight_layers(qmodel).values():
            w = layer.weight.detach().flatten(1)
            layer.weight_quantizer.set_range(w.min(1).values, w.max(1).values)
        with torch.no_grad():
            q_masks, _ = sam_forward(qmodel, image, boxes)
        errors[bits] = (q_masks - fp_masks).pow(2).mean().item()
    assert errors[8] > 0
    assert errors[4] > 3 * errors[8]


def test_seal_sets_every_quantizer_to_always_quantize_and_freezes_weights(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 4, 4)
    layer = next(iter(weight_layers(qmodel).values()))
    w = layer.weight.detach().flatten(1)
    layer.weight_quantizer.set_range(w.min(1).values, w.max(1).values)
    for quantizer in quantizer_sites(qmodel).values():
        quantizer.quantize_prob = 0.5
    layer.input_quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    layer.input_quantizer.make_scale_learnable()
    seal_for_evaluation(qmodel, fp_sites=("*",))  # the other sites stay off: allowed here, not the point
    assert all(q.quantize_prob == 1.0 for q in quantizer_sites(qmodel).values())
    assert not any(p.requires_grad for p in qmodel.parameters())
    assert not isinstance(layer.input_quantizer.scale, nn.Parameter)
    assert torch.equal(layer.frozen_weight, layer.weight_quantizer(layer.weight))
    assert not qmodel.training


def test_seal_refuses_a_site_still_observing(sam_tiny):
    from ptqbench.quant.observers import make_observer

    qmodel = quantize_sam(sam_tiny, 4, 4)
    next(iter(quantizer_sites(qmodel).values())).observe_with(make_observer("minmax"))
    with pytest.raises(RuntimeError, match="still observing"):
        seal_for_evaluation(qmodel)


def test_frozen_weight_is_used_instead_of_requantizing(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 4, 4)
    layer = weight_layers(qmodel)["image_encoder.blocks.0.attn.qkv"]
    w = layer.weight.detach().flatten(1)
    layer.weight_quantizer.set_range(w.min(1).values, w.max(1).values)
    layer.freeze_weight()
    calls = []
    layer.weight_quantizer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 4, 4, layer.in_features)
    layer(x)
    layer(x)
    assert calls == []


def test_quantize_prob_mixes_quantized_and_fp_elements():
    quantizer = FakeQuantizer(2, is_weight=False)
    quantizer.set_range(torch.tensor(0.0), torch.tensor(1.0))
    quantizer.quantize_prob = 0.5
    x = torch.rand(20000) * 0.9 + 0.05
    x = x[(x * 3 - torch.round(x * 3)).abs() > 0.05]  # values that quantization moves
    y = quantizer(x)
    quantized_fraction = (y != x).float().mean().item()
    assert 0.45 < quantized_fraction < 0.55
    quantizer.quantize_prob = 1.0
    assert (quantizer(x) != x).all()
    assert np.isclose(quantizer(torch.tensor([0.5])).item(), 2 / 3)
