"""The leak-free rule: after QDrop reconstruction no quantizer passes
anything through in FP, so a calibrated model is deterministic and fully quantized.

The published PTQ4SAM/QDrop code leaves drop probability 0.5 on reconstructed layers at test
time; here the engine resets it after each unit and `seal_for_evaluation` enforces it again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqbench.methods.qdrop import qdrop_config
from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.calibration import sam_forward, sample_forward
from ptqbench.models.sam1.models import build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.models.sam1.units import sam_units
from ptqbench.quant.adaround import AdaRoundQuantizer
from ptqbench.quant.observers import make_observer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites, seal_for_evaluation, weight_layers
from ptqbench.recon.engine import ReconstructionSettings, reconstruct


def tiny_calibration(images: int) -> CalibrationSet:
    samples = []
    for index in range(images):
        generator = torch.Generator().manual_seed(index)
        corner = torch.rand(2, 2, generator=generator) * 150
        boxes = torch.cat([corner, corner + 30 + torch.rand(2, 2, generator=generator) * 70], 1)
        samples.append(CalibrationSample(torch.randn(1, 3, 256, 256, generator=generator), boxes))
    return CalibrationSet(samples=tuple(samples), fingerprint="tiny")


@pytest.fixture(scope="module")
def reconstructed():
    """sam_tiny W4A4 after QDrop reconstruction of all 22 units (4 steps each), not yet sealed,
    with the quantize_prob every quantizer saw during the reconstruction forwards."""
    calib = tiny_calibration(2)
    fp = build_sam_tiny()
    qmodel = quantize_sam(fp, 4, 4)
    set_weight_ranges(qmodel, "minmax")
    observe_activations(qmodel, calib, lambda site, bits: make_observer("avgminmax", bits=bits), progress=False)
    seen: dict[str, set[float]] = {name: set() for name in quantizer_sites(qmodel)}
    handles = [q.register_forward_pre_hook(lambda m, args, name=name: seen[name].add(m.quantize_prob))
               for name, q in quantizer_sites(qmodel).items()]
    units = sam_units(qmodel, qdrop_config(4))
    reconstruct(units, qmodel, fp, calib, ReconstructionSettings(forward=sample_forward), seed=0, progress=False)
    for handle in handles:
        handle.remove()
    return qmodel, calib, seen


def test_reconstruction_dropped_inside_units(reconstructed) -> None:
    _, _, seen = reconstructed
    activation_sites = [name for name in seen if not name.endswith(".weight")]
    assert all(0.5 in seen[name] for name in activation_sites)


def test_engine_leaves_every_quantizer_quantizing_everything(reconstructed) -> None:
    qmodel, _, _ = reconstructed
    for name, quantizer in quantizer_sites(qmodel).items():
        assert quantizer.mode == "quantize", name
        assert quantizer.quantize_prob == 1.0, name
        assert quantizer.generator is None, name
        assert quantizer.observer is None, name
        assert not isinstance(quantizer.scale, nn.Parameter), name
    assert not any(isinstance(module, AdaRoundQuantizer) for module in qmodel.modules())
    for path, layer in weight_layers(qmodel).items():
        assert isinstance(layer.weight_quantizer, FakeQuantizer), path
        assert layer.frozen_weight is not None and torch.equal(layer.frozen_weight, layer.weight), path
    assert all(param.requires_grad for param in qmodel.parameters())


def test_sealed_model_is_deterministic_and_a_drop_would_be_detected(reconstructed) -> None:
    qmodel, calib, _ = reconstructed
    frozen = {path: layer.frozen_weight.clone() for path, layer in weight_layers(qmodel).items()}
    seal_for_evaluation(qmodel)
    for path, layer in weight_layers(qmodel).items():
        assert torch.equal(layer.frozen_weight, frozen[path]), path
    sample = calib.samples[0]

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        with torch.no_grad():
            return sam_forward(qmodel, sample.image, sample.boxes)

    first, second = run(1), run(2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Control: one site left at QDrop's 0.5 (the published leak) makes repeated runs differ.
    leaky = qmodel.image_encoder.blocks[0].mlp.lin2.input_quantizer
    leaky.quantize_prob = 0.5
    assert not torch.equal(run(1)[0], run(2)[0])
    leaky.quantize_prob = 1.0
    assert torch.equal(run(3)[0], first[0])
