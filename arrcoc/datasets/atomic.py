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

__all__ = ["write_atomic", "create_temporary", "commit", "remove_partial"]

_SUFFIX = ".tmp"


def _prefix(name: str) -> str:
    return f".{name}."


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (read once: setting it is process-wide)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def create_temporary(path: Path) -> str:
    """Create an empty temporary file beside ``path``, named so that :func:`remove_partial` finds it; its name."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=_SUFFIX)
    os.close(handle)
    return temporary


def commit(temporary: str, path: Path) -> None:
    """Give ``temporary`` the permissions of an ordinary new file (``mkstemp`` creates it 0600) and rename it over
    ``path``."""
    os.chmod(temporary, _new_file_mode())
    os.replace(temporary, path)


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)``, then :func:`commit` the temporary to ``path``; on any error remove it."""
    temporary = create_temporary(path)
    try:
        write(temporary)
        commit(temporary, path)
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
