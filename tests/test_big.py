"""BIG (Bimodal Integration): detection, channel signs, and the exactness of the sign fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling.transformer import Attention as DecoderAttention

from ptqbench.methods.ptq4sam.big import channel_signs, fold_channel_signs, is_bimodal, kde_peaks
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.quantized import QuantDecoderAttention, quantize_sam


def _logits(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T per head, [B, heads, Nq, Nk], from the module's own projections."""
    qh = attn._separate_heads(attn.q_proj(q), attn.num_heads)
    kh = attn._separate_heads(attn.k_proj(k), attn.num_heads)
    return qh @ kh.transpose(-1, -2)


@pytest.mark.parametrize("twin", [False, True])
def test_fold_keeps_logits_and_output_and_flips_key_channels(twin):
    torch.manual_seed(0)
    attn = DecoderAttention(embedding_dim=256, num_heads=8, downsample_rate=2)
    if twin:
        attn = QuantDecoderAttention.from_float(attn, 4, 4)
    q, k, v = torch.randn(3, 7, 256), torch.randn(3, 50, 256), torch.randn(3, 50, 256)
    gamma = torch.where(torch.rand(128) < 0.5, -1.0, 1.0)
    assert (gamma < 0).any() and (gamma > 0).any()
    with torch.no_grad():
        logits, out, keys = _logits(attn, q, k), attn(q=q, k=k, v=v), attn.k_proj(k)
        fold_channel_signs(attn, gamma)
        folded_logits, folded_out, folded_keys = _logits(attn, q, k), attn(q=q, k=k, v=v), attn.k_proj(k)
    torch.testing.assert_close(folded_logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(folded_out, out, rtol=0, atol=1e-6)
    assert torch.equal(folded_keys, keys * gamma)  # a sign flip is exact in floating point


def test_fold_refuses_calibrated_weights():
    attn = QuantDecoderAttention.from_float(DecoderAttention(256, 8, downsample_rate=2), 4, 4)
    w = attn.k_proj.weight.detach()
    attn.k_proj.weight_quantizer.set_range(w.min(1).values, w.max(1).values)
    with pytest.raises(RuntimeError, match="before the weight quantizers"):
        fold_channel_signs(attn, torch.ones(128))


def test_channel_signs_by_hand():
    keys = torch.tensor([[[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, -0.5, -4.0]],   # [2 boxes, 2 tokens, 4 channels]
                         [[-1.0, -2.0, 0.0, 1.5], [0.0, -1.0, 0.0, 0.0]]])
    # channel means over boxes and tokens: 0.5, -1, 0, 0.125 -> +1, -1, +1 (zero mean), +1
    assert channel_signs(keys).tolist() == [1.0, -1.0, 1.0, 1.0]


def test_detection_counts_exactly_two_peaks():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(-3, 1, 4000), rng.normal(3, 1, 4000)])
    one = rng.normal(0, 1, 8000)
    three = np.concatenate([rng.normal(m, 0.5, 3000) for m in (-6, 0, 6)])
    assert is_bimodal(torch.from_numpy(two).float())
    assert not is_bimodal(torch.from_numpy(one).float())
    assert len(kde_peaks(three)) == 3 and not is_bimodal(three)
    # the two peaks lie near the two centres, on the 128-point grid over [min, max]
    grid = np.linspace(two.min(), two.max(), 128)
    assert np.allclose(sorted(grid[kde_peaks(two)]), [-3, 3], atol=0.5)


def test_apply_big_folds_a_bimodal_key_and_keeps_sam_output(sam_tiny):
    from ptqbench.methods.ptq4sam.method import apply_big, capture_keys

    path = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make K bimodal: channel centres at +-4
        offsets = torch.where(torch.rand(128, generator=generator) < 0.5, -4.0, 4.0)
        sam_tiny.get_submodule(path).k_proj.bias.add_(offsets)
    bias_before = sam_tiny.get_submodule(path).k_proj.bias.clone()
    qmodel = quantize_sam(sam_tiny, 4, 4)
    image = torch.randn(1, 3, 256, 256, generator=generator)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [100.0, 40.0, 250.0, 90.0]])
    calib = CalibrationSet((CalibrationSample(image, boxes),), "test")

    decisions = apply_big(qmodel, sam_tiny, calib)

    assert decisions[path].bimodal and decisions[path].folded
    assert len(decisions) == 7  # every decoder attention is judged, as the reference's sign quantizers
    folded = {name for name, decision in decisions.items() if decision.folded}
    assert folded <= {path, "mask_decoder.transformer.layers.1.cross_attn_token_to_image",
                      "mask_decoder.transformer.final_attn_token_to_image"}
    keys = capture_keys(qmodel, calib.samples[0], [path])[path]
    assert (keys.mean(dim=(0, 1)) >= 0).all()
    assert not is_bimodal(keys[0])
    with torch.no_grad():
        fp_masks, fp_iou = sam_forward(sam_tiny, image, boxes)
        q_masks, q_iou = sam_forward(qmodel, image, boxes)
    torch.testing.assert_close(q_masks, fp_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_iou, fp_iou, rtol=1e-4, atol=1e-5)
    for name, decision in decisions.items():  # folded exactly where decided; the FP model untouched
        for proj in ("q_proj", "k_proj"):
            fp_weight = sam_tiny.get_submodule(f"{name}.{proj}").weight
            assert torch.equal(qmodel.get_submodule(f"{name}.{proj}").weight, fp_weight) != decision.folded
    assert torch.equal(sam_tiny.get_submodule(path).k_proj.bias, bias_before)
