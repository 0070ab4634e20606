"""Copies between the host and a GPU that do not make the host wait for the device.

A copy between pageable host memory and a GPU blocks the host until every kernel queued before it
has run. From or to pinned (page-locked) memory the copy is queued on the current stream like a
kernel, and the host goes on. On the CPU both functions hand back plain tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upload(host: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`; on a GPU copied from pinned memory (pinned here unless it already
    is), the copy queued on the current stream."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def download(tensor: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """`tensor` on the host, and the event to synchronize on before reading it: on a GPU a fresh
    pinned tensor whose copy is queued on the current stream; on the CPU the tensor itself and None."""
    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record(torch.cuda.current_stream(tensor.device))
    return host, arrived
