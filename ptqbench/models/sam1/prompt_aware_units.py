"""SAM-1's units for Prompt-Aware Reconstruction (PAR, SAQ-SAM; the algorithm is
`ptqbench.methods.saqsam.par`): the encoder stages trained through the FP neck and the FP
decoder transformer, the neck, the two-way decoder layers with the final-token path, and the final
token-to-image attention. Every restatement of SAM's forward that PAR needs is here, beside its
bit-equality tests (`tests/test_par.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptqbench.models.adapter import PromptAwareConfigs, PromptAwareUnits
from ptqbench.models.sam1.attention_groups import encoder_stages
from ptqbench.models.sam1.units import (
    ENCODER_BLOCKS,
    FINAL_ATTENTION,
    TRANSFORMER,
    attention_unit,
    first_argument,
    neck_unit,
)
from ptqbench.recon.cache import capture
from ptqbench.recon.unit import HookPoint, LossFn, Tensors, Unit, UnitConfig, lp_error, unmixed

_LAYER_ARGS = ("queries", "keys", "query_pe", "key_pe")


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


def stage_unit(reference: nn.Module, stage: tuple[int, ...], image_pe: Tensor, config: UnitConfig,
               loss: LossFn) -> Unit:
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
        run=run, loss=loss, config=config, shared_inputs=frozenset({"sparse", "dense"}))


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


def prompt_aware_units(qmodel: nn.Module, reference: nn.Module, configs: PromptAwareConfigs) -> PromptAwareUnits:
    """PAR's units of `qmodel`: one per encoder stage (`encoder_stages`), the neck, one per two-way
    decoder layer, the final token-to-image attention.

    reference: PAR's frozen FP reference, whose neck and decoder the stage and decoder-layer units
    run through.
    """
    with torch.no_grad():
        image_pe = reference.prompt_encoder.get_dense_pe()
    stage_loss = lp_error(configs.sum_dim)
    image_side = [stage_unit(reference, stage, image_pe, configs.stage, stage_loss) for stage in encoder_stages(qmodel)]
    image_side.append(neck_unit(configs.neck, configs.sum_dim))
    prompt_side = [decoder_layer_unit(reference, index, configs.decoder_loss, configs.decoder)
                   for index in range(len(qmodel.mask_decoder.transformer.layers))]
    prompt_side.append(attention_unit(FINAL_ATTENTION, configs.final, configs.sum_dim))
    return PromptAwareUnits(image_side, prompt_side)
