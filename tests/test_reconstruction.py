"""The reconstruction engine's mechanisms, each with a measurable effect: AdaRound, LSQ, QDrop's
drop, and reconstruction of a real sam_tiny unit."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from ptqbench.config import BitSpec
from ptqbench.methods import brecq
from ptqbench.methods.brecq import Brecq, FisherWeights
from ptqbench.methods.qdrop import qdrop_config
from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.adapter import ADAPTER
from ptqbench.models.sam1.calibration import sample_forward
from ptqbench.models.sam1.models import build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.models.sam1.units import first_argument, sam_units
from ptqbench.quant.adaround import AdaRoundQuantizer, beta_schedule, rectified_sigmoid
from ptqbench.quant.layers import QuantLinear
from ptqbench.quant.observers import make_observer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import seal_for_evaluation
from ptqbench.recon import engine
from ptqbench.recon.cache import build_cache
from ptqbench.recon.engine import ReconstructionSettings, reconstruct, sample_order, unit_seed
from ptqbench.recon.step import UnitStep, mix_inputs
from ptqbench.recon.unit import HookPoint, Unit, UnitConfig, lp_error


class Wrapper(nn.Module):
    """A model holding one layer at path "layer" (the engine resolves units by path)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def linear_setup(bits: int = 3, seed: int = 0) -> tuple[Wrapper, Wrapper, CalibrationSet, ReconstructionSettings]:
    """FP and quantized (weight-only, per-channel min/max grid) Linear(32 -> 16) and 8 batches of inputs."""
    generator = torch.Generator().manual_seed(seed)
    fp_layer = nn.Linear(32, 16)
    with torch.no_grad():
        fp_layer.weight.copy_(torch.randn(16, 32, generator=generator) / 32**0.5)
    fp = Wrapper(fp_layer)
    quantized = Wrapper(QuantLinear(copy.deepcopy(fp_layer), bits, 8))
    set_weight_ranges(quantized, "minmax")
    # Inputs with correlated channels: rounding errors of different weights interact.
    mixing = torch.randn(32, 32, generator=generator) / 32**0.5
    batches = tuple(torch.randn(64, 32, generator=generator) @ mixing for _ in range(8))
    settings = ReconstructionSettings(forward=lambda model, x: model(x))
    return fp, quantized, CalibrationSet(samples=batches, fingerprint="test"), settings


def linear_unit(config: UnitConfig) -> Unit:
    return Unit(name="layer", root="layer", trained=("layer",),
                inputs=(HookPoint("layer", "pre", first_argument("x")),),
                run=lambda layer, inputs: layer(inputs["x"]), loss=lp_error(-1), config=config)


def output_error(quantized: Wrapper, fp: Wrapper, calib: CalibrationSet) -> float:
    with torch.no_grad():
        return sum(float((quantized(x) - fp(x)).square().sum(-1).mean()) for x in calib.samples) / len(calib)


ADAROUND_ONLY = UnitConfig(iterations=300, adaround=True, learn_scales=False, weight_lr=1e-2, quantize_prob=1.0)


def test_rectified_sigmoid_and_beta_schedule() -> None:
    assert rectified_sigmoid(torch.tensor([-100.0, 0.0, 100.0])).tolist() == [0.0, pytest.approx(0.5), 1.0]
    assert beta_schedule(0, 100, 0.2) is None and beta_schedule(19, 100, 0.2) is None
    assert beta_schedule(20, 100, 0.2) == 20.0
    assert beta_schedule(60, 100, 0.2) == pytest.approx(11.0)
    assert beta_schedule(100, 100, 0.2) == 2.0


def test_adaround_starts_at_the_fp_weight_and_hard_rounds_to_nearest() -> None:
    _, quantized, _, _ = linear_setup()
    layer = quantized.layer
    rounding = AdaRoundQuantizer(layer.weight, layer.weight_quantizer)
    scale, zero_point = rounding.scale, rounding.zero_point
    soft = rounding(layer.weight).detach()
    # h(V) = frac(W/s): the soft weight equals W wherever W lies inside the grid (the rounded
    # zero point leaves a channel's extremes up to half a step outside).
    position = layer.weight.detach() / scale + zero_point
    inside = (position >= 0) & (position <= 2**3 - 1)
    assert float(inside.float().mean()) > 0.9
    torch.testing.assert_close(soft[inside], layer.weight.detach()[inside], rtol=0, atol=1e-5)
    nearest = layer.weight_quantizer(layer.weight).detach()
    hard = rounding.hard_weight()
    exact_half = ((layer.weight / scale) % 1 == 0.5)
    assert torch.equal(hard[~exact_half], nearest[~exact_half])
    grid = hard / scale + zero_point
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-4)


def test_adaround_lowers_the_output_error_below_round_to_nearest() -> None:
    fp, quantized, calib, settings = linear_setup()
    nearest_error = output_error(quantized, fp, calib)
    reports = reconstruct([linear_unit(ADAROUND_ONLY)], quantized, fp, calib, settings, seed=0, progress=False)
    adaround_error = output_error(quantized, fp, calib)
    assert adaround_error < 0.8 * nearest_error
    assert reports[0].flipped > 0.01
    layer = quantized.layer
    # Hard-rounded weights are on the grid of the layer's own (restored) quantizer ...
    assert isinstance(layer.weight_quantizer, FakeQuantizer)
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    frozen = layer.frozen_weight.clone()
    # ... so sealing for evaluation (every site quantizing) reproduces exactly the weights
    # reconstruction ended with.
    layer.input_quantizer.set_range(torch.tensor(-8.0), torch.tensor(8.0))
    seal_for_evaluation(quantized)
    assert torch.equal(layer.frozen_weight, frozen)
    assert torch.equal(frozen, layer.weight)


def test_reconstruction_is_reproducible_from_the_seed() -> None:
    config = replace(ADAROUND_ONLY, iterations=40, learn_scales=True, quantize_prob=0.5)
    weights = []
    for _ in range(2):
        fp, quantized, calib, settings = linear_setup(bits=3)
        quantized.layer.input_quantizer.set_range(torch.tensor(-3.0), torch.tensor(3.0))
        reconstruct([linear_unit(config)], quantized, fp, calib, settings, seed=7, progress=False)
        weights.append((quantized.layer.weight.clone(), quantized.layer.input_quantizer.scale.clone()))
    assert torch.equal(weights[0][0], weights[1][0]) and torch.equal(weights[0][1], weights[1][1])


def test_a_unit_captures_only_the_samples_its_steps_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 steps on 8 samples: the cache holds the distinct samples drawn, and step k trains on the
    sample the seeded order names, as when every sample was captured."""
    fp, quantized, calib, settings = linear_setup()
    captured, stepped = [], []
    build = engine.build_cache
    monkeypatch.setattr(engine, "build_cache", lambda unit, q, f, samples, *rest:
                        captured.append(list(samples)) or build(unit, q, f, samples, *rest))
    call = UnitStep.__call__
    monkeypatch.setattr(UnitStep, "__call__", lambda self, entry, **flags:
                        stepped.append(entry.quant_inputs["x"]) or call(self, entry, **flags))
    reconstruct([linear_unit(replace(ADAROUND_ONLY, iterations=3))], quantized, fp, calib, settings, seed=0,
                progress=False)
    order = sample_order(len(calib.samples), 3, unit_seed(0, "layer"))
    drawn = sorted(set(order))
    assert len(drawn) < len(calib.samples)
    assert len(captured[0]) == len(drawn)
    assert all(torch.equal(sample, calib.samples[i]) for sample, i in zip(captured[0], drawn))
    assert len(stepped) == 3 and all(torch.equal(x, calib.samples[i]) for x, i in zip(stepped, order))


def test_lsq_scale_receives_gradients_and_learning_it_lowers_the_error() -> None:
    quantizer = FakeQuantizer(4, is_weight=False)
    quantizer.set_range(torch.tensor(-10.0), torch.tensor(10.0))
    scale = quantizer.make_scale_learnable()
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    (quantizer(x) - x).square().sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad.abs() > 0
    # Hand values (s = 0.5, z = 1, 2 bits): x/s = -1.8 0.6 3.2 1.2 -> levels -1 2 4 2; the first and
    # third are clamped (d/ds = qmin - z = -1, qmax - z = 2), the others inside (d/ds = 1 - 0.6,
    # 1 - 1.2); LSQ's gradient scale is 1/sqrt(4 * 3).
    quantizer = FakeQuantizer(2, is_weight=False)
    quantizer.set_range(torch.tensor(-0.5), torch.tensor(1.0))
    assert float(quantizer.scale) == 0.5 and float(quantizer.zero_point) == 1.0
    scale = quantizer.make_scale_learnable()
    x = torch.tensor([-0.9, 0.3, 1.6, 0.6], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert float(scale.grad) == pytest.approx((-1.0 + 0.4 + 2.0 - 0.2) / 12**0.5, rel=1e-5)

    fp, quantized, calib, settings = linear_setup(bits=8)
    layer = quantized.layer
    layer.input_quantizer = FakeQuantizer(3, is_weight=False)
    layer.input_quantizer.set_range(torch.tensor(-10.0), torch.tensor(10.0))  # far too wide a range
    initial_scale = float(layer.input_quantizer.scale)
    error_before = output_error(quantized, fp, calib)
    config = UnitConfig(iterations=200, adaround=False, learn_scales=True, scale_lr=2e-2, quantize_prob=1.0)
    reconstruct([linear_unit(config)], quantized, fp, calib, settings, seed=0, progress=False)
    assert float(layer.input_quantizer.scale) < initial_scale
    assert output_error(quantized, fp, calib) < 0.5 * error_before
    assert not isinstance(layer.input_quantizer.scale, nn.Parameter)


def test_qdrop_quantizes_about_p_of_the_elements_and_mixes_inputs_the_same_way() -> None:
    quantizer = FakeQuantizer(2, is_weight=False)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    quantized = quantizer.quantize(x)
    changed = quantized != x
    for p in (0.5, 0.2):
        quantizer.quantize_prob = p
        quantizer.generator = torch.Generator().manual_seed(1)
        out = quantizer(x)
        kept_quantized = (out == quantized) & changed
        kept_fp = (out == x) & changed
        assert bool((kept_quantized | kept_fp)[changed].all())
        assert abs(float(kept_quantized[changed].float().mean()) - p) < 0.01
    quant_input, fp_input = torch.zeros(200_000), torch.ones(200_000)
    mixed = mix_inputs({"x": quant_input}, {"x": fp_input, "pe": fp_input}, 0.5, torch.Generator().manual_seed(2))
    assert abs(float((mixed["x"] == 0).float().mean()) - 0.5) < 0.01
    assert mixed["pe"] is fp_input
    assert mix_inputs({"x": quant_input}, {"x": fp_input}, 1.0, None)["x"] is quant_input


def tiny_calibration(images: int, boxes: int = 2) -> CalibrationSet:
    samples = []
    for index in range(images):
        generator = torch.Generator().manual_seed(index)
        corner = torch.rand(boxes, 2, generator=generator) * 150
        size = 30 + torch.rand(boxes, 2, generator=generator) * 70
        samples.append(CalibrationSample(torch.randn(1, 3, 256, 256, generator=generator),
                                         torch.cat([corner, corner + size], 1)))
    return CalibrationSet(samples=tuple(samples), fingerprint="tiny")


def calibrated_ranges(qmodel: nn.Module, calib: CalibrationSet) -> None:
    """Min/max weight ranges, AvgMinMax activation ranges: every site quantizing."""
    set_weight_ranges(qmodel, "minmax")
    observe_activations(qmodel, calib, lambda site, b: make_observer("avgminmax", bits=b), progress=False)


def calibrated_tiny(calib: CalibrationSet, bits: int = 4):
    fp = build_sam_tiny()
    qmodel = quantize_sam(fp, bits, bits)
    calibrated_ranges(qmodel, calib)
    return fp, qmodel


def unit_error(unit: Unit, qmodel: nn.Module, fp: nn.Module, calib: CalibrationSet) -> float:
    """Mean unit loss with quantized-model inputs, nothing dropped."""
    cache = build_cache(unit, qmodel, fp, calib.samples, sample_forward, torch.device("cpu"))
    root = qmodel.get_submodule(unit.root)
    with torch.no_grad():
        return sum(float(unit.loss(unit.run(root, {**e.fp_inputs, **e.quant_inputs}), e.target, e.extras))
                   for e in cache.entries) / len(cache)


@pytest.mark.parametrize("index", [1, 2])  # encoder block 0's MLP unit; block 1's attention unit
def test_reconstructing_a_sam_tiny_unit_lowers_its_output_error(index: int) -> None:
    calib = tiny_calibration(2)
    fp, qmodel = calibrated_tiny(calib, bits=3)
    # QDrop's algorithm (AdaRound + LSQ + drop 0.5) with larger steps, so 60 steps show the effect.
    config = replace(qdrop_config(60), weight_lr=1e-2, scale_lr=1e-3)
    unit = sam_units(qmodel, config)[index]
    before = unit_error(unit, qmodel, fp, calib)
    reconstruct([unit], qmodel, fp, calib, ReconstructionSettings(forward=sample_forward), seed=0, progress=False)
    after = unit_error(unit, qmodel, fp, calib)
    assert after < 0.9 * before


def test_fisher_weights_are_at_least_one_and_shaped_like_the_unit_output() -> None:
    calib = tiny_calibration(1)
    fp, qmodel = calibrated_tiny(calib)
    units = sam_units(qmodel, UnitConfig(iterations=1))
    unit = units[13]  # decoder layer 0 self-attention: its output is not downstream of the image
    later = [path for other in units[14:] for path in other.trained]
    weights = FisherWeights(unit.output, later)(qmodel, fp, calib.samples[0])["fisher_weight"]
    assert weights.shape == (2, 7, 256)
    assert bool((weights >= 1).all()) and float(weights.max()) > 1.0
    # The later units' quantizers are back in quantize mode afterwards.
    assert qmodel.mask_decoder.transformer.layers[1].mlp.lin1.input_quantizer.mode == "quantize"


@pytest.mark.parametrize("mixed_inputs", [True, False])
def test_brecq_mixes_unit_inputs_half_and_half_with_the_activations_off(monkeypatch, mixed_inputs: bool) -> None:
    """`brecq` (the reference's --brecq mode) trains each unit on `where(U < 0.5, quantized-model
    input, FP input)`, activation quantizers off; `mixed_inputs=False` (brecq-fisher's setting)
    trains on the quantized-model input only. One decoder MLP unit, fast preset (50 steps), min/max
    weight ranges instead of MSE (quicker; the ranges do not matter here)."""
    calib = tiny_calibration(1)
    fp = build_sam_tiny()
    qmodel = quantize_sam(fp, 4, 4)
    path = "mask_decoder.transformer.layers.0.mlp"
    monkeypatch.setattr(type(ADAPTER), "reconstruction_units",
                        lambda self, model, config: [u for u in sam_units(model, config) if u.name == path])
    monkeypatch.setattr(brecq, "initial_ranges",
                        lambda model, calib, weight_ranges, progress: calibrated_ranges(model, calib))
    module = qmodel.get_submodule(path)
    activations = [q for q in module.modules() if isinstance(q, FakeQuantizer) and not q.is_weight]
    fp_inputs, captures, steps = [], [], []
    fp.get_submodule(path).register_forward_pre_hook(lambda m, args: fp_inputs.append(args[0].clone()))

    def record(m: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # a training step (captures run without gradients)
            assert all(q.mode == "off" for q in activations)
            steps.append(args[0].detach().clone())
        elif not steps:
            captures.append(args[0].clone())

    module.register_forward_pre_hook(record)
    config = replace(Brecq.presets["fast"], mixed_inputs=mixed_inputs)
    Brecq(config, progress=False).calibrate(qmodel, fp, calib, BitSpec(4, 4), seed=0)
    quant_input, fp_input = captures[-1], fp_inputs[-1]  # the unit's cache: the last capture of each model
    assert len(steps) == 50 and all(q.mode == "quantize" and q.quantize_prob == 1.0 for q in activations)
    mixed = torch.stack(steps)
    assert bool(((mixed == quant_input) | (mixed == fp_input)).all())
    differ = (quant_input != fp_input).expand_as(mixed)
    share = float((mixed == quant_input)[differ].float().mean())
    assert float(differ.float().mean()) > 0.5
    assert abs(share - 0.5) < 0.02 if mixed_inputs else share == 1.0
