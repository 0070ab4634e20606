"""The prompts cache: generated prompt files and prior folders under `$PTQBENCH_CACHE/prompts/`.

An entry is keyed by its identity (a JSON-able mapping: the task, the model and its weights'
sha256, the split, the data fingerprint, the image selection and the settings), hashed to 16 hex
digits. Its data (a file or a folder) is written under a temporary name and renamed into place,
then its metadata sidecar `<name>.meta.json` (the identity, the images, the seconds the pass took,
the device, the time) is written the same way; an entry counts only once its sidecar exists, so
an interrupted generation is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqbench.files import write_text_atomic
from ptqbench.paths import cache_root

FORMAT = 1
META_SUFFIX = ".meta.json"


def prompts_cache_dir() -> Path:
    """`$PTQBENCH_CACHE/prompts` (default `~/.cache/ptqbench/prompts`)."""
    return cache_root() / "prompts"


def identity_key(identity: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of `identity` (plus the cache FORMAT)."""
    canonical = json.dumps({"format": FORMAT, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def hash_files(digest: Any, paths: Iterable[Path], *, contents: bool) -> None:
    """Feed each file's name and byte size (and its bytes when `contents`) into a hashlib digest."""
    for path in paths:
        digest.update(f"{path.name}\t{path.stat().st_size}\n".encode())
        if contents:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)


@dataclass(frozen=True)
class CacheEntry:
    """One cached artefact: `path` (a file or a folder) and its sidecar `meta_path`."""

    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + META_SUFFIX)

    def exists(self) -> bool:
        return self.meta_path.is_file() and self.path.exists()

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text())


def entry_for(folder: Path, stem: str, identity: dict[str, Any], suffix: str = "") -> CacheEntry:
    """The entry of `identity` in `folder`: `<stem>-<key><suffix>`."""
    return CacheEntry(Path(folder) / f"{stem}-{identity_key(identity)}{suffix}")


def memoized(folder: Path, source: Path, question: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()`, remembered in `folder/memo/` for this `source` file's path, byte size and
    modification time and this `question` (JSON-able), so that the slow reads a cache lookup
    needs (hashing a weights file, parsing a large annotation file) are done once per file version."""
    stat = Path(source).stat()
    identity = {"source": str(Path(source).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                **question}
    path = Path(folder) / "memo" / f"{identity_key(identity)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["value"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged memo is recomputed
    value = compute()
    write_json_atomic(path, {"identity": identity, "value": value})
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` atomically (`files.write_text_atomic`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value))


def store(entry: CacheEntry, write: Callable[[Path], None], meta: Callable[[], dict[str, Any]], *,
          folder: bool) -> dict[str, Any]:
    """Create `entry`: `write(temporary path)` writes the data (a file, or into a created folder
    when `folder`), which is renamed to `entry.path`; then the sidecar with `meta()`, which is
    returned."""
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=entry.path.parent, prefix=entry.path.name + ".", suffix=".tmp"))
    os.chmod(temp, 0o755)
    target = temp if folder else temp / entry.path.name
    try:
        write(target)
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        os.replace(target, entry.path)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    written = meta()
    write_json_atomic(entry.meta_path, written)
    return written
