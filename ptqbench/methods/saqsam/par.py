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

from ptqbench.models.calibration import CalibrationSet
from ptqbench.models.sam1.attention_groups import encoder_stages
from ptqbench.models.sam1.calibration import sample_forward
from ptqbench.models.sam1.units import (
    ENCODER_BLOCKS,
    FINAL_ATTENTION,
    TRANSFORMER,
    attention_unit,
    first_argument,
    neck_unit,
)
from ptqbench.recon.cache import capture
from ptqbench.recon.engine import ReconstructionSettings, UnitReport, reconstruct
from ptqbench.recon.unit import HookPoint, LossFn, Output, Tensors, Unit, UnitConfig, lp_error, unmixed

PAR_SUM_DIM = -1
_LAYER_ARGS = ("queries", "keys", "query_pe", "key_pe")


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


def prompt_embeddings(args: tuple, kwargs: dict, output: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The prompt encoder's output: sparse [N, 2, 256] (box corners) and dense [N, 256, h, w]."""
    return {"sparse": output[0], "dense": output[1]}


def transformer_keys(decoder: nn.Module, embedding: Tensor, image_pe: Tensor, sparse: Tensor,
                     dense: Tensor) -> Tensor:
    """The image tokens ("keys" output, [N, HW, 256]) of the decoder's TwoWayTransformer.

    embedding: image embedding [1, 256, h, w]; image_pe [1, 256, h, w]; sparse [N, T, 256] and
    dense [N, 256, h, w] prompt embeddings. The decoder's own forward builds the tokens and the
    per-prompt image; it stops after the last two-way layer, whose keys the transformer returns
    unchanged (its final attention updates the tokens only). The autograd graph is kept.
    """
    last_layer = f"transformer.layers.{len(decoder.transformer.layers) - 1}"
    point = HookPoint(last_layer, "post", lambda args, kwargs, output: {"keys": output[1]})

    def forward(module: nn.Module, _: object) -> object:
        return module(image_embeddings=embedding, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                      dense_prompt_embeddings=dense, multimask_output=False)

    return capture(decoder, [point], forward, None, detach=False)["keys"]


def transformer_tail(transformer: nn.Module, start: int, queries: Tensor, keys: Tensor,
                     query_pe: Tensor, key_pe: Tensor) -> Tensor:
    """The final token output [N, T, 256] of `transformer` from the input of layer `start` on:
    layers start.., then the final token-to-image attention, its residual and norm (the arithmetic
    of TwoWayTransformer.forward). queries / query_pe [N, T, 256], keys / key_pe [N, HW, 256]."""
    for layer in transformer.layers[start:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out)


def layer_arguments(args: tuple, kwargs: dict, output: object) -> dict[str, Tensor]:
    """The queries [N, T, C], keys [N, HW, C], query_pe and key_pe of a TwoWayAttentionBlock call."""
    bound = dict(zip(_LAYER_ARGS, args))
    bound.update(kwargs)
    return {name: bound[name] for name in _LAYER_ARGS}


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


def stage_unit(reference: nn.Module, stage: tuple[int, ...], image_pe: Tensor, config: UnitConfig) -> Unit:
    """The PAR unit of one encoder stage (block indices `stage`), trained through the FP neck and
    FP decoder transformer of `reference`; output and target: image tokens [N, HW, 256]."""

    def run(blocks: nn.ModuleList, inputs: Tensors) -> Tensor:
        x = inputs["x"]
        for index in stage:
            x = blocks[index](x)
        embedding = reference.image_encoder.neck(x.permute(0, 3, 1, 2))
        return transformer_keys(reference.mask_decoder, embedding, image_pe, inputs["sparse"], inputs["dense"])

    return Unit(
        name=f"{ENCODER_BLOCKS}.{stage[0]}-{stage[-1]}", root=ENCODER_BLOCKS,
        trained=tuple(f"{ENCODER_BLOCKS}.{index}" for index in stage),
        inputs=(HookPoint("prompt_encoder", "post", prompt_embeddings),
                HookPoint(f"{ENCODER_BLOCKS}.{stage[0]}", "pre", first_argument("x"))),
        run=run, loss=lp_error(PAR_SUM_DIM), config=config, shared_inputs=frozenset({"sparse", "dense"}))


def decoder_layer_unit(reference: nn.Module, index: int, loss: LossFn, config: UnitConfig) -> Unit:
    """The PAR unit of two-way layer `index`: output (queries [N, T, C], keys [N, HW, C], final
    tokens [N, T, C]); queries and keys from the layer on its mixed input, the final tokens from
    the layer on its unmixed quantized-model input followed by the rest of `reference`'s FP
    transformer (the alpha term's path)."""

    def run(layer: nn.Module, inputs: Tensors) -> tuple[Tensor, Tensor, Tensor]:
        query_pe, key_pe = inputs["query_pe"], inputs["key_pe"]
        queries, keys = layer(queries=inputs["queries"], keys=inputs["keys"], query_pe=query_pe, key_pe=key_pe)
        plain_queries, plain_keys = layer(queries=inputs[unmixed("queries")], keys=inputs[unmixed("keys")],
                                          query_pe=query_pe, key_pe=key_pe)
        tokens = transformer_tail(reference.mask_decoder.transformer, index + 1, plain_queries, plain_keys,
                                  query_pe, key_pe)
        return queries, keys, tokens

    path = f"{TRANSFORMER}.layers.{index}"
    return Unit(name=path, root=path, trained=(path,), inputs=(HookPoint(path, "pre", layer_arguments),),
                run=run, loss=loss, config=config, shared_inputs=frozenset({"query_pe", "key_pe"}),
                unmixed_inputs=True)


def frozen_reference(fp_model: nn.Module) -> nn.Module:
    """A private copy of the FP model with every parameter frozen (eval mode)."""
    reference = copy.deepcopy(fp_model).eval()
    reference.requires_grad_(False)
    return reference


def par_units(qmodel: nn.Module, reference: nn.Module, settings: ParSettings = PAPER_SETTINGS) -> list[Unit]:
    """PAR's units in order: encoder stages, neck, decoder layers, final token-to-image attention.

    reference: the frozen FP reference (`frozen_reference`) whose neck and decoder the stage and
    decoder-layer losses run through.
    """
    with torch.no_grad():
        image_pe = reference.prompt_encoder.get_dense_pe()
    stage_config = settings.unit_config(settings.stage_iterations)
    units = [stage_unit(reference, stage, image_pe, stage_config) for stage in encoder_stages(qmodel)]
    units.append(neck_unit(settings.unit_config(settings.neck_iterations), PAR_SUM_DIM))
    decoder_loss = par_decoder_loss(settings.alpha, settings.beta, settings.query_weight)
    decoder_config = settings.unit_config(settings.decoder_iterations)
    units += [decoder_layer_unit(reference, index, decoder_loss, decoder_config)
              for index in range(len(qmodel.mask_decoder.transformer.layers))]
    units.append(attention_unit(FINAL_ATTENTION, settings.unit_config(settings.final_iterations), PAR_SUM_DIM))
    return units


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
    (sequential targets); `fp_model` itself is not changed. Returns the engine's unit reports.
    """
    reference = frozen_reference(fp_model)
    units = par_units(qmodel, reference, settings)
    encoder_side = {unit.name for unit in units if not unit.name.startswith(TRANSFORMER)}
    return reconstruct(units, qmodel, reference, calib, engine_settings(settings), seed, progress,
                       on_unit_done=CopyIntoReference(qmodel, reference, encoder_side))


def engine_settings(settings: ParSettings) -> ReconstructionSettings:
    """The engine-wide settings of PAR: the prompt limit and the prompts-first capture forward."""
    return ReconstructionSettings(forward=sample_forward, max_prompts=settings.max_prompts)


def with_iterations(settings: ParSettings, iterations: int) -> ParSettings:
    """The same settings with every unit trained for `iterations` steps (timing runs, tests)."""
    return replace(settings, stage_iterations=iterations, neck_iterations=iterations,
                   decoder_iterations=iterations, final_iterations=iterations)
