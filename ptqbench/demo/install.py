"""The demo-data installer: `ensure_demo_data()` writes the demo once into a folder of its own.

The folder (default `<cache root>/demo-v1`, see `ptqbench.paths.cache_root`) is written into
a temporary sibling and renamed into place; a marker file holding the generator version and
the sizes makes later calls return at once. A process lock beside the folder serialises
concurrent calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ptqbench.demo.writers import GENERATOR_VERSION, DemoSizes, write_demo
from ptqbench.errors import DataError
from ptqbench.paths import cache_root

log = logging.getLogger(__name__)

MARKER_NAME = "ptqbench_demo.json"
DEMO_FOLDER = "demo-v1"
# The generator name in the marker: the module that first wrote the demo, kept so that demo
# folders written before the move into `ptqbench.demo` stay valid.
_GENERATOR = "ptqbench.tasks.synthetic"


def default_demo_root() -> Path:
    """`cache_root() / "demo-v1"`: `$PTQBENCH_CACHE/demo-v1` when that variable is set and
    not empty, else `~/.cache/ptqbench/demo-v1`."""
    return cache_root() / DEMO_FOLDER


def ensure_demo_data(root: Path | None = None, sizes: DemoSizes | None = None) -> Path:
    """Return a data root holding the complete demo, generating it first when needed.

    root: the demo folder (default `default_demo_root()`); it must be a folder of its own.
    sizes: images per split (default `DemoSizes()`).
    A folder whose marker matches (generator version and sizes) is used as is. Otherwise the
    demo is written into a temporary sibling folder and renamed onto `root` (replacing an
    older demo); leftover temporary folders of interrupted runs are removed. A process lock
    beside the folder serialises concurrent calls. Raises DataError when `root` exists, is
    not empty and is not a demo folder (it could be real data: it is never touched).
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    sizes = sizes if sizes is not None else DemoSizes()
    stamp = _stamp(sizes)
    if _read_marker(root) == stamp:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if _read_marker(root) == stamp:
            return root
        _remove_leftovers(root)
        replace = _check_replaceable(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        log.info("writing synthetic demo data to %s (temporary folder %s)", root, tmp.name)
        try:
            write_demo(tmp, sizes)
            (tmp / MARKER_NAME).write_text(json.dumps(stamp, sort_keys=True) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if replace:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            old.rmdir()
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    log.info("synthetic demo data ready at %s", root)
    return root


def _stamp(sizes: DemoSizes) -> dict:
    """The marker's content: generator, version and sizes."""
    return {"generator": _GENERATOR, "version": GENERATOR_VERSION, "sizes": asdict(sizes)}


def _read_marker(root: Path) -> dict | None:
    """The marker of `root`, or None when it is missing or unreadable."""
    marker = root / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.<name>.lock` beside `root`."""
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Remove temporary folders of interrupted generations (called with the lock held)."""
    for pattern in (f".{root.name}.tmp-*", f".{root.name}.old-*"):
        for leftover in sorted(root.parent.glob(pattern)):
            log.info("removing leftover temporary folder %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _check_replaceable(root: Path) -> bool:
    """True when `root` holds an older demo; removes an empty `root`; refuses anything else."""
    if not root.exists():
        return False
    if root.is_dir() and (root / MARKER_NAME).is_file():
        return True
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
        return False
    raise DataError(f"{root} exists and is not a ptqbench demo folder (no {MARKER_NAME}); "
                    "the demo needs a folder of its own: remove it or choose another root")
