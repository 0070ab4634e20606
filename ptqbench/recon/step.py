"""One training step of a reconstruction unit: its forward, loss and gradients, eager or as CUDA graphs.

A step takes one cache entry (the unit's quantized and FP inputs, target and extras for one
calibration sample), mixes the inputs as QDrop does (`unit_inputs`), runs the unit, computes its
loss and the gradients of that loss with respect to the unit's trainable tensors, then runs the
engine's update on them (the AdaRound regulariser's gradients and the optimisers' step,
`optimisation.UnitOptimisation`). `UnitStep` returns (loss, gradients).

On a GPU the step is captured as a CUDA graph the first time an input-shape signature appears
(after one warm-up run on a side stream) and replayed for every later entry of that signature:
the inputs are copied into the graph's static buffers and the recorded kernels, the optimisers'
included, run again, with no Python and no kernel-launch overhead. Replays compute exactly what
the eager step computes for the same random numbers; the random stream (QDrop's input mixing and
in-unit drops, drawn from the unit's generator, which is registered with every graph) is seeded
and reproducible, but not the eager one. The graphs of one unit (one per number of prompts, say)
share one memory pool and write their gradients into the same buffers, so each extra graph costs
little more than its static inputs: a replay's gradients are consumed by its own update before the
next replay overwrites them. A unit whose step cannot be captured (its forward waits for the GPU or
copies from the host) is trained eagerly, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ptqbench.recon.cache import CacheEntry, tree_map
from ptqbench.recon.unit import Unit, with_unmixed

log = logging.getLogger(__name__)

Gradients = tuple[Tensor | None, ...]
WARMUP_RUNS = 1
"""Eager runs of a step before its capture: the first run of a signature loads its kernels (Triton's
specialisations for new shapes) and allocates the side stream's workspaces, which a capture may not do."""


def mix_inputs(quant: dict[str, Tensor], fp: dict[str, Tensor], quantize_prob: float,
               generator: torch.Generator | None) -> dict[str, Tensor]:
    """QDrop's unit input: per element the quantized-model value with probability `quantize_prob`,
    else the FP-model value. Inputs only in `fp` (shared inputs) are passed through."""
    mixed = dict(fp)
    for name, q in quant.items():
        if quantize_prob >= 1.0:
            mixed[name] = q
        else:
            uniform = torch.rand(q.shape, generator=generator, dtype=q.dtype, device=q.device)
            mixed[name] = torch.where(uniform < quantize_prob, q, fp[name])
    return mixed


def unit_inputs(unit: Unit, entry: CacheEntry, quantize_prob: float,
                generator: torch.Generator | None) -> dict[str, Tensor]:
    """The inputs `unit.run` gets in a training step: the mixed inputs (`mix_inputs`) and, for a
    unit with `unmixed_inputs`, every quantized-model input as captured under `unmixed(name)`."""
    mixed = mix_inputs(entry.quant_inputs, entry.fp_inputs, quantize_prob, generator)
    return with_unmixed(unit, mixed, entry.quant_inputs)


def _tensors(entry: CacheEntry) -> list[Tensor]:
    """Every tensor of an entry, in a fixed order."""
    found: list[Tensor] = []
    tree_map(vars(entry), lambda t: found.append(t) or t)
    return found


def _signature(entry: CacheEntry) -> tuple:
    """The shapes and dtypes of every tensor of an entry, in the order of `_tensors` (a graph's key)."""
    return tuple((tuple(t.shape), t.dtype) for t in _tensors(entry))


@dataclass
class _CapturedStep:
    """One CUDA graph of the step and its static tensors: inputs (copied into before each
    replay) and outputs (the loss and the unit's shared gradient buffers, rewritten by each replay)."""

    graph: torch.cuda.CUDAGraph
    inputs: CacheEntry
    loss: Tensor
    grads: Gradients


class UnitStep:
    """(cache entry) -> (loss [0-d, detached], gradients of the loss w.r.t. `params`).

    root: the unit's module in the quantized model; params: the trainable tensors (AdaRound's V,
    LSQ scales), a gradient is None where the loss does not depend on one; quantize_prob and
    generator: QDrop's input mixing. cuda_graphs: capture and replay the step on a GPU.
    update: (gradients, regularize) -> None, run after the backward of every step, inside its
    graph (the optimisers' step, `optimisation.UnitOptimisation.update`); a step's `regularize`
    flag is passed to it, and each value of the flag has its own graphs.
    """

    def __init__(self, unit: Unit, root: nn.Module, params: list[Tensor], quantize_prob: float,
                 generator: torch.Generator | None, device: torch.device, cuda_graphs: bool,
                 update: Callable[[Gradients, bool], None] | None = None) -> None:
        self.unit = unit
        self.root = root
        self.params = params
        self.quantize_prob = quantize_prob
        self.generator = generator
        self.device = device
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.update = update
        self._captured: dict[tuple, _CapturedStep] = {}
        self._pool: Any = None
        self._grad_buffers: list[Tensor] | None = None

    def _forward_backward(self, entry: CacheEntry) -> tuple[Tensor, Gradients]:
        inputs = unit_inputs(self.unit, entry, self.quantize_prob, self.generator)
        loss = self.unit.loss(self.unit.run(self.root, inputs), entry.target, entry.extras)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), grads

    def _eager(self, entry: CacheEntry, regularize: bool) -> tuple[Tensor, Gradients]:
        loss, grads = self._forward_backward(entry)
        if self.update is not None:
            self.update(grads, regularize)
        return loss, grads

    def __call__(self, entry: CacheEntry, regularize: bool = False) -> tuple[Tensor, Gradients]:
        if not self.use_graphs:
            return self._eager(entry, regularize)
        key = (_signature(entry), regularize)
        captured = self._captured.get(key)
        if captured is None:
            try:
                captured = self._capture(entry, regularize)
            except RuntimeError as exc:
                log.warning("unit %s: its training step cannot be captured as a CUDA graph (%s); training it "
                            "eagerly", self.unit.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                torch.cuda.synchronize(self.device)
                self.use_graphs = False
                self._captured.clear()
                return self._eager(entry, regularize)
            self._captured[key] = captured
        for static, fresh in zip(_tensors(captured.inputs), _tensors(entry)):
            static.copy_(fresh, non_blocking=True)
        captured.graph.replay()
        return captured.loss, captured.grads

    def _capture(self, entry: CacheEntry, regularize: bool) -> _CapturedStep:
        """Warm up on a side stream (forward and backward only: the update changes the parameters),
        then record one step, update included, on static copies of `entry`'s tensors.

        Through `torch.cuda.graph`, whose entry empties the allocator's cache: the memory pools of
        finished units' graphs go back to the device. A direct `capture_begin` keeps them cached in
        the process, and on a shared GPU other processes run out of memory (the self-check's
        parallel runs did, on 2026-12-03)."""
        static = CacheEntry(**tree_map(vars(entry), lambda t: t.to(self.device, copy=True)))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward_backward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        if self._grad_buffers is None:
            self._grad_buffers = [torch.empty_like(param) for param in self.params]
        with torch.cuda.graph(graph, pool=self._pool):
            loss, grads = self._forward_backward(static)
            for buffer, grad in zip(self._grad_buffers, grads):
                if grad is not None:
                    buffer.copy_(grad)
            outputs = tuple(None if grad is None else buffer for buffer, grad in zip(self._grad_buffers, grads))
            if self.update is not None:
                self.update(outputs, regularize)
        if self._pool is None:
            self._pool = graph.pool()
        return _CapturedStep(graph, static, loss, outputs)

