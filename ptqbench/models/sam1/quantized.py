"""Quantizable twins of SAM's modules and `quantize_sam`, which swaps them in by module type.

The twins subclass segment_anything's own modules, share their parameters and replicate their
forward with quantizers inserted at the sites listed below (the same for every method). With
every quantizer off, each twin returns exactly what the original returns (tested bit-exactly).

Sites (relative to each swapped module):
- image encoder attention: `qkv.input`, `qkv.weight`, `q`, `k`, `v` (after the qkv projection),
  `softmax` (attention probabilities), `proj.input`, `proj.weight`; the decomposed
  relative-position term is added in FP, computed from the quantized q (PTQ4SAM's and AHCPTQ's
  reference, the default) or from the unquantized q (SAQ-SAM's, `use_fp_query_for_rel_pos`) (`add_rel_pos`:
  segment_anything's arithmetic with the gather index kept on the device, so the forward never
  waits for the GPU and can be captured in a CUDA graph, and in evaluation on a GPU one fused pass);
  in a training step on a GPU the term, the softmax and the softmax site run as one fused kernel
  (`ptqbench.quant.fused_softmax_quant`; the decoder attentions' softmax and site too);
- MLP blocks (encoder and decoder): `lin1.input`, `lin1.weight`, `lin2.input` (post-activation), `lin2.weight`;
- encoder neck: `neck.0.*` (1x1 conv) and `neck.2.*` (3x3 conv), input and weight;
- mask decoder transformer attentions: `{q,k,v,out}_proj.{input,weight}`, `q`, `k`, `v`, `softmax`.
Everything else (patch and position embedding, LayerNorms, prompt encoder, output upscaling,
hypernetwork MLPs, IoU head) stays FP.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import Tensor, nn

from ptqbench.models.sam1.fused_rel_pos import add_rel_pos_, can_fuse
from ptqbench.quant import fused_softmax_quant
from ptqbench.quant.layers import QuantConv2d, QuantLinear
from ptqbench.quant.quantizer import FakeQuantizer


def _activation_quantizers(module: nn.Module, bits: int) -> None:
    for name in ("q", "k", "v", "softmax"):
        setattr(module, f"{name}_quantizer", FakeQuantizer(bits, is_weight=False))


@lru_cache(maxsize=32)  # a SAM needs 2-4 keys per device (window and global sizes); bounded all the same
def _rel_pos_index(q_size: int, k_size: int, table_length: int, device: torch.device) -> Tensor | None:
    """The row index [q_size, k_size] that segment_anything's `get_rel_pos` gathers from a table of
    `table_length` rows, on `device`; None when `get_rel_pos` would interpolate the table instead."""
    if table_length != 2 * max(q_size, k_size) - 1:
        return None
    rows = torch.arange(table_length).unsqueeze(1)
    return get_rel_pos(q_size, k_size, rows)[..., 0].to(device)


def rel_pos_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """`get_rel_pos(q_size, k_size, rel_pos)` ([q_size, k_size, C]) without a host-to-device copy
    of its index (which makes the host wait for the GPU); the same gather, bit for bit."""
    index = _rel_pos_index(q_size, k_size, rel_pos.shape[0], rel_pos.device)
    return get_rel_pos(q_size, k_size, rel_pos) if index is None else rel_pos[index]


def rel_pos_terms(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The height and width terms of segment_anything's `add_decomposed_rel_pos` for a square
    attention (q and k on one [h, w] grid), with `rel_pos_table`: q [B, hw, C] ->
    rel_h [B, h, w, h] (added over the key's row), rel_w [B, h, w, w] (over the key's column)."""
    h, w = size
    batch, _, dim = q.shape
    r_q = q.reshape(batch, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_pos_table(h, h, rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_pos_table(w, w, rel_pos_w))
    return rel_h, rel_w


def add_rel_pos(attn: Tensor, q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """segment_anything's `add_decomposed_rel_pos` for a square attention: attn [B, hw, hw] + the
    `rel_pos_terms` of q [B, hw, C]. In evaluation on a GPU both terms are added in one pass over
    attn, in place (`add_rel_pos_`)."""
    h, w = size
    batch = q.shape[0]
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    if can_fuse(attn):
        return add_rel_pos_(attn, rel_h, rel_w)
    return (attn.view(batch, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(batch, h * w, h * w)


class QuantEncoderAttention(EncoderAttention):
    """Image-encoder attention with quantized qkv/proj, q, k, v and softmax output.

    x: [B, H, W, C] -> [B, H, W, C].
    rel_pos_from_quantized_q: whether the relative-position term reads the quantized q (PTQ4SAM
    `quant_model.py:387,394`, the default) or the FP q (SAQ-SAM `quant_model.py:775-782`).
    """

    rel_pos_from_quantized_q = True

    @classmethod
    def from_float(cls, attn: EncoderAttention, w_bits: int, a_bits: int) -> QuantEncoderAttention:
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        twin.num_heads, twin.scale, twin.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        if attn.use_rel_pos:
            twin.rel_pos_h, twin.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        twin.qkv = QuantLinear(attn.qkv, w_bits, a_bits)
        twin.proj = QuantLinear(attn.proj, w_bits, a_bits)
        _activation_quantizers(twin, a_bits)
        return twin

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        q_hat, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        attn = (q_hat * self.scale) @ k.transpose(-2, -1)
        q_for_rel_pos = q_hat if self.rel_pos_from_quantized_q else q
        if fused_softmax_quant.can_fuse(attn, self.softmax_quantizer):
            bias = (None, None)
            if self.use_rel_pos:
                rel_h, rel_w = rel_pos_terms(q_for_rel_pos, self.rel_pos_h, self.rel_pos_w, (H, W))
                bias = (rel_h.reshape(*attn.shape[:2], H), rel_w.reshape(*attn.shape[:2], W))
            attn = fused_softmax_quant.quantized_softmax(attn, self.softmax_quantizer, *bias)
        else:
            if self.use_rel_pos:
                attn = add_rel_pos(attn, q_for_rel_pos, self.rel_pos_h, self.rel_pos_w, (H, W))
            attn = self.softmax_quantizer(attn.softmax(dim=-1))
        x = (attn @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


class QuantDecoderAttention(DecoderAttention):
    """Mask-decoder attention with quantized projections, q, k, v and softmax output.

    q: [B, Nq, C], k and v: [B, Nk, C] -> [B, Nq, C].
    """

    @classmethod
    def from_float(cls, attn: DecoderAttention, w_bits: int, a_bits: int) -> QuantDecoderAttention:
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        twin.embedding_dim, twin.internal_dim, twin.num_heads = attn.embedding_dim, attn.internal_dim, attn.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(twin, name, QuantLinear(getattr(attn, name), w_bits, a_bits))
        _activation_quantizers(twin, a_bits)
        return twin

    def query_heads(self, q: Tensor) -> Tensor:
        """The query side of the logits: q [B, Nq, C] through the q_proj input site, q_proj and the
        q site, split into heads [B, heads, Nq, C / heads]."""
        return self._separate_heads(self.q_quantizer(self.q_proj(q)), self.num_heads)

    def key_heads(self, k: Tensor) -> Tensor:
        """The key side: k [B, Nk, C] through the k_proj input site, k_proj and the k site, split
        into heads [B, heads, Nk, C / heads]."""
        return self._separate_heads(self.k_quantizer(self.k_proj(k)), self.num_heads)

    @staticmethod
    def logits(query_heads: Tensor, key_heads: Tensor) -> Tensor:
        """Q K^T / sqrt(d) [B, heads, Nq, Nk] of `query_heads` [B, heads, Nq, d] and `key_heads` [B, heads, Nk, d]."""
        c_per_head = query_heads.shape[-1]
        attn = query_heads @ key_heads.permute(0, 1, 3, 2)
        return attn / math.sqrt(c_per_head)

    def attention_logits(self, q: Tensor, k: Tensor) -> Tensor:
        """Q K^T / sqrt(d) [B, heads, Nq, Nk], with the q_proj / k_proj input sites and the q / k
        sites as they are. q: [B, Nq, C], k: [B, Nk, C]. The values are not touched (no v site runs)."""
        return self.logits(self.query_heads(q), self.key_heads(k))

    def attention_map(self, q: Tensor, k: Tensor) -> Tensor:
        """A = softmax(`attention_logits`) [B, heads, Nq, Nk] before the softmax site (PCC's attention map)."""
        return torch.softmax(self.attention_logits(q, k), dim=-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        v = self._separate_heads(self.v_quantizer(self.v_proj(v)), self.num_heads)
        logits = self.attention_logits(q, k)
        if fused_softmax_quant.can_fuse(logits, self.softmax_quantizer):
            attn = fused_softmax_quant.quantized_softmax(logits, self.softmax_quantizer)
        else:
            attn = self.softmax_quantizer(torch.softmax(logits, dim=-1))
        return self.out_proj(self._recombine_heads(attn @ v))


def _swap(parent: nn.Module, w_bits: int, a_bits: int, encoder: bool) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, EncoderAttention) and encoder:
            setattr(parent, name, QuantEncoderAttention.from_float(child, w_bits, a_bits))
        elif isinstance(child, DecoderAttention) and not encoder:
            setattr(parent, name, QuantDecoderAttention.from_float(child, w_bits, a_bits))
        elif isinstance(child, MLPBlock):
            child.lin1 = QuantLinear(child.lin1, w_bits, a_bits)
            child.lin2 = QuantLinear(child.lin2, w_bits, a_bits)
        else:
            _swap(child, w_bits, a_bits, encoder)


def quantize_sam(model: Sam, w_bits: int, a_bits: int) -> Sam:
    """A deep copy of `model` with every quantization site installed (all off).

    The copy is still a `Sam`; its quantizers start in mode "off", so it computes exactly what
    `model` computes until a method calibrates it.
    """
    qmodel = copy.deepcopy(model)
    encoder = qmodel.image_encoder
    _swap(encoder.blocks, w_bits, a_bits, encoder=True)
    encoder.neck[0] = QuantConv2d(encoder.neck[0], w_bits, a_bits)
    encoder.neck[2] = QuantConv2d(encoder.neck[2], w_bits, a_bits)
    _swap(qmodel.mask_decoder.transformer, w_bits, a_bits, encoder=False)
    return qmodel


def use_fp_query_for_rel_pos(qmodel: Sam) -> None:
    """Make every encoder attention of `qmodel` compute its relative-position term from the FP q
    (SAQ-SAM's reference) instead of the quantized q (the default)."""
    for module in qmodel.image_encoder.modules():
        if isinstance(module, QuantEncoderAttention):
            module.rel_pos_from_quantized_q = False


def fp_twin(model: Sam) -> Sam:
    """The quantizable twin of `model` with every site off (bit widths unused): it computes exactly
    what `model` computes, through the forward every quantized cell uses (and, on a GPU, without
    the host waits of segment_anything's relative-position gather)."""
    return quantize_sam(model, 8, 8)
