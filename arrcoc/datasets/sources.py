"""What a command or a data-set job reads: the image files under the paths given, and a query from a file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError

if TYPE_CHECKING:  # torch loads when a query file is read: listing files and `arrcoc --help` need none
    import torch

__all__ = ["IMAGE_SUFFIXES", "image_files", "load_query"]

#: File name endings read as images when a folder is given.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2"}


def image_files(inputs: list[str], recursive: bool, skipped: list[Path] | None = None) -> list[Path]:
    """Files named, and image files inside folders named (sorted); missing paths are kept to be reported.

    Args:
        inputs: files and folders.
        recursive: descend into sub-folders.
        skipped: when given, the files inside the folders that are not images by their suffix are appended
            (sorted), so the caller can say what it left out; hidden ones (``.DS_Store``) are not counted.
    """
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            inside = sorted(p for p in found if p.is_file())
            files.extend(p for p in inside if p.suffix.lower() in IMAGE_SUFFIXES)
            if skipped is not None:
                skipped.extend(
                    p for p in inside if p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith(".")
                )
        else:
            files.append(path)
    return files


def load_query(args: argparse.Namespace) -> tuple[Any, torch.Tensor | None]:
    """The query the command line asked for: ``--query-embedding``'s tensor (and mask), else ``--query``'s text.

    Raises:
        InvalidInputError: an unreadable embedding file, or a ``--query`` that is empty or only whitespace.
    """
    text = getattr(args, "query", None)
    if text is not None and not text.strip():
        raise InvalidInputError(
            f"--query is empty ({text!r}): give a question, or leave --query out to score the image alone"
        )
    if getattr(args, "query_embedding", None):
        import torch

        path = Path(args.query_embedding)
        if not path.is_file():
            raise InvalidInputError(f"--query-embedding {os.fspath(path)!r}: no such file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(path)
            else:
                tensors = {"query": torch.load(path, map_location="cpu", weights_only=True)}
        except Exception as err:  # noqa: BLE001 - safetensors and pickle raise many types on a bad file
            raise InvalidInputError(
                f"--query-embedding {os.fspath(path)!r} cannot be read: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(tensors.get("query"), torch.Tensor):
            raise InvalidInputError(
                f"--query-embedding {os.fspath(path)!r} must hold a tensor named 'query' (or be "
                f"one tensor); got {type(tensors.get('query')).__name__}"
            )
        return tensors["query"], tensors.get("query_mask")
    return text, None
