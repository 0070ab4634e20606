"""What a reconstruction unit is: the description the reconstruction engine works from.

A unit is a piece of the model reconstructed on its own (a sub-block, a block, a stage...). It
says which modules' quantizers train, where its inputs appear in a whole-model forward (so the
engine can capture them with hooks), how to run it from those inputs, what it is compared with
and how. The engine (`ptqbench.recon.engine.reconstruct`) knows nothing else about the
model, so a method defines new units and losses without touching the engine.

Unit outputs and targets are a tensor or a tuple of tensors ("Output"); inputs and extras are
dicts of named tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

Output = Tensor | tuple[Tensor, ...]
Tensors = Mapping[str, Tensor]
LossFn = Callable[[Output, Output, Tensors], Tensor]
"""(output, target, extras) -> 0-d loss."""
Take = Callable[[tuple, dict, Any], dict[str, Tensor]]
"""(positional args, keyword args, module output or None for a pre-hook) -> named tensors."""


@dataclass(frozen=True)
class HookPoint:
    """A place in a whole-model forward where named tensors of a unit can be read.

    path: module path (`model.get_submodule(path)`); when: "pre" (before the module runs: `take`
    sees its arguments, output None) or "post" (after: `take` also sees its output).
    """

    path: str
    when: Literal["pre", "post"]
    take: Take


@dataclass(frozen=True)
class UnitConfig:
    """How one unit is trained.

    iterations: optimisation steps (one calibration image per step).
    adaround: learn the rounding of every weight in the trained modules (else weights keep their
        current quantizer, round-to-nearest).
    learn_scales: LSQ on the scales of every activation quantizer in quantize mode in the
        trained modules (uniform and log2 grids alike).
    weight_lr: Adam learning rate on AdaRound's V. scale_lr: Adam learning rate on the
        activation scales, cosine-decayed to 0 over the iterations.
    reg_lambda: weight of the AdaRound regulariser (0 switches it off); beta_start -> beta_end:
        its exponent, annealed linearly after `warmup` (a fraction of the iterations, during
        which the regulariser is 0).
    quantize_prob: QDrop's probability of using the quantized value, per element, for the unit
        input (`where(U < p, quantized input, FP input)`) and inside every activation quantizer
        of the unit; 1 means always quantized (no drop). Reset to 1 when the unit ends.
    """

    iterations: int
    adaround: bool = True
    learn_scales: bool = True
    weight_lr: float = 1e-3
    scale_lr: float = 4e-5
    reg_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    quantize_prob: float = 0.5


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit.

    name: a readable id (progress bars, logs, the per-unit random seed).
    root: path of the module handed to `run` and `target` (resolved in each model; "" is the
        model itself).
    trained: paths of the modules whose quantizers train (AdaRound weights, LSQ scales, drop).
    inputs: where the unit's named inputs are captured; the forward stops once all have fired.
    run: (root module, inputs) -> output; the unit's own forward.
    loss: (output, target, extras) -> 0-d loss.
    config: the training settings.
    sum_dim: the output dim the unit's losses sum over (the others are averaged).
    output: where the unit's output appears in a whole-model forward, as {"output": tensor}
        (used by gradient-based losses and tests); None when it does not appear as one tensor.
    shared_inputs: inputs identical in both models (e.g. positional encodings): captured from
        the FP model only and never mixed.
    unmixed_inputs: `run` also gets every quantized-model input as captured, not mixed with the
        FP one, under `unmixed(name)` (e.g. a loss term computed on the unmixed path).
    target: (FP root, FP inputs, extras) -> target; default `run` on the FP model.
    extras: (quantized model, FP model, calibration sample) -> named tensors computed once per
        sample before training (e.g. loss weights); default none.
    """

    name: str
    root: str
    trained: tuple[str, ...]
    inputs: tuple[HookPoint, ...]
    run: Callable[[nn.Module, Tensors], Output]
    loss: LossFn
    config: UnitConfig
    sum_dim: int = -1
    output: HookPoint | None = None
    shared_inputs: frozenset[str] = field(default_factory=frozenset)
    unmixed_inputs: bool = False
    target: Callable[[nn.Module, Tensors, Tensors], Output] | None = None
    extras: Callable[[nn.Module, nn.Module, Any], dict[str, Tensor]] | None = None


def unmixed(name: str) -> str:
    """The key of input `name`, unmixed, in the inputs of a unit with `unmixed_inputs`."""
    return f"{name}.unmixed"


def with_unmixed(unit: Unit, inputs: Tensors, captured: Tensors) -> dict[str, Tensor]:
    """The inputs `unit.run` gets: `inputs` and, for a unit with `unmixed_inputs`, every tensor of
    `captured` (the unit's inputs in one model, as captured) under `unmixed(name)`."""
    full = dict(inputs)
    if unit.unmixed_inputs:
        full.update({unmixed(name): tensor for name, tensor in captured.items()})
    return full


def _pairs(output: Output, target: Output) -> list[tuple[Tensor, Tensor]]:
    if isinstance(output, Tensor):
        return [(output, target)]
    return list(zip(output, target, strict=True))


def lp_error(sum_dim: int, p: float = 2.0) -> LossFn:
    """`|output - target|^p` summed over `sum_dim`, mean over the other dims; a tuple output
    sums the terms of its elements. p = 2 is the plain reconstruction (MSE) loss."""

    def loss(output: Output, target: Output, extras: Tensors) -> Tensor:
        terms = []
        for out, tgt in _pairs(output, target):
            diff = (out - tgt).abs()
            terms.append((diff.square() if p == 2.0 else diff.pow(p)).sum(sum_dim).mean())
        return sum(terms[1:], terms[0])

    return loss


def weighted_squared_error(sum_dim: int, weight_key: str) -> LossFn:
    """`w * (output - target)^2` summed over `sum_dim`, mean over the rest, with the weight
    `extras[weight_key]` (shape of the output; e.g. BRECQ's Fisher diagonal). Tensor outputs only."""

    def loss(output: Output, target: Output, extras: Tensors) -> Tensor:
        return (extras[weight_key] * (output - target).square()).sum(sum_dim).mean()

    return loss
