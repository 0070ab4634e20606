"""Prompt-Aware Reconstruction (PAR, SAQ-SAM, methods/saqsam.md) on the shared reconstruction engine.

PAR is a QDrop-style reconstruction (AdaRound weights + LSQ activation scales + drop 0.5, via
`ptqbench.recon.engine.reconstruct`) with its own units and losses:

- encoder stages: one unit per stage, the blocks up to and including each global-attention block
  (SAM-B: 4 stages of 3 blocks; sam_tiny: 2 of 3). The loss is prompt-aware: the stage output
  goes through the FP neck and the FP mask-decoder TwoWayTransformer with the calibration image's
  prompt tokens and dense PE, and the image tokens that come out (the transformer's "keys"
  output, [N, HW, 256]) are compared: `mean over prompts and tokens of sum over channels
  (T_hat - T)^2`. Layer skipping: the later stages never run while stage k trains (not even
  while its inputs are captured: the capture forward encodes the prompts first and stops at the
  stage's first block), the stage-k token grid goes straight into the FP neck and decoder;
- the neck: plain output MSE;
- each two-way decoder layer: `beta * (0.01 * ||queries error||^2 + ||keys error||^2)
  + alpha * ||error of the transformer's final token output||^2`. The queries and keys are the
  layer's output on its QDrop-mixed input. The final tokens come from the unmixed path, as the
  reference computes them (SAQ-SAM `ptq4sam/solver/recon.py`, `reconstruction_MD`): its
  quantized-so-far decoder run on the quantized image embedding, i.e. this layer (quantizing,
  with its drops) on its unmixed quantized-model input, then the rest of the transformer in FP
  (later layers, final token-to-image attention and its norm; the reference has their quantizers
  off while the layer trains). Targets: the FP decoder fed the quantized image embedding;
- the final token-to-image attention: its bare `out_proj` output (the reference reconstructs that
  module on its own, inputs q, k, v mixed), plain output MSE.
All of PAR's losses sum over the last dim (channels, or the width of the neck's NCHW output) and
average over the rest, as the reference's `lp_loss`.

Sequential targets (as the reference): each reconstructed encoder stage and then the
reconstructed neck are copied into the FP reference, so stage k + 1 is trained against the FP
stage run on the quantized prefix, and the decoder targets are the FP decoder fed the quantized
image embedding. The reference is a private copy: the caller's FP model is never changed.
Every module of the reference is frozen (no gradient reaches the FP neck or decoder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ptqbench.models.adapter import ModelAdapter, PromptAwareConfigs, PromptAwareUnits, adapter_for
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.recon.engine import ReconstructionSettings, UnitReport, reconstruct
from ptqbench.recon.unit import LossFn, Output, Tensors, Unit, UnitConfig

PAR_SUM_DIM = -1


@dataclass(frozen=True)
class ParSettings:
    """PAR's hyperparameters (defaults: the reference's, i.e. the `paper` preset).

    *_iterations: optimisation steps per encoder stage, for the neck, per decoder layer and for
    the final token-to-image attention. max_prompts: at most this many random box prompts per
    calibration image (seeded; the same subset for every unit). scale_lr: Adam on the LSQ scales
    (cosine to 0); weight_lr: Adam on AdaRound's V; reg_lambda: the AdaRound regulariser's weight
    (0 in the reference: disabled); quantize_prob: QDrop's p. alpha, beta, query_weight: the
    decoder-layer loss `beta * (query_weight * q_err + k_err) + alpha * final_err`.
    """

    stage_iterations: int = 2_000
    neck_iterations: int = 2_000
    decoder_iterations: int = 2_000
    final_iterations: int = 10_000
    max_prompts: int | None = 16
    scale_lr: float = 2e-3
    weight_lr: float = 1e-3
    reg_lambda: float = 0.0
    quantize_prob: float = 0.5
    alpha: float = 1.0
    beta: float = 1.0
    query_weight: float = 0.01

    def unit_config(self, iterations: int) -> UnitConfig:
        """The engine settings of one PAR unit trained for `iterations` steps."""
        return UnitConfig(iterations=iterations, adaround=True, learn_scales=True, weight_lr=self.weight_lr,
                          scale_lr=self.scale_lr, reg_lambda=self.reg_lambda, quantize_prob=self.quantize_prob)


PAPER_SETTINGS = ParSettings()
# The `fast` preset: 1/100 of the steps, at most 4 prompts per image (PAR on sam_tiny with 32
# images takes under a minute on one CPU core).
FAST_SETTINGS = ParSettings(stage_iterations=20, neck_iterations=20, decoder_iterations=20, final_iterations=100,
                            max_prompts=4)


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    """(output - target)^2 summed over the last (channel) dim, mean over the rest."""
    return (output - target).square().sum(dim=-1).mean()


def par_decoder_loss(alpha: float = 1.0, beta: float = 1.0, query_weight: float = 0.01) -> LossFn:
    """PAR's decoder-layer loss on outputs (queries, keys, final tokens) and their targets:
    `beta * (query_weight * err(queries) + err(keys)) + alpha * err(final tokens)`."""

    def loss(output: Output, target: Output, extras: Tensors) -> Tensor:
        (queries, keys, tokens), (t_queries, t_keys, t_tokens) = output, target
        return (beta * (query_weight * squared_error(queries, t_queries) + squared_error(keys, t_keys))
                + alpha * squared_error(tokens, t_tokens))

    return loss


def frozen_reference(fp_model: nn.Module) -> nn.Module:
    """A private copy of the FP model with every parameter frozen (eval mode)."""
    reference = copy.deepcopy(fp_model).eval()
    reference.requires_grad_(False)
    return reference


def par_unit_groups(qmodel: nn.Module, reference: nn.Module,
                    settings: ParSettings = PAPER_SETTINGS) -> PromptAwareUnits:
    """PAR's units of `qmodel` from its model adapter (`prompt_aware_units`; SAM-1's in
    `ptqbench/models/sam1/prompt_aware_units.py`), configured by `settings`.

    reference: the frozen FP reference (`frozen_reference`) whose later modules the stage and
    decoder-layer losses run through.
    """
    configs = PromptAwareConfigs(
        stage=settings.unit_config(settings.stage_iterations),
        neck=settings.unit_config(settings.neck_iterations),
        decoder=settings.unit_config(settings.decoder_iterations),
        final=settings.unit_config(settings.final_iterations),
        decoder_loss=par_decoder_loss(settings.alpha, settings.beta, settings.query_weight),
        sum_dim=PAR_SUM_DIM)
    return adapter_for(qmodel).prompt_aware_units(qmodel, reference, configs)


def par_units(qmodel: nn.Module, reference: nn.Module, settings: ParSettings = PAPER_SETTINGS) -> list[Unit]:
    """PAR's units in training order: encoder stages, neck, decoder layers, final attention."""
    groups = par_unit_groups(qmodel, reference, settings)
    return groups.image_side + groups.prompt_side


class CopyIntoReference:
    """`on_unit_done` callback: once a unit whose name is in `unit_names` is reconstructed, its
    trained modules (quantizers, hard-rounded weights) are copied into `reference` in place of
    the FP ones, frozen (sequential targets)."""

    def __init__(self, qmodel: nn.Module, reference: nn.Module, unit_names: set[str]) -> None:
        self.qmodel = qmodel
        self.reference = reference
        self.unit_names = set(unit_names)

    def __call__(self, unit: Unit, report: UnitReport) -> None:
        if unit.name not in self.unit_names:
            return
        for path in unit.trained:
            module = copy.deepcopy(self.qmodel.get_submodule(path))
            module.requires_grad_(False)
            self.reference.set_submodule(path, module)


def par_reconstruct(qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet,
                    settings: ParSettings = PAPER_SETTINGS, seed: int = 0, *,
                    progress: bool = True) -> list[UnitReport]:
    """Run PAR on `qmodel` (every site already set, e.g. by PCC and the statistics step).

    Encoder stages and the neck are copied into a frozen copy of `fp_model` once reconstructed
    (sequential targets); `fp_model` itself is not changed. The prompt-side units then capture
    their inputs from each model's image embeddings, computed once (`EncodedImages`). Returns the
    engine's unit reports.
    """
    reference = frozen_reference(fp_model)
    units = par_unit_groups(qmodel, reference, settings)
    engine = engine_settings(qmodel, settings)
    reports = reconstruct(units.image_side, qmodel, reference, calib, engine, seed, progress,
                          on_unit_done=CopyIntoReference(qmodel, reference, {unit.name for unit in units.image_side}))
    encoded = EncodedImages(adapter_for(qmodel))
    return reports + reconstruct(units.prompt_side, qmodel, reference, calib, replace(engine, forward=encoded.forward),
                                 seed, progress)


class EncodedImages:
    """The calibration forward of PAR's prompt-side units: each model's image embedding of each
    calibration image is computed once (without gradients) and the forward runs on from it
    (`ModelAdapter.forward_from_embedding`). Once the image side is reconstructed and copied into
    the reference, neither model's image encoder changes, so every later unit would compute the
    same embedding again; the prompt-side units capture their inputs in the decoder."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self._kept: dict[tuple[int, int], tuple[nn.Module, Tensor, Tensor]] = {}

    def forward(self, model: nn.Module, sample: CalibrationSample) -> object:
        key = (id(model), id(sample.image))  # the model and image are kept with it: the ids stay theirs
        if key not in self._kept:
            with torch.no_grad():
                self._kept[key] = (model, sample.image, self.adapter.image_embedding(model, sample))
        return self.adapter.forward_from_embedding(model, self._kept[key][2], sample)


def engine_settings(qmodel: nn.Module, settings: ParSettings) -> ReconstructionSettings:
    """The engine-wide settings of PAR: the prompt limit and the model's calibration forward (SAM-1's
    encodes the prompts first, which layer skipping relies on)."""
    return ReconstructionSettings(forward=adapter_for(qmodel).forward, max_prompts=settings.max_prompts)


def with_iterations(settings: ParSettings, iterations: int) -> ParSettings:
    """The same settings with every unit trained for `iterations` steps (timing runs, tests)."""
    return replace(settings, stage_iterations=iterations, neck_iterations=iterations,
                   decoder_iterations=iterations, final_iterations=iterations)
