"""A detector of the zoo with its weights: torchvision's own, a local file, or seeded random ones.

Torchvision's weights come only through torchvision's mechanism: the builder's
`weights=<Weights>.DEFAULT`, which loads `<torch hub dir>/checkpoints/<file>` (`$TORCH_HOME`,
default `~/.cache/torch/hub`) and downloads it there first when it is missing, checking the
sha256 prefix in its name. When the file is missing and cannot be downloaded (offline), a
CheckpointError names the file, its URL and the folder to put it in. The weights' file sha256
(for seeded random weights the label "random-seed0") is part of the prompts' cache key and of
every row that uses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ptqbench.errors import CheckpointError, ConfigError
from ptqbench.files import file_digests
from ptqbench.prompts.cache import memoized
from ptqbench.prompts.zoo import RANDOM_WEIGHTS, DetectorSettings, check_detector

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
RANDOM_SEED = 0
RANDOM_LABEL = f"{RANDOM_WEIGHTS}-seed{RANDOM_SEED}"


@dataclass(frozen=True)
class DetectorWeights:
    """Where a detector's weights come from.

    source: "torchvision:<weights enum>" (e.g. torchvision:COCO_V1), "file:<path>" or
    "random-seed0"; sha256: of the weights file ("random-seed0" for random weights).
    """

    source: str
    sha256: str

    @property
    def is_random(self) -> bool:
        return self.source.startswith(RANDOM_WEIGHTS)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    return file_digests(path)[0]


def hub_checkpoint(detector: str) -> tuple[str, Path]:
    """(URL, local path in torch hub's cache) of the detector's default torchvision weights."""
    import torch
    from torchvision.models import get_model_weights

    url = get_model_weights(detector).DEFAULT.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _ensure_hub_file(detector: str, progress: bool) -> Path:
    """The default weights' file in torch hub's cache, downloaded there by torch.hub when missing
    (checking the sha256 prefix in the file's name, as `load_state_dict_from_url` does);
    CheckpointError naming the file and the folder when that fails."""
    import torch

    url, path = hub_checkpoint(detector)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)  # the sha256 prefix in the name, as torch.hub checks it
    log.info("downloading the %s weights %s into %s", detector, url, path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                       progress=progress)
    except (OSError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"detector weights {path.name} are not in {path.parent} and could not be "
                              f"downloaded ({reason}): put {url} into {path.parent} (torchvision's hub "
                              "cache, $TORCH_HOME/hub/checkpoints)") from None
    return path


def _load_file(model: nn.Module, path: Path) -> None:
    """Load a local state dict (or {"model": state dict}) into `model`; only BatchNorm's
    `num_batches_tracked` may be missing (torchvision's trained models use frozen BatchNorm)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is one error line
        raise CheckpointError(f"detector weights {path} cannot be read as a state dict: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"detector weights {path} hold a {type(state).__name__}, not a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"detector weights {path} do not fit the model: "
                              f"{str(error).strip().splitlines()[0]}") from None
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"detector weights {path} do not fit the model: {what} (of "
                              f"{len(missing)} missing, {len(unexpected)} unexpected keys)")


def resolve_weights(name: str, weights: str | None, *, progress: bool = True,
                    memo_dir: Path | None = None) -> DetectorWeights:
    """Where the weights of detector `name` come from, without building it.

    weights: None or "default" (torchvision's DEFAULT weights: the file in torch hub's cache,
    downloaded there first by torch.hub when missing), "random" (seeded random initialisation,
    for tests and timing; recorded as "random-seed0", which stands in for the hash) or the path
    of a local state dict. memo_dir: where a file's sha256 is remembered per file version
    (`cache.memoized`); None hashes the file every time.
    """
    def sha256(path: Path) -> str:
        if memo_dir is None:
            return file_sha256(path)
        return memoized(memo_dir, path, {"sha256": True}, lambda: file_sha256(path))

    name = check_detector(name)
    if weights in (None, "default"):
        from torchvision.models import get_model_weights  # only here: a cache hit on other weights imports no torch

        path = _ensure_hub_file(name, progress)
        return DetectorWeights(source=f"torchvision:{get_model_weights(name).DEFAULT.name}", sha256=sha256(path))
    if weights == RANDOM_WEIGHTS:
        return DetectorWeights(source=RANDOM_LABEL, sha256=RANDOM_LABEL)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"detector weights file {path} does not exist (--weights takes a state dict file, "
                          "'default' or 'random')")
    return DetectorWeights(source=f"file:{path}", sha256=sha256(path))


def build_detector(name: str, weights: DetectorWeights, settings: DetectorSettings, *,
                   progress: bool = True) -> nn.Module:
    """The detector `name` in eval mode on the CPU with `settings` applied and `weights` loaded
    (random ones under a fixed seed; the global RNG is left untouched)."""
    import torch
    from torchvision.models import get_model_builder, get_model_weights

    name = check_detector(name)
    builder = get_model_builder(name)
    kwargs = settings.builder_kwargs(name)
    if weights.source.startswith("torchvision:"):
        model = builder(weights=get_model_weights(name).DEFAULT, progress=progress, **kwargs)
    elif weights.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = builder(weights=None, weights_backbone=None, num_classes=91, **kwargs)
    else:
        model = builder(weights=None, weights_backbone=None, num_classes=91, **kwargs)
        _load_file(model, Path(weights.source.removeprefix("file:")))
    return model.eval()
