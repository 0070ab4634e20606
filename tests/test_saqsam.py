"""`saqsam-s` and `saqsam` end to end on sam_tiny: registration, step order, PCC hand-off, sealing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS
from ptqbench.methods.saqsam.method import SaqSam, SaqSamS
from ptqbench.methods.saqsam.par import FAST_SETTINGS, with_iterations
from ptqbench.methods.saqsam.pcc import PccConfig
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.attention_groups import decoder_attentions
from ptqbench.models.sam1.calibration import sam_forward
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation

QUICK_PCC = PccConfig(percentiles=(0.9, 0.99, 0.999), max_prompts=2)


def _calibration(images: int = 2, boxes: int = 3, size: int = 256) -> CalibrationSet:
    generator = torch.Generator().manual_seed(7)
    samples = []
    for _ in range(images):
        corner = torch.rand(boxes, 2, generator=generator) * size * 0.5
        samples.append(CalibrationSample(torch.randn(1, 3, size, size, generator=generator),
                                         torch.cat([corner, corner + size * 0.3], dim=1)))
    return CalibrationSet(tuple(samples), "test")


def _qk_sites(qmodel) -> dict[str, FakeQuantizer]:
    sites = quantizer_sites(qmodel)
    return {f"{path}.{site}": sites[f"{path}.{site}"] for path in decoder_attentions(qmodel)
            for site in ("q_proj.input", "k_proj.input", "q", "k")}


def test_registered_with_the_papers_names():
    assert isinstance(METHODS.get("saqsam-s")(), SaqSamS) and not isinstance(METHODS.get("saqsam-s")(), SaqSam)
    assert isinstance(METHODS.get("saqsam")(), SaqSam)
    assert SaqSam.presets["paper"].pcc == PccConfig() and SaqSam.presets["fast"].pcc.max_prompts == 4


def test_saqsam_keeps_pcc_ranges_then_trains_from_them_and_seals_deterministically(sam_tiny):
    calib = _calibration()
    qmodel = quantize_sam(sam_tiny, 4, 4)
    method = SaqSam(replace(SaqSam.presets["fast"], pcc=QUICK_PCC, par=with_iterations(FAST_SETTINGS, 3)),
                    progress=False)
    steps = method.steps(qmodel, sam_tiny, calib, BitSpec(4, 4), 0)
    assert [name for name, _ in steps] == ["rel-pos from FP q", "BIG", "activations", "weights", "PAR"]
    results = {name: step() for name, step in steps[:-1]}

    # saqsam-s ends here: the statistics pass (which ran PCC inside its first forwards) left the
    # PCC ranges of the last pass alone; the encoder's relative-position term reads the FP q.
    pcc_ranges = {c.site: c.choice for c in results["activations"] if c.pass_index == 1}
    assert not any(m.rel_pos_from_quantized_q for m in qmodel.modules() if hasattr(m, "rel_pos_from_quantized_q"))
    for name, quantizer in _qk_sites(qmodel).items():
        expected = (max(pcc_ranges[name].x_max, 0.0) - min(pcc_ranges[name].x_min, 0.0)) / 15
        assert quantizer.scale.item() == pytest.approx(expected, rel=1e-6)
    sites = quantizer_sites(qmodel)
    assert all(q.mode == "quantize" and q.observer is None for q in sites.values())
    assert all(q.log2_tau is not None for name, q in sites.items() if name.endswith(".softmax"))

    pcc_qparams = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in _qk_sites(qmodel).items()}
    reports = steps[-1][1]()
    assert len(reports) == 6 and all(r.iterations == 3 for r in reports)
    changed = 0
    for name, quantizer in _qk_sites(qmodel).items():
        scale, zero_point = pcc_qparams[name]
        assert torch.equal(quantizer.zero_point, zero_point)  # LSQ keeps PCC's zero point ...
        changed += not torch.equal(quantizer.scale, scale)  # ... and trains the scale it started from
    assert changed >= 20

    seal_for_evaluation(qmodel)
    assert all(q.quantize_prob == 1.0 and q.mode == "quantize" for q in quantizer_sites(qmodel).values())
    sample = calib.samples[0]
    with torch.no_grad():
        first = sam_forward(qmodel, sample.image, sample.boxes)
        second = sam_forward(qmodel, sample.image, sample.boxes)
        fp = sam_forward(sam_tiny, sample.image, sample.boxes)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], fp[0])


def test_saqsam_s_has_no_reconstruction_step(sam_tiny):
    steps = SaqSamS(replace(SaqSamS.presets["fast"], pcc=QUICK_PCC)).steps(
        quantize_sam(sam_tiny, 4, 4), sam_tiny, _calibration(), BitSpec(4, 4), 0)
    assert [name for name, _ in steps] == ["rel-pos from FP q", "BIG", "activations", "weights"]


def test_reference_order_swaps_images_0_and_8():
    from ptqbench.methods.saqsam.method import reference_order

    calib = _calibration(images=10, boxes=1, size=16)
    swapped = reference_order(calib)
    assert swapped.samples[0] is calib.samples[8] and swapped.samples[8] is calib.samples[0]
    assert swapped.samples[1:8] == calib.samples[1:8] and swapped.samples[9] is calib.samples[9]
    short = _calibration(images=8, boxes=1, size=16)
    assert reference_order(short) is short


def test_search_image_must_exist(sam_tiny):
    from ptqbench.errors import ConfigError

    with pytest.raises(ConfigError, match="search image 5"):
        SaqSamS(replace(SaqSamS.presets["fast"], search_image=5)).steps(
            quantize_sam(sam_tiny, 4, 4), sam_tiny, _calibration(), BitSpec(4, 4), 0)
