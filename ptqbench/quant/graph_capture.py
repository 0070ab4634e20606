"""Whether a CUDA graph is being recorded: values computed then exist only once the graph replays,
so what a quantizer keeps between calls (a level table, a cast zero point) must not be made then."""

from __future__ import annotations

import torch


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph, for work on `device` (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
