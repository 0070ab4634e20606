"""cuDNN restricted to deterministic algorithms, as the reference code bases run.

PTQ4SAM's and SAQ-SAM's entry scripts call mmdet's `set_random_seed(seed, deterministic=True)`,
which sets `torch.backends.cudnn.deterministic` (and turns `benchmark` off, torch's default) for
the whole program. By default cuDNN may pick, for a convolution's gradient and for a transposed
convolution's forward (SAM's mask upscaling), an algorithm that adds partial sums in an order that
changes from run to run; a reconstruction's AdaRound roundings and a cell's metrics can then
change between two runs of the same grid. `ptqbench run` executes inside `deterministic_cudnn`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN restricted to deterministic algorithms inside the block (the previous choice after it)."""
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = previous
