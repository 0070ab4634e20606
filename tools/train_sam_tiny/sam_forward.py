"""The training forward: SAM's prompt encoder and mask decoder re-expressed for prompts of many
images in one call (`decode`, `embed_points`), each tested equal to segment_anything's own."""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

from tools.train_sam_tiny.config import MULTI_POINTS
from tools.train_sam_tiny.prompts import Batch


def embed_points(prompt_encoder: PromptEncoder, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`PromptEncoder` sparse embeddings of point prompts (no box: one padding point appended),
    without its boolean-mask assignments (each one a device sync).

    points: float [N, M, 2] (x, y) input-frame pixels; labels: int [N, M] of 0 and 1 only.
    Returns [N, M + 1, C], equal to `prompt_encoder(points=(points, labels), boxes=None, masks=None)[0]`.
    """
    encoded = prompt_encoder.pe_layer.forward_with_coords(points + 0.5, prompt_encoder.input_image_size)
    label_embedding = torch.where(labels[..., None] == 1, prompt_encoder.point_embeddings[1].weight,
                                  prompt_encoder.point_embeddings[0].weight)
    padding = prompt_encoder.not_a_point_embed.weight.expand(points.shape[0], 1, -1)
    return torch.cat([encoded + label_embedding, padding], dim=1)


def decode(decoder: MaskDecoder, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
           dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` for prompts of different images in one call.

    embeddings: [N, C, h, w], the image embedding of each prompt's image (predict_masks takes
    one image and repeats it); image_pe: [1, C, h, w]; sparse: [N, T, C]; dense: [N, C, h, w]
    or broadcastable to it (the no-mask embedding [1, C, 1, 1]).
    Returns all mask logits [N, 4, 4h, 4w] and IoU predictions [N, 4] (before output selection).
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(sparse.shape[0], -1, -1).to(sparse.dtype), sparse), dim=1)
    src = embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                            for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def forward(model: Sam, batch: Batch, autocast: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encode the images and decode all prompts (bf16 autocast when `autocast`, except the
    prompt and positional encodings, which stay float32 as at inference).

    Returns per prompt kind ("box", "point", "multi") (mask logits [N, 4, S/4, S/4], IoU [N, 4]),
    rows in scene-major order (scene 0's prompts first).
    """
    encoder = model.prompt_encoder
    b = batch.images.shape[0]
    n_box, n_point, n_multi = batch.boxes.shape[1], batch.points.shape[1], batch.multi_points.shape[1]
    image_pe = encoder.get_dense_pe()
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    box_sparse, _ = encoder(points=None, boxes=batch.boxes.reshape(-1, 4), masks=None)
    point_labels = torch.ones((b * n_point, 1), dtype=torch.long, device=batch.images.device)
    point_sparse = embed_points(encoder, batch.points.reshape(-1, 1, 2), point_labels)
    multi_sparse = embed_points(encoder, batch.multi_points.reshape(-1, MULTI_POINTS, 2),
                                batch.multi_labels.reshape(-1, MULTI_POINTS))
    image_index = torch.arange(b, device=batch.images.device)
    with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=autocast):
        embeddings = model.image_encoder(batch.images)
        # Boxes and single points both give 2 sparse tokens: one decoder call.
        index = torch.cat([image_index.repeat_interleave(n_box), image_index.repeat_interleave(n_point)])
        masks, iou = decode(model.mask_decoder, embeddings[index], image_pe,
                            torch.cat([box_sparse, point_sparse]), dense)
        out = {"box": (masks[: b * n_box], iou[: b * n_box]), "point": (masks[b * n_box:], iou[b * n_box:])}
        if n_multi:
            multi_index = image_index.repeat_interleave(n_multi)
            out["multi"] = decode(model.mask_decoder, embeddings[multi_index], image_pe, multi_sparse, dense)
    return out
