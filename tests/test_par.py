"""Prompt-Aware Reconstruction: stages, losses, layer skipping, gradient flow, sequential targets."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.methods.saqsam.par import (
    FAST_SETTINGS,
    PAPER_SETTINGS,
    CopyIntoReference,
    EncodedImages,
    engine_settings,
    frozen_reference,
    par_decoder_loss,
    par_reconstruct,
    par_units,
    with_iterations,
)
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.attention_groups import encoder_stages
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.models.sam1.units import TRANSFORMER
from ptqbench.quant.observers import make_observer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.recon.cache import build_cache, capture
from ptqbench.recon.engine import reconstruct
from ptqbench.recon.step import unit_inputs
from ptqbench.recon.unit import HookPoint


def _calibration(images: int = 2, boxes: int = 3, size: int = 256) -> CalibrationSet:
    generator = torch.Generator().manual_seed(5)
    samples = []
    for _ in range(images):
        corner = torch.rand(boxes, 2, generator=generator) * size * 0.5
        extent = size * (0.1 + 0.3 * torch.rand(boxes, 2, generator=generator))
        samples.append(CalibrationSample(torch.randn(1, 3, size, size, generator=generator),
                                         torch.cat([corner, corner + extent], dim=1)))
    return CalibrationSet(tuple(samples), "test")


def _calibrated(model, calib: CalibrationSet):
    """A W4A4 twin with min/max weight and activation ranges (every site quantizing)."""
    qmodel = quantize_sam(model, 4, 4)
    set_weight_ranges(qmodel, "minmax")
    observe_activations(qmodel, calib, lambda site, bits: make_observer("minmax", bits=bits), progress=False)
    return qmodel


def test_stages_end_at_global_attention_blocks(sam_tiny):
    assert encoder_stages(sam_tiny) == [(0, 1, 2), (3, 4, 5)]
    vit_b = SimpleNamespace(image_encoder=SimpleNamespace(blocks=[
        SimpleNamespace(window_size=0 if index in (2, 5, 8, 11) else 14) for index in range(12)]))
    assert encoder_stages(vit_b) == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]


def test_presets_and_unit_configs(sam_tiny):
    assert FAST_SETTINGS.final_iterations == PAPER_SETTINGS.final_iterations // 100
    units = par_units(sam_tiny, frozen_reference(sam_tiny), PAPER_SETTINGS)
    assert [u.name for u in units] == ["image_encoder.blocks.0-2", "image_encoder.blocks.3-5", "image_encoder.neck",
                                       "mask_decoder.transformer.layers.0", "mask_decoder.transformer.layers.1",
                                       "mask_decoder.transformer.final_attn_token_to_image"]
    assert [u.config.iterations for u in units] == [2000, 2000, 2000, 2000, 2000, 10000]
    for unit in units:
        config = unit.config
        assert (config.adaround, config.learn_scales, config.reg_lambda) == (True, True, 0.0)
        assert (config.scale_lr, config.weight_lr, config.quantize_prob) == (2e-3, 1e-3, 0.5)
    assert PAPER_SETTINGS.max_prompts == 16


def test_decoder_loss_weights_queries_keys_and_final_tokens():
    queries, keys, tokens = torch.zeros(2, 3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 3, 4)
    target = (queries + 1.0, keys + 2.0, tokens + 3.0)  # squared errors summed over 4 channels: 4, 16, 36
    loss = par_decoder_loss()((queries, keys, tokens), target, {})
    assert loss.item() == pytest.approx(1.0 * (0.01 * 4 + 16) + 1.0 * 36)
    assert par_decoder_loss(alpha=0.5, beta=2.0)((queries, keys, tokens), target, {}).item() == pytest.approx(
        2.0 * (0.01 * 4 + 16) + 0.5 * 36)


def test_layer_skipping_never_runs_later_stages(sam_tiny):
    calib = _calibration()
    qmodel = _calibrated(sam_tiny, calib)
    reference = frozen_reference(sam_tiny)
    settings = with_iterations(FAST_SETTINGS, 3)
    stage = par_units(qmodel, reference, settings)[0]
    calls = {}

    def counter(key):
        def hook(module, args, output):
            calls[key] = calls.get(key, 0) + 1
        return hook

    for name, model in (("q", qmodel), ("ref", reference)):
        for index, block in enumerate(model.image_encoder.blocks):
            block.register_forward_hook(counter(f"{name}.block{index}"))
        model.image_encoder.neck.register_forward_hook(counter(f"{name}.neck"))
        model.mask_decoder.transformer.layers[1].register_forward_hook(counter(f"{name}.layer1"))
    reconstruct([stage], qmodel, reference, calib, engine_settings(qmodel, settings), seed=0, progress=False)
    assert all(calls.get(f"{name}.block{index}", 0) == 0 for name in ("q", "ref") for index in (3, 4, 5))
    assert calls["q.block0"] == calls["q.block2"] == 3  # the training steps only: capture stops before block 0
    assert calls["ref.block0"] == len(calib)  # the FP targets
    assert calls["ref.neck"] == calls["ref.layer1"] == len(calib) + 3  # FP neck and decoder: targets + steps
    assert "q.neck" not in calls and "q.layer1" not in calls


def _stage_scales(qmodel, stage: tuple[int, ...]) -> dict[str, torch.nn.Parameter]:
    scales = {}
    for index in stage:
        for path, module in qmodel.image_encoder.blocks[index].named_modules():
            if isinstance(module, FakeQuantizer) and not module.is_weight:
                scales[f"{index}.{path}"] = module.make_scale_learnable()
    return scales


def test_stage_loss_gradient_reaches_the_stage_not_the_fp_neck_or_decoder(sam_tiny):
    calib = _calibration(images=1)
    qmodel = _calibrated(sam_tiny, calib)
    reference = frozen_reference(sam_tiny)
    stage = par_units(qmodel, reference, FAST_SETTINGS)[0]
    entry = build_cache(stage, qmodel, reference, calib.samples, engine_settings(qmodel, FAST_SETTINGS).forward,
                        torch.device("cpu")).get(0)
    scales = _stage_scales(qmodel, (0, 1, 2))
    fp_parts = [reference.image_encoder.neck, reference.mask_decoder]
    before = [{k: v.clone() for k, v in part.state_dict().items()} for part in fp_parts]
    output = stage.run(qmodel.image_encoder.blocks, {**entry.fp_inputs, **entry.quant_inputs})
    assert output.shape == (3, 16 * 16, 256)  # image tokens of the decoder transformer, per prompt
    loss = stage.loss(output, entry.target, entry.extras)
    assert loss.item() > 0
    loss.backward()
    assert all(scale.grad is not None for scale in scales.values())
    assert sum(bool(scale.grad.abs().sum() > 0) for scale in scales.values()) >= 0.9 * len(scales)
    for part, state in zip(fp_parts, before):
        assert all(param.grad is None and not param.requires_grad for param in part.parameters())
        assert all(torch.equal(state[k], v) for k, v in part.state_dict().items())


def _unit_loss(unit, qmodel, reference, calib) -> float:
    """The unit's loss on every calibration sample with every quantizer fully on (no drop)."""
    cache = build_cache(unit, qmodel, reference, calib.samples, engine_settings(qmodel, FAST_SETTINGS).forward,
                        torch.device("cpu"))
    with torch.no_grad():
        losses = [unit.loss(unit.run(qmodel.get_submodule(unit.root), {**e.fp_inputs, **e.quant_inputs}), e.target,
                            e.extras) for e in cache.entries]
    return float(torch.stack(losses).mean())


def test_par_lowers_its_own_stage_loss(sam_tiny):
    calib = _calibration()
    qmodel = _calibrated(sam_tiny, calib)
    reference = frozen_reference(sam_tiny)
    stage = par_units(qmodel, reference, with_iterations(FAST_SETTINGS, 40))[0]
    before = _unit_loss(stage, qmodel, reference, calib)
    (report,) = reconstruct([stage], qmodel, reference, calib, engine_settings(qmodel, FAST_SETTINGS), seed=0,
                            progress=False)
    after = _unit_loss(stage, qmodel, reference, calib)
    assert report.iterations == 40
    assert after < 0.9 * before


def test_par_reconstruct_copies_encoder_units_into_its_reference_and_leaves_fp_model_alone(sam_tiny):
    calib = _calibration(images=1, boxes=2)
    qmodel = _calibrated(sam_tiny, calib)
    fp_state = {k: v.clone() for k, v in sam_tiny.state_dict().items()}
    reports = par_reconstruct(qmodel, sam_tiny, calib, with_iterations(FAST_SETTINGS, 2), seed=0, progress=False)
    assert [r.iterations for r in reports] == [2] * 6
    assert all(torch.equal(fp_state[k], v) for k, v in sam_tiny.state_dict().items())
    assert all(param.grad is None for param in sam_tiny.parameters())
    assert all(q.quantize_prob == 1.0 for q in qmodel.modules() if isinstance(q, FakeQuantizer))

    reference = frozen_reference(sam_tiny)
    units = par_units(qmodel, reference, FAST_SETTINGS)
    copier = CopyIntoReference(qmodel, reference, {units[0].name})
    copier(units[0], reports[0])
    copier(units[3], reports[3])
    x = torch.randn(1, 16, 16, 192)
    with torch.no_grad():
        assert torch.equal(reference.image_encoder.blocks[1](x), qmodel.image_encoder.blocks[1](x))
        assert not torch.equal(reference.image_encoder.blocks[4](x), qmodel.image_encoder.blocks[4](x))
    assert reference.image_encoder.blocks[1] is not qmodel.image_encoder.blocks[1]
    assert not any(p.requires_grad for p in reference.parameters())
    assert reference.mask_decoder.transformer.layers[0] is not qmodel.mask_decoder.transformer.layers[0]
    assert type(reference.mask_decoder.transformer.layers[0].self_attn).__name__ == "Attention"


def test_prompt_side_forward_encodes_each_image_once_per_model_and_gives_the_whole_forward(sam_tiny):
    calib = _calibration(images=2, boxes=3)
    qmodel = _calibrated(sam_tiny, calib)
    adapter = adapter_for(qmodel)
    encoded = EncodedImages(adapter)
    encodes = []
    handles = [model.image_encoder.register_forward_hook(lambda module, args, output, m=name: encodes.append(m))
               for name, model in (("quantized", qmodel), ("fp", sam_tiny))]
    with torch.no_grad():
        for sample in calib.samples * 2:
            for model in (qmodel, sam_tiny):
                for prompts in (sample, sample.first_prompts(1)):
                    expected = adapter.forward(model, prompts)
                    got = encoded.forward(model, prompts)
                    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for handle in handles:
        handle.remove()
    # Per model: the 8 whole forwards encode 8 times; the cached forward once per image, 2 more.
    assert encodes.count("quantized") == encodes.count("fp") == 8 + 2


def test_transformer_keys_are_the_transformer_outputs(sam_tiny):
    from ptqbench.models.sam1.prompt_aware_units import transformer_keys

    decoder = sam_tiny.mask_decoder
    sample = _calibration(images=1).samples[0]
    with torch.no_grad():
        embedding = sam_tiny.image_encoder(sample.image)
        sparse, dense = sam_tiny.prompt_encoder(points=None, boxes=sample.boxes, masks=None)
        image_pe = sam_tiny.prompt_encoder.get_dense_pe()
        src = torch.repeat_interleave(embedding, 3, dim=0) + dense
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(3, -1, -1)
        _, expected = decoder.transformer(src, torch.repeat_interleave(image_pe, 3, dim=0),
                                          torch.cat([tokens, sparse], dim=1))
        keys = transformer_keys(decoder, embedding, image_pe, sparse, dense)
    assert torch.equal(keys, expected)


def _hybrid_decoder_tokens(qmodel, reference, first_fp_layer: int, sample: CalibrationSample) -> torch.Tensor:
    """The reference code's alpha-term path: the quantized model's own forward on the image
    (unmixed quantized image embedding, quantized decoder layers before `first_fp_layer`), with
    the transformer's later layers and final attention FP; its final tokens [N, T, 256]."""
    hybrid = copy.deepcopy(qmodel)
    transformer, fp_transformer = hybrid.mask_decoder.transformer, reference.mask_decoder.transformer
    for index in range(first_fp_layer, len(transformer.layers)):
        transformer.layers[index] = fp_transformer.layers[index]
    transformer.final_attn_token_to_image = fp_transformer.final_attn_token_to_image
    found = capture(hybrid, (HookPoint(TRANSFORMER, "post", lambda args, kwargs, output: {"tokens": output[0]}),),
                    engine_settings(qmodel, FAST_SETTINGS).forward, sample)
    return found["tokens"]


@pytest.mark.parametrize("unit_index, layer_index", [(3, 0), (4, 1)])
def test_decoder_alpha_term_runs_the_layer_on_its_unmixed_quantized_input(sam_tiny, unit_index, layer_index):
    calib = _calibration(images=1)
    qmodel = _calibrated(sam_tiny, calib)
    reference = frozen_reference(sam_tiny)
    unit = par_units(qmodel, reference, FAST_SETTINGS)[unit_index]
    assert unit.name == f"{TRANSFORMER}.layers.{layer_index}" and unit.unmixed_inputs
    entry = build_cache(unit, qmodel, reference, calib.samples, engine_settings(qmodel, FAST_SETTINGS).forward,
                        torch.device("cpu")).get(0)
    layer = qmodel.get_submodule(unit.root)
    expected_tokens = _hybrid_decoder_tokens(qmodel, reference, layer_index + 1, calib.samples[0])
    with torch.no_grad():
        plain_queries, _ = layer(**entry.quant_inputs, query_pe=entry.fp_inputs["query_pe"],
                                 key_pe=entry.fp_inputs["key_pe"])
        for seed in (0, 1):
            inputs = unit_inputs(unit, entry, 0.5, torch.Generator().manual_seed(seed))
            assert not torch.equal(inputs["keys"], entry.quant_inputs["keys"])
            queries, keys, tokens = unit.run(layer, inputs)
            assert torch.equal(tokens, expected_tokens)  # mixing changes the beta terms only
            assert not torch.equal(queries, plain_queries)
        target_tokens = entry.target[2]
    assert tokens.shape == target_tokens.shape == (3, 7, 256)
    assert not torch.equal(tokens, target_tokens)


def test_final_unit_is_the_bare_final_attention_with_a_channel_sum_loss(sam_tiny):
    calib = _calibration(images=1)
    qmodel = _calibrated(sam_tiny, calib)
    units = par_units(qmodel, frozen_reference(sam_tiny), FAST_SETTINGS)
    neck, final = units[2], units[-1]
    assert (neck.sum_dim, final.sum_dim) == (-1, -1)
    path = f"{TRANSFORMER}.final_attn_token_to_image"
    assert (final.name, final.root, final.trained) == (path, path, (path,))
    last = HookPoint(f"{path}.out_proj", "post", lambda args, kwargs, output: {"out": output})
    with torch.no_grad():
        forward = engine_settings(qmodel, FAST_SETTINGS).forward
        found = capture(qmodel, final.inputs + (last,), forward, calib.samples[0])
        output = final.run(qmodel.get_submodule(path), found)
    assert set(found) == {"q", "k", "v", "out"} and torch.equal(output, found["out"])
    target = torch.zeros_like(output)
    assert final.loss(output, target, {}).item() == pytest.approx(float(output.square().sum(-1).mean()), rel=1e-6)
