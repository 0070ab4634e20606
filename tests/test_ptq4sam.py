"""PTQ4SAM-S and PTQ4SAM-L: registration, observer policy, AGQ on sam_tiny, the whole calibration."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS
from ptqbench.methods.ptq4sam.agq import AgqCapture
from ptqbench.methods.ptq4sam.method import Ptq4SamL, Ptq4SamS, Ptq4SamSConfig
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.adapter import ADAPTER
from ptqbench.models.sam1.attention_groups import softmax_attentions
from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.models import build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.observers import AvgMinMaxObserver, MSEObserver, make_observer
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation


def _micro_sam() -> Sam:
    """SAM's architecture at toy widths (input 64, 4x4 tokens, dim 32) so full calibrations run in seconds."""
    torch.manual_seed(0)
    model = Sam(
        ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                        window_size=2, global_attn_indexes=(1,), out_chans=32),
        PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4),
        MaskDecoder(num_multimask_outputs=3,
                    transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
                    transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return model.eval()


def _calib(size: int, images: int, seed: int = 0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(images):
        xy = torch.rand(3, 2, generator=generator) * size * 0.5
        wh = torch.rand(3, 2, generator=generator) * size * 0.4 + 4
        samples.append(CalibrationSample(torch.randn(1, 3, size, size, generator=generator),
                                         torch.cat([xy, xy + wh], dim=1)))
    return CalibrationSet(tuple(samples), "test")


def test_registered_names_and_alias():
    assert METHODS.canonical("ptq4sam-s") == "ptq4sam-s"
    assert METHODS.canonical("ptq4sam-l") == "ptq4sam"
    assert METHODS.get("ptq4sam") is Ptq4SamL and METHODS.get("ptq4sam-s") is Ptq4SamS


def test_decoder_keys_use_averaged_mse_only_with_big():
    decoder_keys = ["mask_decoder.transformer.layers.0.self_attn.k",
                    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.k",
                    "mask_decoder.transformer.final_attn_token_to_image.k"]
    others = ["image_encoder.blocks.2.attn.k", "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q",
              "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.input"]
    with_big, without_big = Ptq4SamS(), Ptq4SamS(Ptq4SamSConfig(big=False))
    key_sites = {f"{path}.k" for path in ADAPTER.decoder_attentions(quantize_sam(build_sam_tiny(), 4, 4))}
    assert set(decoder_keys) <= key_sites and not set(others) & key_sites
    for site in decoder_keys:
        assert isinstance(with_big.activation_observer_for(site, 4, key_sites), MSEObserver)
        assert isinstance(without_big.activation_observer_for(site, 4, key_sites), AvgMinMaxObserver)
    for site in others:
        assert isinstance(with_big.activation_observer_for(site, 4, key_sites), AvgMinMaxObserver)


def test_agq_beats_uniform_minmax_softmax_on_sam_tiny(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 8, 4)
    paths = ["image_encoder.blocks.2.attn", "mask_decoder.transformer.layers.0.cross_attn_token_to_image"]
    attentions = {path: qmodel.get_submodule(path) for path in paths}
    sample = _calib(256, 1).samples[0]
    calls, maxima = {}, {}
    hooks = [m.register_forward_hook(lambda _m, args, kwargs, out, p=p: calls.__setitem__(p, (args, kwargs, out)),
                                     with_kwargs=True) for p, m in attentions.items()]
    hooks += [m.softmax_quantizer.register_forward_pre_hook(lambda _m, args, p=p: maxima.__setitem__(p, args[0]))
              for p, m in attentions.items()]
    with torch.no_grad(), AgqCapture(attentions) as capture:
        sam_forward(qmodel, sample.image, sample.boxes)
    for hook in hooks:
        hook.remove()
    for path, result in capture.results().items():
        attn = attentions[path]
        args, kwargs, fp_out = calls[path]
        minmax = make_observer("minmax", bits=4)
        minmax.update(maxima[path])
        attn.softmax_quantizer.set_range(*minmax.compute_range(4))
        with torch.no_grad():
            uniform_error = (attn(*args, **kwargs) - fp_out).pow(2).mean().item()
        attn.softmax_quantizer.set_log2(result.tau, torch.tensor(result.scale))
        with torch.no_grad():
            agq_error = (attn(*args, **kwargs) - fp_out).pow(2).mean().item()
        assert 0 < agq_error < 0.8 * uniform_error, path


def _check_statistics_calibration(qmodel: Sam) -> dict[str, int]:
    """What PTQ4SAM-S must leave: every site quantizing, the 9 softmax sites (and only they) on log2 grids."""
    sites = quantizer_sites(qmodel)
    assert all(q.mode == "quantize" and q.observer is None for q in sites.values())
    softmax = {name: q for name, q in sites.items() if name.endswith(".softmax")}
    assert len(softmax) == 2 + 7 == len(softmax_attentions(qmodel))
    assert all(q.log2_tau in (1, 2, 4) and float(q.scale) > 0 for q in softmax.values())
    assert all(q.log2_tau is None for name, q in sites.items() if name not in softmax)
    return {name: q.log2_tau for name, q in softmax.items()}


def test_ptq4sam_l_is_ptq4sam_s_then_qdrop_with_tau_fixed_and_log2_scales_learned(monkeypatch):
    """One run covers both methods: the state handed to the reconstruction is PTQ4SAM-S's result."""
    ptq4sam = pytest.importorskip("ptqbench.methods.ptq4sam.method")
    model = _micro_sam()
    qmodel = quantize_sam(model, 4, 4)
    calib = _calib(64, 1)
    seen, reconstruct = {}, ptq4sam.qdrop_reconstruct

    def recorder(qm, fp_model, calib_set, iterations, seed, *, progress=True):
        seen.update(args=(qm, fp_model, calib_set, iterations, seed), taus=_check_statistics_calibration(qm),
                    scales={n: float(q.scale) for n, q in quantizer_sites(qm).items() if n.endswith(".softmax")})
        reconstruct(qm, fp_model, calib_set, iterations, seed, progress=progress)

    monkeypatch.setattr(ptq4sam, "qdrop_reconstruct", recorder)
    Ptq4SamL(Ptq4SamL.presets["fast"], progress=False).calibrate(qmodel, model, calib, BitSpec(4, 4), 0)
    assert seen["args"] == (qmodel, model, calib, 50, 0)
    assert _check_statistics_calibration(qmodel) == seen["taus"]
    sites = quantizer_sites(qmodel)
    assert any(float(sites[n].scale) != scale for n, scale in seen["scales"].items())  # log2 scales learned
    assert all(q.quantize_prob == 1.0 for q in sites.values())
    seal_for_evaluation(qmodel)
    image, boxes = calib.samples[0].image, calib.samples[0].boxes
    with torch.no_grad():
        fp_masks, _ = sam_forward(model, image, boxes)
        q_masks, _ = sam_forward(qmodel, image, boxes)
    assert not torch.equal(q_masks, fp_masks) and torch.isfinite(q_masks).all()
