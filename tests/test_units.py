"""SAM's reconstruction units: counts, coverage of every site, and exact sub-block forwards."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ptqbench.methods.unit_cache import capture
from ptqbench.quant.sites import quantizer_sites
from ptqbench.quant.unit import UnitConfig
from ptqbench.sam.calibration import sam_forward
from ptqbench.sam.models import build_sam_tiny
from ptqbench.sam.quantized import quantize_sam
from ptqbench.sam.units import (
    decoder_image_to_token,
    decoder_mlp,
    decoder_self_attention,
    decoder_token_to_image,
    encoder_attention,
    encoder_mlp,
    final_token_to_image,
    flatten_tokens,
    sam_units,
)

CONFIG = UnitConfig(iterations=1)


def narrow_sam(depth: int, global_blocks: tuple[int, ...]) -> Sam:
    """A SAM with the block structure of a real size but tiny widths (unit counting only)."""
    return Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=16, depth=depth, num_heads=1,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=2, global_attn_indexes=global_blocks, out_chans=16),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=16, mlp_dim=32, num_heads=2), transformer_dim=16, iou_head_hidden_dim=16),
    )


@pytest.mark.parametrize("depth, global_blocks, expected", [
    (12, (2, 5, 8, 11), 34), (24, (5, 11, 17, 23), 58), (32, (7, 15, 23, 31), 74)])
def test_unit_counts_of_sam_b_l_h(depth: int, global_blocks: tuple[int, ...], expected: int) -> None:
    units = sam_units(narrow_sam(depth, global_blocks), CONFIG)
    assert len(units) == expected
    assert len({unit.name for unit in units}) == expected
    assert units[0].name == "image_encoder.blocks.0.attn"
    assert units[2 * depth].name == "image_encoder.neck"
    assert units[-1].name == "mask_decoder.transformer.final_attn_token_to_image"


def test_every_site_belongs_to_exactly_one_unit() -> None:
    qmodel = quantize_sam(narrow_sam(3, (2,)), 4, 4)
    owners: dict[str, list[str]] = {name: [] for name in quantizer_sites(qmodel)}
    for unit in sam_units(qmodel, CONFIG):
        for path in unit.trained:
            for name in quantizer_sites(qmodel.get_submodule(path)):
                owners[f"{path}.{name}"].append(unit.name)
    assert all(len(units) == 1 for units in owners.values()), owners


def _set_all_sites(qmodel: Sam) -> None:
    """Deterministic quantize-mode ranges for every site (weights per channel from min/max)."""
    for quantizer in quantizer_sites(qmodel).values():
        if quantizer.is_weight:
            continue
        quantizer.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    for module in qmodel.modules():
        if hasattr(module, "weight_quantizer"):
            w = module.weight.detach().flatten(1)
            module.weight_quantizer.set_range(w.min(1).values, w.max(1).values)


@pytest.mark.parametrize("quantized", [False, True])
def test_chained_sub_blocks_reproduce_block_layer_and_transformer_exactly(quantized: bool) -> None:
    model = build_sam_tiny()
    if quantized:
        model = quantize_sam(model, 4, 4)
        _set_all_sites(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 192, generator=generator)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            assert torch.equal(encoder_mlp(block, encoder_attention(block, x)), block(x))
        transformer = model.mask_decoder.transformer
        image = torch.randn(3, 256, 16, 16, generator=generator)
        image_pe = torch.randn(3, 256, 16, 16, generator=generator)
        tokens = torch.randn(3, 7, 256, generator=generator)
        expected_queries, expected_keys = transformer(image, image_pe, tokens)
        queries, keys, key_pe = tokens, flatten_tokens(image), flatten_tokens(image_pe)
        for layer in transformer.layers:
            layer_out = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
            queries = decoder_self_attention(layer, queries, tokens)
            queries = decoder_token_to_image(layer, queries, keys, tokens, key_pe)
            queries = decoder_mlp(layer, queries)
            keys = decoder_image_to_token(layer, queries, keys, tokens, key_pe)
            assert torch.equal(queries, layer_out[0]) and torch.equal(keys, layer_out[1])
        queries = final_token_to_image(transformer, queries, keys, tokens, key_pe)
    assert torch.equal(queries, expected_queries)
    assert torch.equal(keys, expected_keys)


def test_each_unit_run_from_its_captured_inputs_gives_its_output_in_the_model() -> None:
    model = build_sam_tiny()
    sample = (torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)),
              torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 30.0, 200.0, 90.0]]))

    def forward(m: Sam, s: tuple) -> None:
        sam_forward(m, *s)

    with torch.no_grad():
        for unit in sam_units(model, CONFIG):
            found = capture(model, unit.inputs + (unit.output,), forward, sample)
            output = unit.run(model.get_submodule(unit.root), found)
            assert torch.equal(output, found["output"]), unit.name
            assert set(found) - {"output"} >= set(unit.shared_inputs)
