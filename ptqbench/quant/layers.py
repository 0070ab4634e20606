"""Quantizable Linear and Conv2d: the same parameters as the wrapped layer, plus an input and a
weight quantizer. With both quantizers off the forward is the wrapped layer's, bit for bit.

The fake-quantized weight can be frozen (`freeze_weight`) so that evaluation quantizes each
weight once, not at every forward; any change to the weight quantizer must be followed by
`freeze_weight` or `unfreeze_weight` (done by `ptqbench.quant.sites.seal_for_evaluation`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ptqbench.quant.quantizer import FakeQuantizer


class QuantWeightLayer(nn.Module):
    """Shared weight handling of QuantLinear and QuantConv2d."""

    weight: nn.Parameter

    def __init__(self, w_bits: int, a_bits: int) -> None:
        super().__init__()
        self.input_quantizer = FakeQuantizer(a_bits, is_weight=False)
        self.weight_quantizer = FakeQuantizer(w_bits, is_weight=True, channel_axis=0)
        self.frozen_weight: Tensor | None = None

    def quantized_weight(self) -> Tensor:
        """The weight as used by forward: frozen copy, else freshly (fake-)quantized."""
        if self.frozen_weight is not None:
            return self.frozen_weight
        return self.weight_quantizer(self.weight)

    def freeze_weight(self) -> None:
        """Quantize the weight once and reuse it for every forward (evaluation)."""
        self.frozen_weight = None
        self.frozen_weight = self.quantized_weight().detach()

    def unfreeze_weight(self) -> None:
        self.frozen_weight = None


class QuantLinear(QuantWeightLayer):
    """nn.Linear with quantized input and weight. x: [..., in] -> [..., out]."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int) -> None:
        super().__init__(w_bits, a_bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantWeightLayer):
    """nn.Conv2d with quantized input and weight. x: [B, C_in, H, W] -> [B, C_out, H', W']."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int) -> None:
        super().__init__(w_bits, a_bits)
        if conv.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports zero padding only")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.input_quantizer(x), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)
