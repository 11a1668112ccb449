"""Atomic file writes: a temporary file in the same folder, then a rename, so no reader sees half a file.

The folder jobs (``arrcoc compress``) and the data set shards (``arrcoc compress-dataset``) both write this
way, and both clean up after a writer that was killed midway; the temporary names are decided here alone.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["write_atomic", "remove_partial"]

_SUFFIX = ".tmp"


def _prefix(name: str) -> str:
    return f".{name}."


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (read once: setting it is process-wide)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)``, then rename the temporary over ``path``; on any error remove it.

    The file ends with the permissions of an ordinary new file (``mkstemp`` creates it 0600).
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=_SUFFIX)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, _new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_partial(folder: Path, names: Iterable[str]) -> int:
    """Delete the temporaries that killed writers of ``folder/<name>`` left behind (one folder listing).

    Returns:
        How many files were removed.
    """
    prefixes = tuple(_prefix(name) for name in names)
    removed = 0
    for leftover in Path(folder).glob(f".*{_SUFFIX}"):
        if leftover.name.startswith(prefixes):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed
