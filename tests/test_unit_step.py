"""UnitStep: one reconstruction training step, eager or replayed from CUDA graphs (GPU tests skip on CPU)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.methods.saqsam.par import FAST_SETTINGS, frozen_reference, par_units
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.calibration import sample_forward
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.observers import make_observer
from ptqbench.quant.sites import quantizer_sites
from ptqbench.recon.cache import build_cache
from ptqbench.recon.engine import ReconstructionSettings, _LearnablePieces, reconstruct
from ptqbench.recon.step import UnitStep, unit_inputs
from ptqbench.recon.unit import Unit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def calibration(size: int, box_counts: tuple[int, ...], device: torch.device) -> CalibrationSet:
    """Random model inputs [1, 3, size, size] with the given numbers of random boxes."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for count in box_counts:
        corner = torch.rand(count, 2, generator=generator) * size * 0.6
        extent = size * (0.1 + 0.3 * torch.rand(count, 2, generator=generator))
        samples.append(CalibrationSample(torch.randn(1, 3, size, size, generator=generator).to(device),
                                         torch.cat([corner, corner + extent], 1).to(device)))
    return CalibrationSet(samples=tuple(samples), fingerprint="test")


def par_setup(model, device: torch.device, box_counts: tuple[int, ...] = (3, 5, 3)):
    """W4A4 min/max sam_tiny, its PAR units (a prompt-aware encoder stage, decoder layers) and data."""
    fp = model.to(device)
    qmodel = quantize_sam(fp, 4, 4).to(device)
    calib = calibration(fp.image_encoder.img_size, box_counts, device)
    set_weight_ranges(qmodel, "minmax")
    observe_activations(qmodel, calib, lambda site, bits: make_observer("minmax", bits=bits), progress=False)
    reference = frozen_reference(fp)
    return qmodel, reference, calib, par_units(qmodel, reference, FAST_SETTINGS)


def steps_for(unit: Unit, qmodel, reference, calib, device, quantize_prob: float):
    """The unit's cache, its learnable pieces, and an eager and a graphed UnitStep over them."""
    unit = replace(unit, config=replace(unit.config, quantize_prob=quantize_prob))
    cache = build_cache(unit, qmodel, reference, calib.samples, sample_forward, device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in qmodel.parameters():
        param.requires_grad_(False)
    pieces = _LearnablePieces(qmodel, unit, generator)
    root = qmodel.get_submodule(unit.root)
    eager, graphed = (UnitStep(unit, root, pieces.parameters(), quantize_prob, generator, device, graphs)
                      for graphs in (False, True))
    return cache, pieces, eager, graphed


@needs_cuda
@pytest.mark.parametrize("unit_index", [0, 3])  # the first encoder stage; the first decoder layer
def test_graph_replays_equal_the_eager_step(sam_tiny, unit_index):
    device = torch.device("cuda")
    qmodel, reference, calib, units = par_setup(sam_tiny, device)
    cache, pieces, eager, graphed = steps_for(units[unit_index], qmodel, reference, calib, device, 1.0)
    for index in (0, 1, 2, 1, 0):  # two input shapes (3 and 5 prompts): two graphs sharing one pool
        eager_loss, eager_grads = eager(cache.get(index))
        graph_loss, graph_grads = graphed(cache.get(index))
        torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-6, atol=0)
        assert sum(grad is not None for grad in graph_grads) > 0
        for graph_grad, eager_grad in zip(graph_grads, eager_grads):
            torch.testing.assert_close(graph_grad, eager_grad, rtol=1e-5, atol=1e-8)
    assert graphed.use_graphs and len(graphed._captured) == 2
    first, second = graphed._captured.values()
    assert all(a is b for a, b in zip(first.grads, second.grads))  # one set of gradient buffers
    pieces.finish()


@needs_cuda
def test_graph_replays_draw_fresh_drops(sam_tiny):
    device = torch.device("cuda")
    qmodel, reference, calib, units = par_setup(sam_tiny, device)
    cache, pieces, _, graphed = steps_for(units[0], qmodel, reference, calib, device, 0.5)
    losses = {float(graphed(cache.get(0))[0]) for _ in range(4)}
    assert len(losses) == 4
    pieces.finish()


@needs_cuda
def test_graphed_reconstruction_is_reproducible_and_lowers_the_loss(sam_tiny):
    device = torch.device("cuda")
    states = []
    for _ in range(2):
        qmodel, reference, calib, units = par_setup(sam_tiny.cpu(), device)
        unit = replace(units[0], config=replace(units[0].config, iterations=60))
        settings = ReconstructionSettings(forward=sample_forward, log_every=10)
        reports = reconstruct([unit], qmodel, reference, calib, settings, seed=3, progress=False)
        assert reports[0].last_loss < reports[0].first_loss
        states.append({name: q.scale.clone() for name, q in quantizer_sites(qmodel).items()})
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


@needs_cuda
def test_a_step_that_waits_for_the_gpu_falls_back_to_eager(sam_tiny, caplog):
    device = torch.device("cuda")
    qmodel, reference, calib, units = par_setup(sam_tiny, device)
    unit = units[3]

    def run_after_a_host_read(root, inputs):
        inputs["queries"].sum().item()  # waits for the GPU: not allowed while a graph is captured
        return unit.run(root, inputs)

    cache, pieces, eager, graphed = steps_for(replace(unit, run=run_after_a_host_read), qmodel, reference, calib,
                                              device, 1.0)
    with caplog.at_level(logging.WARNING):
        loss, grads = graphed(cache.get(0))
    assert "cannot be captured" in caplog.text and not graphed.use_graphs
    torch.testing.assert_close(loss, eager(cache.get(0))[0], rtol=1e-6, atol=0)
    pieces.finish()


def test_the_eager_step_gives_backwards_gradients(sam_tiny):
    device = torch.device("cpu")
    qmodel, reference, calib, units = par_setup(sam_tiny, device, box_counts=(3,))
    cache, pieces, eager, _ = steps_for(units[3], qmodel, reference, calib, device, 1.0)
    loss, grads = eager(cache.get(0))
    params = pieces.parameters()
    entry = cache.get(0)
    inputs = unit_inputs(units[3], entry, 1.0, None)
    units[3].loss(units[3].run(qmodel.get_submodule(units[3].root), inputs), entry.target, entry.extras).backward()
    assert any(grad is not None for grad in grads)
    for param, grad in zip(params, grads):
        assert (grad is None and param.grad is None) or torch.equal(grad, param.grad)
    pieces.finish()


def trained_tensors(qmodel) -> dict[str, torch.Tensor]:
    """Copies of every parameter and every quantizer scale of the model, by name."""
    tensors = {name: param.detach().clone() for name, param in qmodel.named_parameters()}
    return tensors | {name: q.scale.detach().clone() for name, q in quantizer_sites(qmodel).items()}


@needs_cuda
def test_graphed_updates_train_as_the_eager_steps(sam_tiny):
    """The optimisers' step and the regulariser inside the graphs (both sides of the warm-up): the
    learned scales and hard-rounded weights equal those of eager steps, and training moved them."""
    device = torch.device("cuda")
    learned, initial = [], None
    for cuda_graphs in (True, False):
        qmodel, reference, calib, units = par_setup(sam_tiny.cpu(), device)
        initial = trained_tensors(qmodel)
        unit = replace(units[3], config=replace(units[3].config, iterations=12, warmup=0.5, quantize_prob=1.0))
        settings = ReconstructionSettings(forward=sample_forward, log_every=4, cuda_graphs=cuda_graphs)
        reconstruct([unit], qmodel, reference, calib, settings, seed=1, progress=False)
        learned.append(trained_tensors(qmodel))
    graphed, eager = learned
    assert any(not torch.equal(eager[name], initial[name]) for name in eager)
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=1e-5, atol=1e-7)
