"""The block-reconstruction engine shared by brecq, qdrop, ptq4sam and saqsam (methods/qdrop.md).

`reconstruct(units, qmodel, fp_model, calib, settings, seed, progress)` takes the units in
order; for each one it

1. draws the calibration sample of every training step (`sample_order`) and captures, for each
   sample drawn, the unit's inputs in the quantized model (as reconstructed so far) and in the FP
   model, its extras and its FP targets (`cache.build_cache`);
2. installs the learnable pieces in the unit's trained modules: an `AdaRoundQuantizer` per
   weight (when `config.adaround`), LSQ scales on every activation quantizer in quantize mode
   (when `config.learn_scales`), QDrop's per-element drop (`config.quantize_prob`) with a seeded
   generator;
3. trains them: each step takes one calibration sample, mixes the unit input
   `where(U < p, quantized input, FP input)`, runs the unit, adds the AdaRound regulariser
   (lambda, beta annealed 20 -> 2 after the warm-up) to the unit loss; Adam on V, Adam on the
   scales with cosine decay to 0 (`optimisation.UnitOptimisation`). A whole step (forward,
   gradients, optimiser update: `step.UnitStep`) is replayed as a CUDA graph on a GPU;
4. ends the unit: weights are hard-rounded (`floor + 1[V >= 0]`) and written back into the
   layer's weight, whose own quantizer then reproduces them exactly (re-quantizing a grid value
   is the identity), and frozen; scales become buffers again; every quantizer of the unit gets
   quantize_prob = 1 and no generator (the leak-free rule: nothing random survives a unit).

Randomness (sample order, input mixing, in-unit drops) comes from generators seeded by
(seed, unit name), so a run is reproducible and a unit's randomness does not depend on which
units ran before it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.progress import phase
from ptqbench.quant.adaround import AdaRoundQuantizer
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.recon.cache import Forward, Placement, UnitCache, build_cache
from ptqbench.recon.optimisation import UnitOptimisation
from ptqbench.recon.step import UnitStep
from ptqbench.recon.unit import Unit

if TYPE_CHECKING:
    from ptqbench.models.calibration import CalibrationSample, CalibrationSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionSettings:
    """Engine-wide settings (per-unit hyperparameters live in each unit's `UnitConfig`).

    forward: (model, sample) -> anything; the whole-model forward that reaches the hook points,
        the model adapter's `forward` (`ptqbench.models.adapter.ModelAdapter.forward`).
    cache: where captured data lives: "auto" (the device when it fits in `cache_memory_fraction`
        of the free device memory, else pinned CPU memory), "device" or "cpu".
    max_prompts: at most this many box prompts per calibration image (a seeded random subset,
        the same for every unit); None keeps them all.
    log_every: steps between updates of the progress bar's running loss (each one syncs the
        device); at most a tenth of a unit's steps, so the first and last windows differ.
    cuda_graphs: on a GPU, capture each unit's training step (input mixing, forward, loss,
        gradients) as CUDA graphs and replay them (`ptqbench.recon.step`); False runs
        every step eagerly.
    """

    forward: Forward
    cache: Placement = "auto"
    cache_memory_fraction: float = 0.5
    max_prompts: int | None = None
    log_every: int = 50
    cuda_graphs: bool = True


@dataclass(frozen=True)
class UnitReport:
    """What happened in one unit: timings, the mean unit loss over the first and the last logging
    window (NaN without training steps), the share of weights AdaRound rounded differently
    from round-to-nearest (None without AdaRound), and where its cache lived and its size."""

    name: str
    iterations: int
    capture_s: float
    train_s: float
    first_loss: float
    last_loss: float
    flipped: float | None
    cache_on_device: bool
    cache_bytes: int


def unit_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the run seed and a unit name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _limit_prompts(samples: Sequence[CalibrationSample], max_prompts: int | None,
                   seed: int) -> list[CalibrationSample]:
    """Each sample with at most `max_prompts` of its box prompts, drawn at random
    (`CalibrationSample.random_prompts`) from one generator seeded by `seed`; all of them for None."""
    if max_prompts is None:
        return list(samples)
    generator = torch.Generator().manual_seed(seed)
    return [sample.random_prompts(max_prompts, generator) for sample in samples]


def _modules_under(model: nn.Module, paths: Sequence[str], kind: type) -> list:
    found: dict[int, nn.Module] = {}
    for path in paths:
        for module in model.get_submodule(path).modules():
            if isinstance(module, kind):
                found.setdefault(id(module), module)
    return list(found.values())


class _LearnablePieces:
    """The trainable state of one unit inside the quantized model.

    Construction swaps in AdaRound quantizers, makes the activation scales learnable and sets
    the drop (weights without AdaRound are frozen for the unit's duration: they do not change);
    `finish` hard-rounds and writes back the weights, freezes the scales and resets
    quantize_prob to 1 with no generator.
    """

    def __init__(self, qmodel: nn.Module, unit: Unit, generator: torch.Generator) -> None:
        config = unit.config
        self.config = config
        layers = [layer for layer in _modules_under(qmodel, unit.trained, QuantWeightLayer)
                  if isinstance(layer.weight_quantizer, FakeQuantizer) and layer.weight_quantizer.mode == "quantize"]
        self.activations = [q for q in _modules_under(qmodel, unit.trained, FakeQuantizer)
                            if not q.is_weight and q.mode == "quantize"]
        self.adaround: list[tuple[QuantWeightLayer, FakeQuantizer, AdaRoundQuantizer]] = []
        self.frozen_for_speed: list[QuantWeightLayer] = []
        self.scales: list[nn.Parameter] = []
        for layer in layers:
            if config.adaround:
                base = layer.weight_quantizer
                if base.log2_tau is not None:
                    raise ConfigError(f"unit {unit.name}: AdaRound needs uniform weight quantizers")
                layer.unfreeze_weight()
                rounding = AdaRoundQuantizer(layer.weight, base)
                layer.weight_quantizer = rounding
                self.adaround.append((layer, base, rounding))
            elif layer.frozen_weight is None:
                layer.freeze_weight()
                self.frozen_for_speed.append(layer)
        for quantizer in self.activations:
            if config.learn_scales:
                self.scales.append(quantizer.make_scale_learnable().requires_grad_(True))
            quantizer.quantize_prob = config.quantize_prob
            quantizer.generator = generator if config.quantize_prob < 1.0 else None

    @property
    def trainable(self) -> bool:
        return bool(self.adaround or self.scales)

    def rounding_parameters(self) -> list[Tensor]:
        """AdaRound's V of every weight."""
        return [rounding.v for _, _, rounding in self.adaround]

    def parameters(self) -> list[Tensor]:
        """The trainable tensors: AdaRound's V of every weight, then the LSQ scales."""
        return self.rounding_parameters() + list(self.scales)

    def regularizer(self, beta: float) -> Tensor:
        terms = [rounding.regularizer(beta) for _, _, rounding in self.adaround]
        return self.config.reg_lambda * sum(terms[1:], terms[0])

    def finish(self) -> float | None:
        """End the unit; returns the share of weights rounded away from nearest (None: no AdaRound)."""
        flipped, total = 0.0, 0
        for layer, base, rounding in self.adaround:
            flipped += rounding.flipped_fraction(layer.weight) * layer.weight.numel()
            total += layer.weight.numel()
            with torch.no_grad():
                layer.weight.copy_(rounding.hard_weight())
            layer.weight_quantizer = base
            layer.freeze_weight()
        for layer in self.frozen_for_speed:
            layer.unfreeze_weight()
        for quantizer in self.activations:
            quantizer.freeze_scale()
            quantizer.quantize_prob = 1.0
            quantizer.generator = None
        return flipped / total if total else None


def sample_order(num_samples: int, iterations: int, seed: int) -> list[int]:
    """The calibration sample of each training step: uniform draws with replacement, seeded."""
    return torch.randint(num_samples, (iterations,), generator=torch.Generator().manual_seed(seed)).tolist()


def _train(unit: Unit, root: nn.Module, cache: UnitCache, order: Sequence[int], pieces: _LearnablePieces,
           generator: torch.Generator, log_every: int, progress: bool, cuda_graphs: bool) -> tuple[float, float]:
    """The optimisation loop of one unit, step k on cache entry order[k]; returns the mean loss of
    the first and last logging window."""
    config = unit.config
    optimisation = UnitOptimisation(pieces.rounding_parameters(), pieces.scales, pieces.regularizer, config,
                                    cache.device)
    step_fn = UnitStep(unit, root, optimisation.params, config.quantize_prob, generator, cache.device, cuda_graphs,
                       update=optimisation.update)
    running = torch.zeros((), device=cache.device)
    window, first_loss, last_loss = 0, float("nan"), float("nan")
    bar = tqdm(order, desc=phase(unit.name), disable=not progress, leave=False)
    for step, index in enumerate(bar):
        loss, _ = step_fn(cache.get(index), regularize=optimisation.prepare(step))
        optimisation.finish_step()
        running += loss
        window += 1
        if window == log_every or step == config.iterations - 1:
            last_loss = float(running) / window
            if math.isnan(first_loss):
                first_loss = last_loss
            bar.set_postfix(loss=f"{last_loss:.4g}")
            running.zero_()
            window = 0
    optimisation.release()
    return first_loss, last_loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruct_unit(unit: Unit, qmodel: nn.Module, fp_model: nn.Module, samples: Sequence[Any],
                     settings: ReconstructionSettings, seed: int, progress: bool) -> UnitReport:
    """Capture, train and finish one unit (see the module docstring)."""
    device = next(qmodel.parameters()).device
    seed_u = unit_seed(seed, unit.name)
    order = sample_order(len(samples), unit.config.iterations, seed_u)
    used = sorted(set(order))  # only the samples the steps draw are captured
    start = time.perf_counter()
    cache = build_cache(unit, qmodel, fp_model, [samples[i] for i in used], settings.forward, device,
                        settings.cache, settings.cache_memory_fraction)
    _synchronize(device)
    capture_s = time.perf_counter() - start
    entry_of = {sample: entry for entry, sample in enumerate(used)}
    generator = torch.Generator(device=device).manual_seed(seed_u)
    pieces = _LearnablePieces(qmodel, unit, generator)
    first_loss = last_loss = float("nan")
    start = time.perf_counter()
    try:
        if pieces.trainable and unit.config.iterations > 0:
            window = max(1, min(settings.log_every, unit.config.iterations // 10))
            first_loss, last_loss = _train(unit, qmodel.get_submodule(unit.root), cache,
                                           [entry_of[i] for i in order], pieces, generator, window, progress,
                                           settings.cuda_graphs)
        else:
            log.info("unit %s has nothing to train; skipped", unit.name)
    finally:
        flipped = pieces.finish()
    _synchronize(device)
    return UnitReport(unit.name, unit.config.iterations if pieces.trainable else 0, capture_s,
                      time.perf_counter() - start, first_loss, last_loss, flipped, cache.on_device,
                      cache.nbytes)


def reconstruct(units: Sequence[Unit], qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet,
                settings: ReconstructionSettings, seed: int = 0,
                progress: bool = True, on_unit_done: Callable[[Unit, UnitReport], None] | None = None
                ) -> list[UnitReport]:
    """Reconstruct `units` in order (see the module docstring); returns one report per unit.

    qmodel: the quantized model, every site of the units already set (ranges, modes); it is
    changed in place. fp_model: the reference. calib: the calibration samples (on the models'
    device). `on_unit_done(unit, report)` runs after each unit (e.g. to update the reference).
    Parameters of `qmodel` keep their `requires_grad` flags after the call.
    """
    samples = _limit_prompts(calib.samples, settings.max_prompts, seed)
    flags = {param: param.requires_grad for param in qmodel.parameters()}
    for param in flags:
        param.requires_grad_(False)
    reports = []
    try:
        for unit in tqdm(units, desc=phase("reconstruction"), disable=not progress):
            report = reconstruct_unit(unit, qmodel, fp_model, samples, settings, seed, progress)
            log.info("unit %s: loss %.4g -> %.4g in %d steps (%.1f s train, %.1f s capture)%s", report.name,
                     report.first_loss, report.last_loss, report.iterations, report.train_s, report.capture_s,
                     "" if report.flipped is None else f", {100 * report.flipped:.2f}% weights flipped")
            reports.append(report)
            if on_unit_done is not None:
                on_unit_done(unit, report)
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return reports
