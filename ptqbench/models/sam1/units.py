"""SAM's reconstruction units (methods/qdrop.md), as the PTQ4SAM reference code reconstructs them.

A unit is one quantized module, reconstructed on its bare output: no residual, no LayerNorm.
Units, in forward order:
- every image-encoder block gives two: its attention `attn` (input: the block's `norm1` output,
  window-partitioned in windowed blocks, [B * nW, ws, ws, C], or [B, H, W, C] in global blocks;
  output: the `proj` output, same shape) and its MLP `mlp` (input: the `norm2` output
  [B, H, W, C]; output: the `lin2` output, same shape);
- the encoder neck (input [B, C, H, W] -> image embedding [B, 256, H, W]);
- every two-way layer of the mask-decoder transformer gives four: `self_attn`,
  `cross_attn_token_to_image`, `mlp` and `cross_attn_image_to_token`; an attention's inputs are
  the q, k, v its layer passes it (q and k with the positional encodings already added where the
  layer adds them: self-attention q = k = queries + query_pe, v = queries, or all three the raw
  queries in the first layer; token-to-image q = queries + query_pe [N, T, C], k = keys + key_pe
  [N, HW, C], v = keys; image-to-token q = keys + key_pe, k = queries + query_pe, v = queries),
  its output the `out_proj` output; the MLP's input is the queries [N, T, C], its output the
  `lin2` output;
- the transformer's `final_attn_token_to_image` (q = queries + query_pe, k = keys + key_pe,
  v = keys; output [N, T, C]).
SAM-B / L / H have 12 / 24 / 32 encoder blocks: 34 / 58 / 74 units.

Every input is read by a pre-hook on the unit's own module, so it is exactly what that module
receives in a whole-model forward, and QDrop mixes each one (q, k and v separately) with its own
random draw. The loss is the reference's: squared error summed over tensor dim 1 and averaged
over the other dims (`REFERENCE_SUM_DIM`; dim 1 is the window or image row of the encoder
outputs, the token dim of the decoder outputs, the channel dim of the neck output).

Reference: PTQ4SAM `ptq4sam/model/quant_model.py` (the reconstructed block modules and their
forwards), `ptq4sam/solver/test_quant.py` (`recon_model`: which modules, in which order) and
`ptq4sam/solver/recon.py` (capture at the module, input mixing, `lp_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

from segment_anything.modeling import Sam
from torch import Tensor, nn

from ptqbench.recon.unit import HookPoint, Take, Tensors, Unit, UnitConfig, lp_error

ENCODER_BLOCKS = "image_encoder.blocks"
NECK = "image_encoder.neck"
TRANSFORMER = "mask_decoder.transformer"
FINAL_ATTENTION = f"{TRANSFORMER}.final_attn_token_to_image"
DECODER_SUBBLOCKS = ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")
REFERENCE_SUM_DIM = 1
_ATTENTION_ARGS = ("q", "k", "v")


# Hook takes: (args, kwargs, output) -> named tensors.

def first_argument(name: str) -> Take:
    """The module's first argument under `name`."""
    return lambda args, kwargs, output: {name: args[0]}


def module_output(name: str) -> Take:
    """The module's output under `name` (post hooks)."""
    return lambda args, kwargs, output: {name: output}


def attention_arguments(args: tuple, kwargs: dict, output: object) -> dict[str, Tensor]:
    """The q, k, v of a mask-decoder attention call, positional or keyword."""
    bound = dict(zip(_ATTENTION_ARGS, args))
    bound.update(kwargs)
    return {name: bound[name] for name in _ATTENTION_ARGS}


# Unit forwards: (the unit's module, inputs) -> output.

def _run_on_x(module: nn.Module, inputs: Tensors) -> Tensor:
    return module(inputs["x"])


def _run_attention(attention: nn.Module, inputs: Tensors) -> Tensor:
    return attention(q=inputs["q"], k=inputs["k"], v=inputs["v"])


def _module_unit(path: str, take: Take, run: Callable[[nn.Module, Tensors], Tensor], config: UnitConfig,
                 sum_dim: int) -> Unit:
    """The unit of the module at `path`: inputs its own arguments (`take` at a pre-hook), output
    its own output, loss the squared error summed over `sum_dim`."""
    return Unit(name=path, root=path, trained=(path,), inputs=(HookPoint(path, "pre", take),), run=run,
                loss=lp_error(sum_dim), config=config, sum_dim=sum_dim,
                output=HookPoint(path, "post", module_output("output")))


def single_input_unit(path: str, config: UnitConfig, sum_dim: int = REFERENCE_SUM_DIM) -> Unit:
    """The unit of a module called with one tensor x (encoder attention, MLP, neck)."""
    return _module_unit(path, first_argument("x"), _run_on_x, config, sum_dim)


def attention_unit(path: str, config: UnitConfig, sum_dim: int = REFERENCE_SUM_DIM) -> Unit:
    """The unit of a mask-decoder attention: inputs q, k, v as its caller passes them, output the
    `out_proj` output."""
    return _module_unit(path, attention_arguments, _run_attention, config, sum_dim)


def encoder_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Two units per encoder block (attention, MLP), in order."""
    units = []
    for index in range(len(model.image_encoder.blocks)):
        block = f"{ENCODER_BLOCKS}.{index}"
        units += [single_input_unit(f"{block}.attn", config), single_input_unit(f"{block}.mlp", config)]
    return units


def neck_unit(config: UnitConfig, sum_dim: int = REFERENCE_SUM_DIM) -> Unit:
    """The encoder neck: input [B, C, H, W] -> image embedding [B, 256, H, W]."""
    return single_input_unit(NECK, config, sum_dim)


def decoder_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Four units per two-way layer, then the final token-to-image attention, in order."""
    units = []
    for index in range(len(model.mask_decoder.transformer.layers)):
        layer = f"{TRANSFORMER}.layers.{index}"
        units += [single_input_unit(f"{layer}.{name}", config) if name == "mlp"
                  else attention_unit(f"{layer}.{name}", config) for name in DECODER_SUBBLOCKS]
    units.append(attention_unit(FINAL_ATTENTION, config))
    return units


def sam_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Every BRECQ/QDrop unit of `model` in forward order (34 / 58 / 74 for SAM-B / L / H), each
    trained with `config` and the reference's reconstruction loss."""
    return encoder_units(model, config) + [neck_unit(config)] + decoder_units(model, config)
