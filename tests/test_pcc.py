"""Perceptual-Consistency Clipping: focus masks and IoU, candidates, the greedy clip search, the SAM search."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling.transformer import Attention

from ptqbench.errors import PtqbenchError
from ptqbench.methods.saqsam import pcc
from ptqbench.methods.saqsam.pcc import (
    PCC_PERCENTILES,
    PccConfig,
    focus_distance,
    focus_iou,
    focus_masks,
    pcc_search,
    percentile_candidates,
    read_input,
    score_candidates,
    search_clip,
)
from ptqbench.models.calibration import CalibrationSample
from ptqbench.models.sam1.attention_groups import decoder_attentions
from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.quantized import QuantDecoderAttention, fp_twin, quantize_sam
from ptqbench.quant.observers import make_observer
from ptqbench.quant.sites import quantizer_sites


def test_focus_masks_keep_keys_above_theta_times_the_row_max():
    attn = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert focus_masks(attn).tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]
    assert focus_masks(attn, theta=0.2).tolist() == [[1, 1, 1, 1], [0, 0, 1, 0]]


def test_focus_iou_is_one_for_identical_maps_and_drops_when_a_key_changes():
    generator = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 2, 5, 9, generator=generator), dim=-1)
    iou = focus_iou(attn, attn.clone())
    assert iou.shape == (3, 2)
    assert torch.allclose(iou, torch.ones(3, 2), atol=1e-5)
    assert float(focus_distance(attn, attn.clone())) == pytest.approx(0.0, abs=1e-5)

    ref = torch.tensor([[[[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1]]]])  # [1 prompt, 1 head, 2 queries, 4 keys]
    hat = ref.clone()
    hat[0, 0, 0, 2] = 0.35  # key 2 of query 0 enters the focus: masks {0,1},{2} vs {0,1,2},{2}
    assert focus_iou(ref, hat).item() == pytest.approx(3 / (4 + 1e-6))
    assert float(focus_distance(ref, hat)) == pytest.approx(1 - 3 / (4 + 1e-6))


def test_percentile_candidates_match_numpy_quantile():
    assert len(PCC_PERCENTILES) == 29 and PCC_PERCENTILES[0] == 0.85 and PCC_PERCENTILES[-1] == 0.99999
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    candidates = percentile_candidates(x)
    assert len(candidates) == 29
    values = x.flatten().double().numpy()
    for p, (lo, hi) in zip(PCC_PERCENTILES, candidates):
        assert lo.item() == pytest.approx(np.quantile(values, 1 - p), abs=1e-5)
        assert hi.item() == pytest.approx(np.quantile(values, p), abs=1e-5)


def _attention_with_outliers() -> tuple[QuantDecoderAttention, tuple[tuple, dict], torch.Tensor]:
    """A decoder cross-attention (256 -> 128, 8 heads) whose key input carries 100x outliers in two
    channels that k_proj nearly ignores (as SAM's massive activations): they dominate the range of
    the k_proj input but not the attention's focus."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attention = QuantDecoderAttention.from_float(Attention(256, 8, downsample_rate=2), 4, 4).eval()
    q = torch.randn(2, 7, 256, generator=generator)
    k = torch.randn(2, 64, 256, generator=generator)
    k[..., 3] = 100.0
    k[..., 77] = -100.0
    with torch.no_grad():
        attention.k_proj.weight[:, [3, 77]] *= 1e-3
    return attention, q, k


def test_pcc_clips_far_inside_outliers_and_beats_the_mse_range():
    attention, queries, keys = _attention_with_outliers()
    with torch.no_grad():
        reference = attention.attention_map(queries, keys)
    site = attention.k_proj.input_quantizer

    def distance() -> torch.Tensor:
        with torch.no_grad():
            return focus_distance(reference, attention.attention_map(queries, keys))

    with torch.no_grad():
        choice = search_clip(site, keys, partial(score_candidates, attention, "k_proj.input", queries, keys, reference))
    assert site.mode == "quantize"
    assert choice.distance == min(choice.distances)
    assert max(abs(choice.x_min), abs(choice.x_max)) < 0.1 * keys.abs().max().item()  # > 10x clipping
    assert float(distance()) == pytest.approx(choice.distance)

    observer = make_observer("mse", bits=4)
    observer.update(keys)
    site.set_range(*observer.compute_range(4))
    assert float(distance()) > choice.distance


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("site", ["q_proj.input", "k_proj.input", "q", "k"])
@pytest.mark.parametrize("key_tokens", [7, 1100])  # softmax rows short, and past the GPU's one-warp softmax
def test_scoring_a_stack_of_candidates_gives_each_the_distance_it_gets_alone(device, site, key_tokens, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    generator = torch.Generator().manual_seed(2)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        attention = QuantDecoderAttention.from_float(Attention(256, 8, downsample_rate=2), 4, 4).eval().to(device)
    q = torch.randn(3, 9, 256, generator=generator).to(device)
    k = torch.randn(3, key_tokens, 256, generator=generator).to(device)
    quantizer = attention.get_submodule(f"{site}_quantizer")
    other = attention.get_submodule("q_quantizer" if site.startswith("k") else "k_quantizer")
    with torch.no_grad():
        reference = attention.attention_map(q, k)
        other.set_range(torch.tensor(-1.0, device=device), torch.tensor(1.5, device=device))
        activation = read_input(attention, f"{site}_quantizer", lambda module: module.attention_map(q, k))
        candidates = percentile_candidates(activation)
        alone = []
        for x_min, x_max in candidates:
            quantizer.set_range(x_min, x_max)
            alone.append(focus_distance(reference, attention.attention_map(q, k)).item())
        monkeypatch.setattr(pcc, "deferral_limit", lambda device: 10 * pcc.STACK_INTERMEDIATES * reference.nbytes)
        stacked = score_candidates(attention, site, q, k, reference, candidates).tolist()  # stacks of 10
    assert len(set(alone)) > 5  # the candidates differ, so a mix-up would show
    assert stacked == alone


def _sample(size: int = 256, boxes: int = 3) -> CalibrationSample:
    generator = torch.Generator().manual_seed(3)
    corner = torch.rand(boxes, 2, generator=generator) * size * 0.5
    return CalibrationSample(torch.randn(1, 3, size, size, generator=generator),
                             torch.cat([corner, corner + size * 0.3], dim=1))


def test_pcc_search_on_sam_runs_inside_forwards_greedy_order_two_passes_and_frozen_ranges(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 4, 4)
    config = PccConfig(percentiles=(0.9, 0.99, 0.99999))
    sample = _sample()
    choices = pcc_search(qmodel, sam_tiny, sample, config, progress=False)
    attentions = list(decoder_attentions(qmodel))
    assert len(attentions) == 7
    order = [f"{path}.{site}" for path in attentions for site in ("q_proj.input", "k_proj.input", "q", "k")]
    assert [c.site for c in choices] == order + order
    assert [c.pass_index for c in choices] == [0] * 28 + [1] * 28
    first = {c.site: c.choice for c in choices if c.pass_index == 0}
    # In the first pass the second attention already sees the first one clipped (a real forward):
    # its q_proj input is not the FP one, so neither are its candidate clips.
    path = attentions[1]
    fp_input = read_input(fp_twin(sam_tiny), f"{path}.q_proj",
                          lambda model: sam_forward(model, sample.image, sample.boxes))
    fp_candidates = [(float(lo), float(hi)) for lo, hi in percentile_candidates(fp_input, config.percentiles)]
    assert first[f"{path}.q_proj.input"].candidates != tuple(fp_candidates)
    # ... while the very first site of the first pass sees the FP model.
    first_input = read_input(fp_twin(sam_tiny), f"{attentions[0]}.q_proj",
                             lambda model: sam_forward(model, sample.image, sample.boxes))
    assert first[f"{attentions[0]}.q_proj.input"].candidates == tuple(
        (float(lo), float(hi)) for lo, hi in percentile_candidates(first_input, config.percentiles))
    sites = quantizer_sites(qmodel)
    for c in choices[28:]:
        quantizer = sites[c.site]
        assert quantizer.mode == "quantize"
        lo, hi = torch.tensor(c.choice.x_min), torch.tensor(c.choice.x_max)
        expected_scale = (torch.clamp(hi, min=0) - torch.clamp(lo, max=0)) / 15
        assert quantizer.scale.item() == pytest.approx(expected_scale.item(), rel=1e-6)
    assert all(q.mode == "off" for name, q in sites.items() if name not in set(order))


def test_pcc_search_refuses_a_model_with_other_sites_set(sam_tiny):
    qmodel = quantize_sam(sam_tiny, 4, 4)
    qmodel.mask_decoder.transformer.layers[0].self_attn.softmax_quantizer.set_range(torch.tensor(0.0),
                                                                                   torch.tensor(1.0))
    with pytest.raises(PtqbenchError, match="softmax"):
        pcc_search(qmodel, sam_tiny, _sample(), PccConfig(percentiles=(0.99,)), progress=False)
