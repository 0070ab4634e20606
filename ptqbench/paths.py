"""Where ptqbench keeps files of its own: the one rule for the cache root."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PTQBENCH_CACHE"


def cache_root() -> Path:
    """`$PTQBENCH_CACHE` (with `~` expanded) when that variable is set and not empty, else
    `~/.cache/ptqbench`: the folder of downloaded checkpoints and of the demo data."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ptqbench"
