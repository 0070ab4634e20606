"""`brecq` and `brecq-fisher` (Li et al., ICLR 2021); card: methods/brecq.md.

`brecq` is BRECQ as the PTQ4SAM codebase runs it on SAM (its `--brecq` flag): per-channel MSE
weight ranges and AvgMinMax activation ranges, then AdaRound on the weights of every SAM unit
with the activation quantizers off and the plain reconstruction loss; the unit input is still
mixed as QDrop mixes it, `where(U < 0.5, quantized-model input, FP input)` per element (the
reference sets its drop probability 0.5 whatever the flag: PTQ4SAM `ptq4sam/solver/recon.py`,
`reconstruction`). The activation quantizers come back on at their AvgMinMax ranges afterwards.

`brecq-fisher` is the paper's version: unit inputs from the quantized model only (no mixing),
the unit loss is the squared error weighted by the Fisher diagonal `(|dKL(fp || q)/dz| + 1)^2`
(z: the unit output, gradient taken once per calibration image with the model quantized up to
and including the unit and FP after it), and a second pass learns the activation scales (LSQ,
5,000 steps, Adam 4e-4 with cosine decay, |error|^2.4 loss) with the weights frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptqbench.config import BitSpec
from ptqbench.errors import ConfigError
from ptqbench.methods.base import METHODS
from ptqbench.methods.mse import FAST_WEIGHT_RANGES
from ptqbench.methods.options import check_at_least
from ptqbench.methods.qdrop import initial_ranges
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.quant.mse_search import MSE_NUM_RANGES
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites
from ptqbench.recon.engine import ReconstructionSettings, reconstruct
from ptqbench.recon.unit import HookPoint, Unit, UnitConfig, lp_error, weighted_squared_error

FISHER_KEY = "fisher_weight"
ACTIVATION_STAGE_P = 2.4
REFERENCE_QUANTIZE_PROB = 0.5


@dataclass(frozen=True)
class BrecqConfig:
    """BRECQ's settings. fisher: the Fisher-diagonal loss; activation_stage: the second pass
    learning activation scales; mixed_inputs: mix each unit input 50/50 with the FP one (False:
    quantized-model inputs only); iterations / activation_iterations: steps per unit of the
    AdaRound pass and of the activation pass; weight_ranges: the MSE weight grid's ranges."""

    fisher: bool = False
    activation_stage: bool = False
    mixed_inputs: bool = True
    iterations: int = 20_000
    activation_iterations: int = 5_000
    weight_ranges: int = MSE_NUM_RANGES

    def __post_init__(self) -> None:
        check_at_least(self, 1, "iterations", "activation_iterations", "weight_ranges")


FAST_STEPS = {"iterations": 50, "activation_iterations": 25, "weight_ranges": FAST_WEIGHT_RANGES}


def brecq_config(iterations: int, quantize_prob: float = REFERENCE_QUANTIZE_PROB) -> UnitConfig:
    """AdaRound only (Adam 1e-3, lambda 0.01, beta 20 -> 2 after 20 %), unit inputs mixed with
    `quantize_prob` (1: quantized-model inputs only), for `iterations` steps."""
    return UnitConfig(iterations=iterations, adaround=True, learn_scales=False,
                      weight_lr=1e-3, reg_lambda=0.01, beta_start=20.0, beta_end=2.0, warmup=0.2,
                      quantize_prob=quantize_prob)


def activation_stage_config(iterations: int) -> UnitConfig:
    """BRECQ's second pass: LSQ scales only (Adam 4e-4, cosine), weights fixed, for `iterations` steps."""
    return UnitConfig(iterations=iterations, adaround=False, learn_scales=True,
                      scale_lr=4e-4, reg_lambda=0.0, quantize_prob=1.0)


def mask_kl(fp_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(fp || q) of the per-pixel Bernoulli mask distributions, summed over pixels, mean over
    prompts. Logits [N, 1, h, w]. (A softmax over SAM's single mask channel would be constant.)"""
    target = torch.sigmoid(fp_logits)
    cross = F.binary_cross_entropy_with_logits(q_logits, target, reduction="sum")
    entropy = F.binary_cross_entropy_with_logits(fp_logits, target, reduction="sum")
    return (cross - entropy) / q_logits.shape[0]


class FisherWeights:
    """Extras provider of one unit: {FISHER_KEY: (|dKL/dz| + 1)^2}, z the unit output (its shape).

    output: where z appears in the forward; later: module paths of the units after this one,
    whose quantizers are switched off while the gradient is taken.
    """

    def __init__(self, output: HookPoint, later: Sequence[str]) -> None:
        self.output = output
        self.later = tuple(later)

    def __call__(self, qmodel: nn.Module, fp_model: nn.Module, sample: CalibrationSample) -> dict[str, Tensor]:
        with torch.no_grad():
            fp_logits, _ = adapter_for(fp_model).forward(fp_model, sample)
        later = {id(q): q for path in self.later for q in qmodel.get_submodule(path).modules()
                 if isinstance(q, FakeQuantizer)}
        modes = {key: q.mode for key, q in later.items()}
        found: dict[str, Tensor] = {}
        module = qmodel.get_submodule(self.output.path)

        def keep(args: tuple, kwargs: dict, out: object) -> None:
            found.update(self.output.take(args, kwargs, out))

        handle = (module.register_forward_pre_hook(lambda m, a, k: keep(a, k, None), with_kwargs=True)
                  if self.output.when == "pre" else
                  module.register_forward_hook(lambda m, a, k, o: keep(a, k, o), with_kwargs=True))
        try:
            for q in later.values():
                q.mode = "off"
            with torch.enable_grad():
                kl = mask_kl(fp_logits, adapter_for(qmodel).forward_with_graph(qmodel, sample))
                (grad,) = torch.autograd.grad(kl, found["output"])
        finally:
            handle.remove()
            for key, q in later.items():
                q.mode = modes[key]
        return {FISHER_KEY: (grad.abs() + 1.0).square()}


def with_fisher_loss(units: Sequence[Unit]) -> list[Unit]:
    """The same units with the Fisher-weighted squared error (weights computed per image)."""
    fisher_units = []
    for index, unit in enumerate(units):
        if unit.output is None:
            raise ConfigError(f"unit {unit.name} has no output hook point; the Fisher loss needs one")
        later = [path for other in units[index + 1:] for path in other.trained]
        fisher_units.append(replace(unit, loss=weighted_squared_error(unit.sum_dim, FISHER_KEY),
                                    extras=FisherWeights(unit.output, later)))
    return fisher_units


@METHODS.register("brecq")
class Brecq:
    """BRECQ on SAM's units (`BrecqConfig`). The defaults are the PTQ4SAM codebase's run; fisher
    and activation_stage on, mixed_inputs off = `brecq-fisher`."""

    name = "brecq"
    presets = {"paper": BrecqConfig(), "fast": BrecqConfig(**FAST_STEPS)}

    def __init__(self, config: BrecqConfig | None = None, *, progress: bool = True) -> None:
        self.config = config if config is not None else self.presets["paper"]
        self.progress = progress

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        config = self.config
        initial_ranges(qmodel, calib, config.weight_ranges, progress=self.progress)
        activations = [q for q in quantizer_sites(qmodel).values() if not q.is_weight and q.mode == "quantize"]
        for quantizer in activations:
            quantizer.mode = "off"
        quantize_prob = REFERENCE_QUANTIZE_PROB if config.mixed_inputs else 1.0
        adapter = adapter_for(qmodel)
        settings = ReconstructionSettings(forward=adapter.forward)
        units = adapter.reconstruction_units(qmodel, brecq_config(config.iterations, quantize_prob))
        reconstruct(with_fisher_loss(units) if config.fisher else units, qmodel, fp_model, calib, settings,
                    seed, self.progress)
        for quantizer in activations:
            quantizer.mode = "quantize"
        if config.activation_stage:
            stage_config = activation_stage_config(config.activation_iterations)
            stage = [replace(unit, loss=lp_error(unit.sum_dim, ACTIVATION_STAGE_P))
                     for unit in adapter.reconstruction_units(qmodel, stage_config)]
            reconstruct(stage, qmodel, fp_model, calib, settings, seed + 1, self.progress)


PAPER_FISHER = BrecqConfig(fisher=True, activation_stage=True, mixed_inputs=False)


@METHODS.register("brecq-fisher")
class BrecqFisher(Brecq):
    """BRECQ as in the paper: quantized-model unit inputs, Fisher-diagonal loss, then the
    activation-scale pass."""

    name = "brecq-fisher"
    presets = {"paper": PAPER_FISHER, "fast": replace(PAPER_FISHER, **FAST_STEPS)}
