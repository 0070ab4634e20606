"""What a model is to ptqbench: its spec (how to build it, where its weights come from, its
adapter and default preset), the model registry, and a loaded model.

Each registry entry is a factory returning a `ModelSpec`; a family's package registers its
models (SAM-1's: `ptqbench.models.sam1.models`). Tests and users override the URL or hashes with
`dataclasses.replace(spec, ...)` and pass the spec to `ptqbench.models.checkpoints.load_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ptqbench.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from ptqbench.models.adapter import ModelAdapter


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and where its weights come from.

    build: returns the architecture with random weights, eval mode, on CPU.
    input_size: the side of the square model input (1024 for SAM, 256 for sam_tiny).
    file_name: the official checkpoint's file name, used in the cache (None: nothing to cache).
    url: where to download `file_name` from (None: no download).
    sha256: the expected sha256 (hex) of the checkpoint (cache, download or packaged file).
    md5_prefix: the expected start of the file's MD5 (hex), a second guard.
    packaged: a checkpoint shipped inside the package; when it does not exist the model is
        the seeded random init (trained=False).
    adapter: the family's adapter (`ptqbench.models.adapter.ModelAdapter`), through which the
        harness, the methods and the tasks use the model.
    default_preset: the method preset a run uses unless `--preset` says otherwise.
    """

    name: str
    build: Callable[[], nn.Module]
    input_size: int
    adapter: ModelAdapter
    default_preset: str = "paper"
    file_name: str | None = None
    url: str | None = None
    sha256: str | None = None
    md5_prefix: str | None = None
    packaged: Path | None = None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint file that passed its checks.

    sha256: the file's sha256 (hex). verified: whether it was compared with a known hash
    (False for an explicit `--checkpoint` path).
    """

    path: Path
    sha256: str
    verified: bool


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for evaluation.

    model: the model in eval mode on CPU. checkpoint_sha256: the weights' sha256, or
    "untrained-seed0" for the random init. trained: False only for the untrained sam_tiny.
    input_size: the side of the square model input in pixels. adapter: the family's adapter.
    """

    model: nn.Module
    name: str
    checkpoint_path: Path | None
    checkpoint_sha256: str
    trained: bool
    input_size: int
    adapter: ModelAdapter


MODELS: Registry[ModelSpec] = Registry("model")
