"""SAM's reconstruction units: counts, coverage of every site, bare module outputs and the modules' own inputs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import window_partition
from torch import Tensor, nn

from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.models.sam1.units import first_argument, module_output, sam_units
from ptqbench.quant.sites import quantizer_sites
from ptqbench.recon.cache import capture
from ptqbench.recon.unit import HookPoint, Unit, UnitConfig

CONFIG = UnitConfig(iterations=1)
BOXES = torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 30.0, 200.0, 90.0]])


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
    assert units[2 * depth + 1].name == "mask_decoder.transformer.layers.0.self_attn"
    assert units[-1].name == "mask_decoder.transformer.final_attn_token_to_image"
    assert all(unit.root == unit.name and unit.trained == (unit.name,) for unit in units)


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
        if not quantizer.is_weight:
            quantizer.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    for module in qmodel.modules():
        if hasattr(module, "weight_quantizer"):
            w = module.weight.detach().flatten(1)
            module.weight_quantizer.set_range(w.min(1).values, w.max(1).values)


def _sample() -> tuple[Tensor, Tensor]:
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)), BOXES


def _forward(model: Sam, sample: tuple[Tensor, Tensor]) -> None:
    sam_forward(model, *sample)


def _last_layer(path: str) -> str:
    """The module whose output is the unit's bare output: proj / out_proj / lin2, or the neck's last norm."""
    if path.endswith(".mlp"):
        return f"{path}.lin2"
    if path.endswith("neck"):
        return f"{path}.3"
    return f"{path}.proj" if path.startswith("image_encoder") else f"{path}.out_proj"


@pytest.mark.parametrize("quantized", [False, True])
def test_each_unit_output_is_the_bare_module_output_of_a_full_forward(sam_tiny, quantized: bool) -> None:
    model = sam_tiny
    if quantized:
        model = quantize_sam(sam_tiny, 4, 4)
        _set_all_sites(model)
    units = sam_units(model, CONFIG)
    assert len(units) == 2 * 6 + 1 + 4 * 2 + 1
    with torch.no_grad():
        for unit in units:
            last = HookPoint(_last_layer(unit.name), "post", module_output("last"))
            found = capture(model, unit.inputs + (unit.output, last), _forward, _sample())
            output = unit.run(model.get_submodule(unit.root), found)
            assert torch.equal(output, found["last"]), unit.name
            assert torch.equal(found["output"], found["last"]), unit.name
            assert unit.sum_dim == 1 and not unit.shared_inputs


def _inputs(model: Sam, unit: Unit) -> dict[str, Tensor]:
    return capture(model, unit.inputs, _forward, _sample())


def test_encoder_unit_inputs_are_the_window_partitioned_norm1_and_the_norm2_outputs(sam_tiny) -> None:
    units = {unit.name: unit for unit in sam_units(sam_tiny, CONFIG)}
    with torch.no_grad():
        for index, block in enumerate(sam_tiny.image_encoder.blocks):
            path = f"image_encoder.blocks.{index}"
            seen = capture(sam_tiny, (HookPoint(path, "pre", first_argument("x")),
                                      HookPoint(f"{path}.norm2", "post", module_output("norm2"))), _forward, _sample())
            normed = block.norm1(seen["x"])
            windowed = block.window_size > 0
            attn_in = _inputs(sam_tiny, units[f"{path}.attn"])["x"]
            assert torch.equal(attn_in, window_partition(normed, block.window_size)[0] if windowed else normed)
            assert attn_in.shape == ((4, 8, 8, 192) if windowed else (1, 16, 16, 192))
            assert torch.equal(_inputs(sam_tiny, units[f"{path}.mlp"])["x"], seen["norm2"])


def _qkv(model: Sam, unit: Unit) -> tuple[Tensor, Tensor, Tensor]:
    found = _inputs(model, unit)
    assert set(found) == {"q", "k", "v"}
    return found["q"], found["k"], found["v"]


def test_decoder_unit_inputs_are_the_q_k_v_each_attention_receives(sam_tiny) -> None:
    """q and k with the positional encodings added where the layer adds them, v without; the MLP
    gets the norm2 output."""
    units = {unit.name: unit for unit in sam_units(sam_tiny, CONFIG)}
    transformer = "mask_decoder.transformer"
    with torch.no_grad():
        for index in range(2):
            layer = f"{transformer}.layers.{index}"
            seen = capture(sam_tiny, (
                HookPoint(layer, "pre", lambda args, kwargs, output: dict(kwargs)),
                *(HookPoint(f"{layer}.norm{n}", "post", module_output(f"norm{n}")) for n in (1, 2, 3)),
                HookPoint(layer, "post", lambda args, kwargs, output: {"q_out": output[0], "k_out": output[1]}),
            ), _forward, _sample())
            queries, keys, query_pe, key_pe = (seen[k] for k in ("queries", "keys", "query_pe", "key_pe"))
            q, k, v = _qkv(sam_tiny, units[f"{layer}.self_attn"])
            expected_q = queries if index == 0 else queries + query_pe
            assert torch.equal(q, expected_q) and torch.equal(k, expected_q) and torch.equal(v, queries)
            q, k, v = _qkv(sam_tiny, units[f"{layer}.cross_attn_token_to_image"])
            assert torch.equal(q, seen["norm1"] + query_pe) and torch.equal(k, keys + key_pe)
            assert torch.equal(v, keys)
            assert torch.equal(_inputs(sam_tiny, units[f"{layer}.mlp"])["x"], seen["norm2"])
            q, k, v = _qkv(sam_tiny, units[f"{layer}.cross_attn_image_to_token"])
            assert torch.equal(q, keys + key_pe) and torch.equal(k, seen["norm3"] + query_pe)
            assert torch.equal(v, seen["norm3"])
        q, k, v = _qkv(sam_tiny, units[f"{transformer}.final_attn_token_to_image"])
    assert torch.equal(q, seen["q_out"] + query_pe) and torch.equal(k, seen["k_out"] + key_pe)
    assert torch.equal(v, seen["k_out"])
    assert q.shape == (2, 7, 256) and k.shape == (2, 256, 256)
