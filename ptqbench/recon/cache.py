"""Capturing and caching a reconstruction unit's inputs, targets and extras over the calibration set.

Inputs are read by forward hooks at the unit's `HookPoint`s during a whole-model forward; the
last hook to fire raises a private exception so the rest of the model never runs. For every
calibration sample the cache holds the unit's inputs in the quantized model (as calibrated so
far), its inputs in the FP model, its FP target (the unit run on the FP model's inputs, which
are also its unmixed inputs for a unit with `unmixed_inputs`) and its extras.

Placement: the cache stays on the compute device when its total size (measured on the first
sample, times the number of samples) fits in a fraction of the device's free memory; otherwise
it is kept in pinned CPU memory and each training step copies one sample over (non-blocking).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ptqbench.recon.unit import HookPoint, Output, Unit, with_unmixed

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], object]
"""(model, calibration sample) -> anything: one whole-model forward on one sample."""
Placement = Literal["auto", "device", "cpu"]


class _StopForward(Exception):
    """Raised by the last capture hook to end a forward early (never escapes `capture`)."""


def capture(model: nn.Module, points: Sequence[HookPoint], forward: Forward, sample: Any, *,
            detach: bool = True) -> dict[str, Tensor]:
    """Run `forward(model, sample)` until every hook point has fired; return the named tensors
    they took (detached, unless `detach` is False: then they keep their autograd graph). The
    forward stops right after the last point fires: this is the one place in ptqbench that ends a
    forward early. Raises RuntimeError if the forward ends before all of them fired."""
    found: dict[str, Tensor] = {}
    fired: set[int] = set()

    def record(index: int, point: HookPoint, args: tuple, kwargs: dict, output: object) -> None:
        found.update({name: t.detach() if detach else t for name, t in point.take(args, kwargs, output).items()})
        fired.add(index)
        if len(fired) == len(points):
            raise _StopForward

    def pre_hook(index: int, point: HookPoint) -> Callable:
        return lambda module, args, kwargs: record(index, point, args, kwargs, None)

    def post_hook(index: int, point: HookPoint) -> Callable:
        return lambda module, args, kwargs, output: record(index, point, args, kwargs, output)

    handles = []
    for index, point in enumerate(points):
        module = model.get_submodule(point.path)
        if point.when == "pre":
            handles.append(module.register_forward_pre_hook(pre_hook(index, point), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(post_hook(index, point), with_kwargs=True))
    try:
        forward(model, sample)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(fired) < len(points):
        missing = [f"{p.path} ({p.when})" for i, p in enumerate(points) if i not in fired]
        raise RuntimeError(f"the forward never reached the capture points {', '.join(missing)}")
    return found


def tree_map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor of a tensor / tuple / list / dict structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: tree_map(value, fn) for key, value in obj.items()}
    return obj


def tree_nbytes(obj: Any) -> int:
    """Total bytes of the tensors in a structure."""
    total = 0

    def count(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    tree_map(obj, count)
    return total


@dataclass(frozen=True)
class CacheEntry:
    """One calibration sample: quantized-model inputs (shared inputs excluded), FP-model inputs,
    the FP target and the extras."""

    quant_inputs: dict[str, Tensor]
    fp_inputs: dict[str, Tensor]
    target: Output
    extras: dict[str, Tensor]


class UnitCache:
    """The captured data of one unit, one entry per calibration sample.

    device: where training runs; on_device: whether the entries live there (else pinned CPU).
    """

    def __init__(self, entries: list[CacheEntry], device: torch.device, on_device: bool) -> None:
        self.entries = entries
        self.device = device
        self.on_device = on_device

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(tree_nbytes(vars(entry)) for entry in self.entries)

    def get(self, index: int) -> CacheEntry:
        """Entry `index` on the compute device."""
        entry = self.entries[index]
        if self.on_device:
            return entry
        return CacheEntry(**tree_map(vars(entry), lambda t: t.to(self.device, non_blocking=True)))


def _fits_on_device(nbytes: int, device: torch.device, placement: Placement, memory_fraction: float) -> bool:
    if device.type != "cuda" or placement == "device":
        return True
    if placement == "cpu":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= memory_fraction * free


def _to_host(entry: CacheEntry) -> CacheEntry:
    return CacheEntry(**tree_map(vars(entry), lambda t: t.to("cpu").pin_memory()))


def build_cache(unit: Unit, qmodel: nn.Module, fp_model: nn.Module, samples: Sequence[Any], forward: Forward,
                device: torch.device, placement: Placement = "auto", memory_fraction: float = 0.5) -> UnitCache:
    """Capture `unit`'s inputs in both models, its extras and its FP targets for every sample."""
    fp_root = fp_model.get_submodule(unit.root)
    entries: list[CacheEntry] = []
    on_device = True
    for index, sample in enumerate(samples):
        with torch.no_grad():
            fp_inputs = capture(fp_model, unit.inputs, forward, sample)
            quant_inputs = {name: t for name, t in capture(qmodel, unit.inputs, forward, sample).items()
                            if name not in unit.shared_inputs}
        extras = unit.extras(qmodel, fp_model, sample) if unit.extras is not None else {}
        fp_own = {name: fp_inputs[name] for name in quant_inputs}
        with torch.no_grad():
            target = (unit.target(fp_root, fp_inputs, extras) if unit.target is not None
                      else unit.run(fp_root, with_unmixed(unit, fp_inputs, fp_own)))
        entry = CacheEntry(quant_inputs, fp_inputs, tree_map(target, Tensor.detach), extras)
        if index == 0:
            total = tree_nbytes(vars(entry)) * len(samples)
            on_device = _fits_on_device(total, device, placement, memory_fraction)
            log.debug("unit %s: cache of %.1f MiB on %s", unit.name, total / 2**20,
                      device if on_device else "pinned CPU memory")
        entries.append(entry if on_device else _to_host(entry))
    return UnitCache(entries, device, on_device)
