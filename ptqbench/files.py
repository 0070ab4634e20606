"""File helpers shared by the run store, the checkpoints and the prompt cache (no torch here):
atomic text writes and chunked file digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

HASH_CHUNK = 8 << 20


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path` (mode 0644), so
    a reader never sees a half-written file; the temporary file is removed on any failure."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    done = False
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
        done = True
    finally:
        if not done:
            Path(temp_name).unlink(missing_ok=True)


def file_digests(path: Path, algorithms: Sequence[str] = ("sha256",)) -> tuple[str, ...]:
    """The hex digests of a file's bytes, one per hashlib algorithm name, read once in chunks."""
    digests = [hashlib.new(name) for name in algorithms]
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            for digest in digests:
                digest.update(chunk)
    return tuple(digest.hexdigest() for digest in digests)
