"""The SAM-1 adapter (`ADAPTER`): segment_anything's `Sam` behind `ptqbench.models.adapter.ModelAdapter`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn

from ptqbench.models.adapter import PromptAwareConfigs, PromptAwareUnits
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1 import attention_groups, quantized
from ptqbench.models.sam1.calibration import (
    build_calibration_set,
    decode_prompts,
    forward_with_graph,
    sample_forward,
)
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.prompt_aware_units import prompt_aware_units
from ptqbench.models.sam1.units import sam_units
from ptqbench.recon.unit import Unit, UnitConfig
from ptqbench.types import CalibrationItem


class Sam1Adapter:
    """SAM-1 (`sam_vit_b`, `sam_vit_l`, `sam_vit_h`, `sam_tiny`): each operation is one function of
    this package, named in its docstring."""

    family = "sam1"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, Sam)

    def quantized_twin(self, model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
        """`quantized.quantize_sam`."""
        return quantized.quantize_sam(model, w_bits, a_bits)

    def fp_twin(self, model: nn.Module) -> nn.Module:
        """`quantized.fp_twin`."""
        return quantized.fp_twin(model)

    def calibration_set(self, model: nn.Module, items: list[CalibrationItem],
                        device: torch.device | str) -> CalibrationSet:
        """`calibration.build_calibration_set`."""
        return build_calibration_set(model, items, device)

    def forward(self, model: nn.Module, sample: CalibrationSample) -> tuple[Tensor, Tensor]:
        """`calibration.sample_forward`."""
        return sample_forward(model, sample)

    def image_embedding(self, model: nn.Module, sample: CalibrationSample) -> Tensor:
        """The image encoder on `sample.image`."""
        return model.image_encoder(sample.image)

    def forward_from_embedding(self, model: nn.Module, embedding: Tensor,
                               sample: CalibrationSample) -> tuple[Tensor, Tensor]:
        """`calibration.decode_prompts`."""
        return decode_prompts(model, embedding, sample.boxes)

    def forward_with_graph(self, model: nn.Module, sample: CalibrationSample) -> Tensor:
        """`calibration.forward_with_graph`."""
        return forward_with_graph(model, sample)

    def predictor(self, model: nn.Module, device: torch.device | str) -> BoxPredictor:
        """`inference.BoxPredictor`."""
        return BoxPredictor(model, device)

    def reconstruction_units(self, model: nn.Module, config: UnitConfig) -> list[Unit]:
        """`units.sam_units`."""
        return sam_units(model, config)

    def decoder_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """`attention_groups.decoder_attentions`."""
        return attention_groups.decoder_attentions(model)

    def token_to_image_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """`attention_groups.token_to_image_attentions`."""
        return attention_groups.token_to_image_attentions(model)

    def rel_pos_from_fp_query(self, model: nn.Module) -> None:
        """`quantized.use_fp_query_for_rel_pos`."""
        quantized.use_fp_query_for_rel_pos(model)

    def softmax_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """`attention_groups.softmax_attentions`."""
        return attention_groups.softmax_attentions(model)

    def encoder_stages(self, model: nn.Module) -> Sequence[tuple[int, ...]]:
        """`attention_groups.encoder_stages`."""
        return attention_groups.encoder_stages(model)

    def prompt_aware_units(self, model: nn.Module, reference: nn.Module,
                           configs: PromptAwareConfigs) -> PromptAwareUnits:
        """`prompt_aware_units.prompt_aware_units`."""
        return prompt_aware_units(model, reference, configs)


ADAPTER = Sam1Adapter()
