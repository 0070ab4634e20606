"""The shared range-setting steps: weight ranges, activation observation, statistics-only methods."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.config import BitSpec
from ptqbench.methods.options import NO_OPTIONS_PRESETS
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSet
from ptqbench.progress import phase
from ptqbench.quant.observers import DeferredSearches, Observer, make_observer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites, weight_layers


def set_weight_ranges(qmodel: nn.Module, observer: str, **observer_kw) -> None:
    """Per-channel weight ranges from `observer` (one update with the whole weight)."""
    for layer in weight_layers(qmodel).values():
        obs = make_observer(observer, channel_axis=0, bits=layer.weight_quantizer.bits, **observer_kw)
        obs.update(layer.weight.detach())
        layer.weight_quantizer.observe_with(obs)
        layer.weight_quantizer.finish_observing()


@contextmanager
def observing(qmodel: nn.Module, observer_for: Callable[[str, int], Observer],
              skip: Collection[str] = ()) -> Iterator[dict[str, FakeQuantizer]]:
    """Attach a fresh observer to every activation site that is still off (except `skip`) for the
    `with` block, then turn their statistics into ranges (the sites then quantize).

    `observer_for(site_name, bits)` returns the observer of a site; every forward run inside the
    block is one update of each observer it reaches. The observers' per-update searches run
    batched across sites (`DeferredSearches`). Yields the observed sites by name.
    """
    sites = {name: q for name, q in quantizer_sites(qmodel).items()
             if not q.is_weight and q.mode == "off" and name not in skip}
    searches = DeferredSearches()
    for name, quantizer in sites.items():
        observer = observer_for(name, quantizer.bits)
        observer.defer_searches(searches)
        quantizer.observe_with(observer)
    yield sites
    searches.flush()
    for quantizer in sites.values():
        quantizer.finish_observing()


@torch.no_grad()
def forward_all(qmodel: nn.Module, calib: CalibrationSet, description: str, *, progress: bool = True) -> None:
    """One forward of `qmodel` per calibration sample, in order."""
    forward = adapter_for(qmodel).forward
    for sample in tqdm(calib.samples, desc=phase(description), disable=not progress, leave=False):
        forward(qmodel, sample)


def observe_activations(qmodel: nn.Module, calib: CalibrationSet,
                        observer_for: Callable[[str, int], Observer], *, progress: bool = True) -> None:
    """Calibrate every activation site that is still off, in one pass over the calibration set.

    The pass runs the model as it is: the reference codes observe with every other quantizer
    off (weights included: `enable_calibration_woquantization`), so the built-in methods call this
    before setting weight ranges. Each image is one observer update.
    """
    with observing(qmodel, observer_for):
        forward_all(qmodel, calib, "observing activations", progress=progress)


class RangeSettingMethod:
    """A statistics-only method: a weight observer and an activation observer, nothing learned.

    config: one of `presets` with the user's options (default: the `paper` preset).
    """

    name = ""
    weight_observer = "minmax"
    activation_observer = "minmax"
    presets = NO_OPTIONS_PRESETS

    def __init__(self, config: object | None = None, *, progress: bool = True) -> None:
        self.config = config if config is not None else self.presets["paper"]
        self.progress = progress

    def weight_observer_options(self) -> dict:
        """Extra options of the weight observer under this configuration (none by default)."""
        return {}

    def activation_observer_options(self) -> dict:
        """Extra options of the activation observer under this configuration (none by default)."""
        return {}

    def statistics_steps(self, qmodel: nn.Module, calib: CalibrationSet) -> list[tuple[str, Callable[[], object]]]:
        """Activations observed on the FP model, then weights (the reference's `calibrate` order)."""
        options = self.activation_observer_options()
        return [("activations", lambda: observe_activations(
                    qmodel, calib, lambda site, bits: make_observer(self.activation_observer, bits=bits, **options),
                    progress=self.progress)),
                ("weights", lambda: set_weight_ranges(qmodel, self.weight_observer, **self.weight_observer_options()))]

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        for _, step in self.statistics_steps(qmodel, calib):
            step()
