"""SAM's reconstruction units (methods.md section 3): the sub-blocks BRECQ and QDrop reconstruct.

Units, in forward order:
- every image-encoder block gives two: its attention sub-block
  `x + unpartition(attn(partition(norm1(x))))` and its MLP sub-block `x + mlp(norm2(x))`;
- the encoder neck (both convs and LayerNorms);
- every two-way layer of the mask-decoder transformer gives four: `self_attn`,
  `cross_attn_token_to_image`, `mlp` and `cross_attn_image_to_token`, each with its residual
  and LayerNorm;
- the transformer's `final_attn_token_to_image` with its residual and LayerNorm.
SAM-B / L / H have 12 / 24 / 32 encoder blocks: 34 / 58 / 74 units.

The sub-block forwards below call the modules' own pieces in the order of segment_anything's
`Block.forward`, `TwoWayAttentionBlock.forward` and `TwoWayTransformer.forward`, so chaining
them reproduces those forwards exactly (tested bit for bit). Unit inputs are read at hooks on
the same modules; the tensor shapes are: encoder x [B, H, W, C]; neck input [B, C, H, W];
decoder queries / query_pe [N, T, 256], keys / key_pe [N, HW, 256] (N boxes of one image).
"""

from __future__ import annotations

from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import Tensor, nn

from ptqbench.quant.unit import HookPoint, Take, Tensors, Unit, UnitConfig, lp_error

ENCODER_BLOCKS = "image_encoder.blocks"
NECK = "image_encoder.neck"
TRANSFORMER = "mask_decoder.transformer"
DECODER_SUBBLOCKS = ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")
_LAYER_ARGS = ("queries", "keys", "query_pe", "key_pe")
_TRANSFORMER_ARGS = ("image_embedding", "image_pe", "point_embedding")


def encoder_attention(block: Block, x: Tensor) -> Tensor:
    """The attention sub-block of an encoder block with its residual. x: [B, H, W, C] -> same."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, block.window_size)
    x = block.attn(x)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad_hw, (height, width))
    return shortcut + x


def encoder_mlp(block: Block, x: Tensor) -> Tensor:
    """The MLP sub-block of an encoder block with its residual. x: [B, H, W, C] -> same."""
    return x + block.mlp(block.norm2(x))


def decoder_self_attention(layer: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor) -> Tensor:
    """Token self-attention (+ residual unless the layer skips the PE) and norm1. [N, T, C] -> same."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        attn_out = layer.self_attn(q=q, k=q, v=queries)
        queries = queries + attn_out
    return layer.norm1(queries)


def decoder_token_to_image(layer: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, query_pe: Tensor,
                           key_pe: Tensor) -> Tensor:
    """Tokens attending to the image, residual, norm2. Returns queries [N, T, C]."""
    q = queries + query_pe
    k = keys + key_pe
    attn_out = layer.cross_attn_token_to_image(q=q, k=k, v=keys)
    return layer.norm2(queries + attn_out)


def decoder_mlp(layer: TwoWayAttentionBlock, queries: Tensor) -> Tensor:
    """Token MLP, residual, norm3. [N, T, C] -> same."""
    mlp_out = layer.mlp(queries)
    return layer.norm3(queries + mlp_out)


def decoder_image_to_token(layer: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, query_pe: Tensor,
                           key_pe: Tensor) -> Tensor:
    """The image attending to the tokens, residual, norm4. Returns keys [N, HW, C]."""
    q = queries + query_pe
    k = keys + key_pe
    attn_out = layer.cross_attn_image_to_token(q=k, k=q, v=queries)
    return layer.norm4(keys + attn_out)


def final_token_to_image(transformer: TwoWayTransformer, queries: Tensor, keys: Tensor, query_pe: Tensor,
                         key_pe: Tensor) -> Tensor:
    """The transformer's last token-to-image attention, residual, final norm. Returns queries [N, T, C]."""
    q = queries + query_pe
    k = keys + key_pe
    attn_out = transformer.final_attn_token_to_image(q=q, k=k, v=keys)
    return transformer.norm_final_attn(queries + attn_out)


def flatten_tokens(grid: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, HW, C], as TwoWayTransformer flattens the image and its PE."""
    return grid.flatten(2).permute(0, 2, 1)


# Hook takes: (args, kwargs, output) -> named tensors.

def first_argument(name: str) -> Take:
    """The module's first argument under `name`."""
    return lambda args, kwargs, output: {name: args[0]}


def module_output(name: str) -> Take:
    """The module's output under `name` (post hooks)."""
    return lambda args, kwargs, output: {name: output}


def _bound(args: tuple, kwargs: dict, order: tuple[str, ...]) -> dict[str, Tensor]:
    bound = dict(zip(order, args))
    bound.update(kwargs)
    return bound


def layer_arguments(*names: str) -> Take:
    """Named arguments of a TwoWayAttentionBlock call (queries, keys, query_pe, key_pe)."""
    return lambda args, kwargs, output: {n: _bound(args, kwargs, _LAYER_ARGS)[n] for n in names}


def layer_outputs(args: tuple, kwargs: dict, output: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """A TwoWayAttentionBlock's (queries, keys) output."""
    return {"queries": output[0], "keys": output[1]}


def transformer_encodings(args: tuple, kwargs: dict, output: object) -> dict[str, Tensor]:
    """The prompt tokens (query_pe [N, T, C]) and the flattened image PE (key_pe [N, HW, C]) of a
    TwoWayTransformer call."""
    bound = _bound(args, kwargs, _TRANSFORMER_ARGS)
    return {"query_pe": bound["point_embedding"], "key_pe": flatten_tokens(bound["image_pe"])}


# Unit forwards: (root module, inputs) -> output.

def _run_encoder_attention(block: Block, inputs: Tensors) -> Tensor:
    return encoder_attention(block, inputs["x"])


def _run_encoder_mlp(block: Block, inputs: Tensors) -> Tensor:
    return encoder_mlp(block, inputs["x"])


def _run_neck(neck: nn.Module, inputs: Tensors) -> Tensor:
    return neck(inputs["x"])


def _run_self_attention(layer: TwoWayAttentionBlock, inputs: Tensors) -> Tensor:
    return decoder_self_attention(layer, inputs["queries"], inputs["query_pe"])


def _run_token_to_image(layer: TwoWayAttentionBlock, inputs: Tensors) -> Tensor:
    return decoder_token_to_image(layer, inputs["queries"], inputs["keys"], inputs["query_pe"], inputs["key_pe"])


def _run_mlp(layer: TwoWayAttentionBlock, inputs: Tensors) -> Tensor:
    return decoder_mlp(layer, inputs["queries"])


def _run_image_to_token(layer: TwoWayAttentionBlock, inputs: Tensors) -> Tensor:
    return decoder_image_to_token(layer, inputs["queries"], inputs["keys"], inputs["query_pe"], inputs["key_pe"])


def _run_final(transformer: TwoWayTransformer, inputs: Tensors) -> Tensor:
    return final_token_to_image(transformer, inputs["queries"], inputs["keys"], inputs["query_pe"], inputs["key_pe"])


def encoder_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Two units per encoder block (attention, MLP), in order."""
    units = []
    for index in range(len(model.image_encoder.blocks)):
        block = f"{ENCODER_BLOCKS}.{index}"
        units.append(Unit(
            name=f"{block}.attn", root=block, trained=(f"{block}.attn",),
            inputs=(HookPoint(block, "pre", first_argument("x")),), run=_run_encoder_attention,
            loss=lp_error(-1), config=config, output=HookPoint(f"{block}.norm2", "pre", first_argument("output"))))
        units.append(Unit(
            name=f"{block}.mlp", root=block, trained=(f"{block}.mlp",),
            inputs=(HookPoint(f"{block}.norm2", "pre", first_argument("x")),), run=_run_encoder_mlp,
            loss=lp_error(-1), config=config, output=HookPoint(block, "post", module_output("output"))))
    return units


def neck_unit(config: UnitConfig) -> Unit:
    """The encoder neck: input [B, C, H, W] -> image embedding [B, 256, H, W]."""
    return Unit(name=NECK, root=NECK, trained=(NECK,), inputs=(HookPoint(NECK, "pre", first_argument("x")),),
                run=_run_neck, loss=lp_error(1), config=config, channel_dim=1,
                output=HookPoint(NECK, "post", module_output("output")))


def decoder_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Four units per two-way layer and the final attention, in order."""
    pes = frozenset({"query_pe", "key_pe"})
    units = []
    for index in range(len(model.mask_decoder.transformer.layers)):
        layer = f"{TRANSFORMER}.layers.{index}"
        layer_keys = HookPoint(layer, "pre", layer_arguments("keys", "query_pe", "key_pe"))

        def after(norm: str) -> HookPoint:
            return HookPoint(f"{layer}.{norm}", "post", module_output("queries"))

        def output_of(norm: str) -> HookPoint:
            return HookPoint(f"{layer}.{norm}", "post", module_output("output"))

        units += [
            Unit(name=f"{layer}.self_attn", root=layer, trained=(f"{layer}.self_attn",),
                 inputs=(HookPoint(layer, "pre", layer_arguments("queries", "query_pe")),),
                 run=_run_self_attention, loss=lp_error(-1), config=config, output=output_of("norm1"),
                 shared_inputs=frozenset({"query_pe"})),
            Unit(name=f"{layer}.cross_attn_token_to_image", root=layer, trained=(f"{layer}.cross_attn_token_to_image",),
                 inputs=(layer_keys, after("norm1")), run=_run_token_to_image, loss=lp_error(-1), config=config,
                 output=output_of("norm2"), shared_inputs=pes),
            Unit(name=f"{layer}.mlp", root=layer, trained=(f"{layer}.mlp",), inputs=(after("norm2"),),
                 run=_run_mlp, loss=lp_error(-1), config=config, output=output_of("norm3")),
            Unit(name=f"{layer}.cross_attn_image_to_token", root=layer, trained=(f"{layer}.cross_attn_image_to_token",),
                 inputs=(layer_keys, after("norm3")), run=_run_image_to_token, loss=lp_error(-1), config=config,
                 output=output_of("norm4"), shared_inputs=pes),
        ]
    last = f"{TRANSFORMER}.layers.{len(model.mask_decoder.transformer.layers) - 1}"
    units.append(Unit(
        name=f"{TRANSFORMER}.final_attn_token_to_image", root=TRANSFORMER,
        trained=(f"{TRANSFORMER}.final_attn_token_to_image",),
        inputs=(HookPoint(TRANSFORMER, "pre", transformer_encodings), HookPoint(last, "post", layer_outputs)),
        run=_run_final, loss=lp_error(-1), config=config,
        output=HookPoint(f"{TRANSFORMER}.norm_final_attn", "post", module_output("output")), shared_inputs=pes))
    return units


def sam_units(model: Sam, config: UnitConfig) -> list[Unit]:
    """Every BRECQ/QDrop unit of `model` in forward order (34 / 58 / 74 for SAM-B / L / H), each
    trained with `config` and the plain reconstruction loss (squared error summed over channels)."""
    return encoder_units(model, config) + [neck_unit(config)] + decoder_units(model, config)
