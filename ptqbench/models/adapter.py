"""What a model family provides: the adapter through which the harness, the methods and the tasks
use a model without knowing its modules.

A family's package (SAM-1: `ptqbench.models.sam1`) implements `ModelAdapter` once and puts it in
each of its `ModelSpec`s. The harness takes it from the spec; a method, which receives models,
finds it with `adapter_for(model)`. Only the family's package imports the family's code.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ptqbench.errors import PtqbenchError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from ptqbench.models.calibration import CalibrationSample, CalibrationSet
    from ptqbench.models.prediction import Predictor
    from ptqbench.recon.unit import LossFn, Unit, UnitConfig
    from ptqbench.types import CalibrationItem

# family -> the module that defines its adapter as `ADAPTER` (imported on first use).
FAMILIES = {"sam1": "ptqbench.models.sam1.adapter"}


class PromptAwareUnits(NamedTuple):
    """PAR's units in training order: `image_side` (encoder stages, then the neck), whose trained
    modules PAR copies into its FP reference once reconstructed, and `prompt_side` (the decoder
    layers, then the final token-to-image attention)."""

    image_side: list[Unit]
    prompt_side: list[Unit]


class PromptAwareConfigs(NamedTuple):
    """The engine settings of each kind of PAR unit, the decoder layers' loss, and the dim every
    PAR loss sums over."""

    stage: UnitConfig
    neck: UnitConfig
    decoder: UnitConfig
    final: UnitConfig
    decoder_loss: LossFn
    sum_dim: int


class ModelAdapter(Protocol):
    """One model family's operations (SAM-1: `ptqbench.models.sam1.adapter.Sam1Adapter`).

    Models are `nn.Module`s: the plain model as built from its spec, or its quantizable twin, a
    copy whose quantization sites (`ptqbench.quant.sites`) are installed and start off.
    """

    family: str

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` (plain or twin) belongs to this family."""
        ...

    def quantized_twin(self, model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
        """A deep copy of `model` with every quantization site installed, all off."""
        ...

    def fp_twin(self, model: nn.Module) -> nn.Module:
        """The quantizable twin with every site off: it computes exactly what `model` computes."""
        ...

    def calibration_set(self, model: nn.Module, items: list[CalibrationItem],
                        device: torch.device | str) -> CalibrationSet:
        """The calibration items preprocessed exactly as evaluation preprocesses them, on `device`."""
        ...

    def forward(self, model: nn.Module, sample: CalibrationSample) -> tuple[Tensor, Tensor]:
        """The model's forward on one calibration sample (with gradients when they are enabled):
        mask logits [N, 1, h, w] and predicted IoU [N, 1] for its N box prompts."""
        ...

    def image_embedding(self, model: nn.Module, sample: CalibrationSample) -> Tensor:
        """The image encoder's output on the sample's image (SAM: [1, 256, h, w])."""
        ...

    def forward_from_embedding(self, model: nn.Module, embedding: Tensor,
                               sample: CalibrationSample) -> tuple[Tensor, Tensor]:
        """`forward` with the image encoder's output given (`image_embedding` of the same image):
        the same prompt-side modules, in the same order, on the same values."""
        ...

    def forward_with_graph(self, model: nn.Module, sample: CalibrationSample) -> Tensor:
        """The mask logits of `forward` with every intermediate tensor in the autograd graph (the
        inputs require grad), so gradients reach any tensor of the model (BRECQ's Fisher weights)."""
        ...

    def predictor(self, model: nn.Module, device: torch.device | str) -> Predictor:
        """The predictor the tasks call (`ptqbench.tasks.base.Task.predict`)."""
        ...

    def reconstruction_units(self, model: nn.Module, config: UnitConfig) -> list[Unit]:
        """Every BRECQ / QDrop reconstruction unit of `model`, in forward order."""
        ...

    def decoder_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """The prompt decoder's attentions (PCC, BIG), by module path, in forward order; in a twin
        each has `attention_map(q, k)`, its two sides `query_heads(q)` and `key_heads(k)` and their
        `logits(query_heads, key_heads)`, and a `<site>_quantizer` child per site (q, k, v, softmax)."""
        ...

    def token_to_image_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """The decoder attentions whose queries are prompt tokens and keys image tokens (BIG's sign fold)."""
        ...

    def rel_pos_from_fp_query(self, model: nn.Module) -> None:
        """Make the twin compute its relative-position terms from the unquantized query, as SAQ-SAM's
        reference does (a family without relative positions does nothing)."""
        ...

    def softmax_attentions(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every quantizable attention with a softmax site (AGQ), by module path."""
        ...

    def encoder_stages(self, model: nn.Module) -> Sequence[tuple[int, ...]]:
        """The image encoder's block indices grouped into PAR's stages."""
        ...

    def prompt_aware_units(self, model: nn.Module, reference: nn.Module,
                           configs: PromptAwareConfigs) -> PromptAwareUnits:
        """PAR's units of `model` (the quantizable twin), their losses run through `reference`."""
        ...


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of the family `model` belongs to; PtqbenchError when no family owns it."""
    for module in FAMILIES.values():
        adapter = importlib.import_module(module).ADAPTER
        if adapter.owns(model):
            return adapter
    raise PtqbenchError(f"no model family owns a {type(model).__name__}; known families: {', '.join(FAMILIES)}")
