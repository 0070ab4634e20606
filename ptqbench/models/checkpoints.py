"""Checkpoint handling: finding, checking, downloading and loading a model's weights.

Checkpoint resolution (`resolve_checkpoint`) is separate from building so it can be tested
without building a model:

1. an explicit path (`--checkpoint PATH`): hashed and recorded, not compared with the
   official hash (fine-tuned weights are welcome), but it must load strictly;
2. a packaged file (sam_tiny): verified against its constant sha256; when absent the model
   is the seeded random init, marked untrained;
3. the cache (`ptqbench.paths.cache_root()`: `$PTQBENCH_CACHE` or `~/.cache/ptqbench`):
   the file is re-verified before use;
4. a one-time download from the official URL: streamed to a `.part` file, verified, then
   atomically renamed into the cache; a bad download is deleted.

A file that fails a check is never loaded: `CheckpointError` says which file, what was
expected and what was found, and what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench import files
from ptqbench.errors import CheckpointError
from ptqbench.models.spec import MODELS, LoadedModel, ModelSpec, ResolvedCheckpoint
from ptqbench.paths import CACHE_ENV, cache_root

log = logging.getLogger(__name__)

UNTRAINED_SHA256 = "untrained-seed0"
_DOWNLOAD_CHUNK = 1 << 20


def file_digests(path: Path) -> tuple[str, str]:
    """The (sha256, md5) hex digests of a file, read in chunks."""
    sha256, md5 = files.file_digests(path, ("sha256", "md5"))
    return sha256, md5


def _digest_problem(spec: ModelSpec, sha256: str, md5: str) -> str | None:
    """A description of the first digest that differs from the spec's, or None when all match."""
    if spec.sha256 is not None and sha256 != spec.sha256:
        return f"sha256 is {sha256}, expected {spec.sha256}"
    if spec.md5_prefix is not None and not md5.startswith(spec.md5_prefix):
        return f"md5 is {md5}, expected it to start with {spec.md5_prefix}"
    return None


def verify_file(path: Path, spec: ModelSpec, remedy: str) -> ResolvedCheckpoint:
    """Hash `path` and compare with the spec's expected digests; `remedy` ends the error message."""
    sha256, md5 = file_digests(path)
    problem = _digest_problem(spec, sha256, md5)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} for {spec.name} is corrupt, truncated or a different file: "
            f"{problem}. {remedy}"
        )
    return ResolvedCheckpoint(path=path, sha256=sha256, verified=True)


def download_checkpoint(spec: ModelSpec, dest: Path, *, progress: bool = True,
                        timeout_s: float = 60.0) -> ResolvedCheckpoint:
    """Download `spec.url` to `dest`: stream to a `.part` file, verify, rename atomically.

    A download that fails, stops early or does not match the expected digests is deleted
    and raises CheckpointError; `dest` only ever holds a verified file.
    """
    if spec.url is None:
        raise CheckpointError(f"{spec.name} has no download URL; put its checkpoint at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, part_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    part = Path(part_name)
    offline_hint = (
        f"If this machine is offline, download {spec.url} elsewhere and put it at {dest}, "
        f"or pass --checkpoint PATH."
    )
    done = False
    try:
        sha, md5 = hashlib.sha256(), hashlib.md5()
        received = 0
        log.info("downloading %s to %s", spec.url, dest)
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(spec.url, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise CheckpointError(
                f"download of {spec.url} stopped early: got {received} of {total} bytes; "
                f"the partial file was deleted. Run again to retry. {offline_hint}"
            )
        problem = _digest_problem(spec, sha.hexdigest(), md5.hexdigest())
        if problem is not None:
            raise CheckpointError(
                f"downloaded {spec.url} does not match the checkpoint expected for {spec.name}: "
                f"{problem}; the download was deleted. Run again to retry, or download it yourself "
                f"and pass --checkpoint PATH."
            )
        os.replace(part, dest)
        done = True
    except (OSError, http.client.HTTPException) as exc:
        raise CheckpointError(f"could not download {spec.url} to {dest}: {exc}. {offline_hint}") from exc
    finally:
        if not done:
            part.unlink(missing_ok=True)
    return ResolvedCheckpoint(path=dest, sha256=sha.hexdigest(), verified=True)


def resolve_checkpoint(spec: ModelSpec, checkpoint: str | Path | None = None, cache_dir: Path | None = None,
                       download: bool = True, *, progress: bool = True) -> ResolvedCheckpoint | None:
    """Find and check the weights for `spec`; None means "use the seeded random init".

    Order: explicit `checkpoint` path, the packaged file, the cache, a download (see the module
    docstring). Raises CheckpointError for a missing explicit file, a file failing its hash
    check, or no file at all when downloading is off or impossible.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist or is not a file (given for {spec.name})")
        sha256, _ = file_digests(path)
        if spec.sha256 is not None and sha256 != spec.sha256:
            log.info("%s: %s is not the official checkpoint (sha256 %s); loading it as given",
                     spec.name, path, sha256)
        return ResolvedCheckpoint(path=path, sha256=sha256, verified=False)
    if spec.packaged is not None:
        if not spec.packaged.is_file():
            log.warning("%s: no trained weights at %s; using the untrained seeded init", spec.name, spec.packaged)
            return None
        if spec.sha256 is None:
            got, _ = file_digests(spec.packaged)
            raise CheckpointError(
                f"packaged checkpoint {spec.packaged} for {spec.name} has no expected sha256 to check "
                f"against; set the sha256 of its ModelSpec to {got} if this file is the intended one"
            )
        return verify_file(spec.packaged, spec, "Reinstall ptqbench, or pass --checkpoint PATH.")
    if spec.file_name is None:
        return None
    cache = cache_dir if cache_dir is not None else cache_root()
    cached = cache / spec.file_name
    if cached.is_file():
        return verify_file(cached, spec, "Delete it to download it again, or pass --checkpoint PATH.")
    if not download:
        raise CheckpointError(
            f"no checkpoint for {spec.name}: put {spec.file_name} (from {spec.url}) at {cached} "
            f"(the cache is ${CACHE_ENV} or ~/.cache/ptqbench), or pass --checkpoint PATH"
        )
    return download_checkpoint(spec, cached, progress=progress)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (weights_only, CPU); floating tensors are converted to float32."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can fail torch.load in many ways
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a torch state dict ({type(exc).__name__}: {first_line}); "
            f"the file is corrupt, truncated or not a PyTorch weights file"
        ) from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} is not a flat state dict (a dict of parameter name -> tensor); "
            f"got {type(loaded).__name__}"
        )
    return {key: value.float() if value.is_floating_point() else value for key, value in loaded.items()}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """`model.load_state_dict(state_dict, strict=True)`; a mismatch raises CheckpointError naming `path`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and state_dict[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches, file vs model (e.g. {'; '.join(wrong_shape[:3])})")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the {name} architecture: {'; '.join(problems)}. "
            f"Is it a checkpoint of another model?"
        )
    model.load_state_dict(state_dict, strict=True)


def load_model(name: str, checkpoint: str | Path | None = None, cache_dir: Path | None = None,
               download: bool = True, *, progress: bool = True, spec: ModelSpec | None = None) -> LoadedModel:
    """Build model `name` with its weights resolved as in `resolve_checkpoint`.

    `spec` overrides the registry entry (e.g. another URL or hash); `name` is then ignored.
    The model is in eval mode on CPU; its weights are float32.
    """
    if spec is None:
        spec = MODELS.get(name)()
    resolved = resolve_checkpoint(spec, checkpoint, cache_dir, download, progress=progress)
    model = spec.build()
    if resolved is None:
        return LoadedModel(model=model, name=spec.name, checkpoint_path=None,
                           checkpoint_sha256=UNTRAINED_SHA256, trained=False, input_size=spec.input_size,
                           adapter=spec.adapter)
    load_state_dict_strict(model, read_state_dict(resolved.path), resolved.path, spec.name)
    log.info("loaded %s weights from %s (sha256 %s)", spec.name, resolved.path, resolved.sha256[:12])
    return LoadedModel(model=model.eval(), name=spec.name, checkpoint_path=resolved.path,
                       checkpoint_sha256=resolved.sha256, trained=True, input_size=spec.input_size,
                       adapter=spec.adapter)
