"""A unit's parameter update: Adam on AdaRound's V, Adam on the LSQ scales with cosine decay to 0,
and the AdaRound regulariser's gradient, as one `update(grads, regularize)` that a training step
runs after its backward, on a GPU inside the step's CUDA graph (`step.UnitStep`).

The reference (PTQ4SAM `ptq4sam/solver/recon.py`) steps both optimisers and the cosine schedule
after every backward and adds the regulariser (lambda, beta annealed 20 -> 2 after the warm-up)
to the loss. Here the regulariser's gradient is added to V's gradient, which is the same sum.

On a GPU the update is replayed from the step's graph, so nothing in it may read a host value
that changes between steps: the optimisers are fused and capturable (their step counts live on the
device, their state is allocated before the first capture), the scales' learning rate is a
device tensor refilled before each step from a host-side copy of the cosine schedule (the same
`CosineAnnealingLR` arithmetic, on Python floats), and beta is a device tensor refilled before
each step. So on a GPU the learning rate reaches Adam rounded to float32 and the regulariser's
power takes a tensor exponent; both differ from the CPU's double-precision scalars in the last
bits at most. On the CPU everything is as the reference has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ptqbench.quant.adaround import beta_schedule
from ptqbench.recon.unit import UnitConfig

Gradients = tuple[Tensor | None, ...]


def _allocate_adam_state(optimizer: torch.optim.Adam) -> None:
    """Adam's per-parameter state, as its first step would create it (a capturable optimiser's step
    count on the device), so that the first step can be captured in a graph."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                                      "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


class UnitOptimisation:
    """The optimisers of one unit and its regulariser schedule.

    rounding: AdaRound's V of every weight; scales: the LSQ scales; regularizer: beta -> the
    AdaRound regulariser (a 0-d tensor); config: the unit's hyperparameters; device: where the
    parameters live (a GPU makes the update capturable).
    """

    def __init__(self, rounding: Sequence[Tensor], scales: Sequence[Tensor],
                 regularizer: Callable[[float | Tensor], Tensor], config: UnitConfig, device: torch.device) -> None:
        self.config = config
        self.rounding = list(rounding)
        self.params = self.rounding + list(scales)
        self.regularizer = regularizer
        self.on_gpu = device.type == "cuda"
        gpu = {"fused": True, "capturable": True} if self.on_gpu else {}
        self.optimizers: list[torch.optim.Adam] = []
        if self.rounding:
            self.optimizers.append(torch.optim.Adam(self.rounding, lr=config.weight_lr, **gpu))
        self.scale_lr: Tensor | None = None
        self.schedule = None
        if scales:
            lr = config.scale_lr
            if self.on_gpu:
                self.scale_lr = torch.tensor(lr, dtype=torch.float32, device=device)
                # the schedule runs on a host-only stand-in whose lr the device tensor copies
                host = torch.optim.SGD([torch.zeros(1)], lr=lr)
            else:
                host = torch.optim.Adam(scales, lr=lr)
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(host, T_max=config.iterations, eta_min=0.0)
            if self.on_gpu:
                host.step()  # a no-op (no gradients) that tells the schedule its optimiser has stepped
            self.optimizers.append(torch.optim.Adam(scales, lr=self.scale_lr, **gpu) if self.on_gpu else host)
        if self.on_gpu:
            for optimizer in self.optimizers:
                _allocate_adam_state(optimizer)
        self.uses_regularizer = bool(self.rounding) and config.reg_lambda > 0
        self.beta: float | Tensor = torch.zeros((), device=device) if self.on_gpu else 0.0

    def prepare(self, step: int) -> bool:
        """Set beta for training step `step`; returns whether that step adds the regulariser."""
        config = self.config
        beta = beta_schedule(step, config.iterations, config.warmup, config.beta_start, config.beta_end)
        if not self.uses_regularizer or beta is None:
            return False
        if self.on_gpu:
            self.beta.fill_(beta)
        else:
            self.beta = beta
        return True

    def update(self, grads: Gradients, regularize: bool) -> None:
        """Give every parameter its gradient (plus the regulariser's, when `regularize`) and step
        the optimisers. Capturable: every value it reads is on the device."""
        for param, grad in zip(self.params, grads):
            param.grad = grad
        if regularize:
            for v, grad in zip(self.rounding, torch.autograd.grad(self.regularizer(self.beta), self.rounding)):
                v.grad = grad if v.grad is None else v.grad + grad
        for optimizer in self.optimizers:
            optimizer.step()

    def finish_step(self) -> None:
        """Advance the scales' cosine schedule by one step."""
        if self.schedule is None:
            return
        self.schedule.step()
        if self.scale_lr is not None:
            self.scale_lr.fill_(self.schedule.get_last_lr()[0])

    def release(self) -> None:
        for param in self.params:
            param.grad = None
