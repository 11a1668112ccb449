"""The on-disk format of a compressed data set: atomic safetensors shards, a JSONL index, and the reader.

A data set written by ``arrcoc compress-dataset`` is a folder::

    DST/manifest.json                 what produced it (source list hash, budget, pipeline config, ...)
    DST/shards/shard-000000.safetensors
    DST/shards/shard-000001.safetensors
    DST/index.jsonl                   one record per source image, in source order (written last)

Shard ``k`` holds source images ``k * shard_size`` to ``(k + 1) * shard_size - 1``. Its tensors have one row
per image that compressed (``offset`` in the index is the row); its safetensors header carries the records
of all of its images, broken ones included, so a shard file is complete exactly when it exists: it is
written under a temporary name and renamed. The index is the records of all shards, merged.

Reading back::

    from arrcoc.datasets.shards import CompressedDataset, load_index, load_record
    index = load_index("DST")                       # list of dicts
    ok = [r for r in index if r["status"] == "ok"]
    tensors = load_record("DST", ok[0])             # tokens (T, D), positions (T, 4), mask (T,), ...
    dataset = CompressedDataset("DST")              # for training: dataset[i] -> the same dict, shards kept open
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError
from .atomic import commit, create_temporary, write_atomic

__all__ = [
    "INDEX_NAME",
    "MANIFEST_NAME",
    "SHARD_DIR",
    "FORMAT",
    "ROW_KEYS",
    "shard_file",
    "write_shard",
    "write_text_atomic",
    "read_shard_records",
    "ShardFile",
    "merge_index",
    "load_index",
    "load_record",
    "CompressedDataset",
]

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
INDEX_NAME = "index.jsonl"
MANIFEST_NAME = "manifest.json"
#: Written into every shard header and the manifest; a reader refuses anything else.
FORMAT = "arrcoc-dataset-1"

#: Tensors stored per compressed image (one row each), and what a record read back holds.
ROW_KEYS: tuple[str, ...] = (
    "tokens",
    "positions",
    "mask",
    "weights",
    "prefix",
    "allocation",
    "relevance",
    "region_grid",
    "patch_grid",
    "bucket",
    "scale",
    "source_size",
    "budget",
)

#: Per-region maps: padded to the largest region grid of a shard, cropped back by ``region_grid`` on reading.
_REGION_KEYS = ("allocation", "relevance")


def shard_file(root: str | os.PathLike[str], shard: int) -> Path:
    """The path of shard number ``shard`` under the data set folder ``root``."""
    return Path(root) / SHARD_DIR / f"shard-{shard:06d}.safetensors"


#: safetensors' names of the dtypes a shard holds.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_shard(path: Path, tensors: dict[str, Tensor], records: list[dict[str, Any]], fingerprint: str) -> None:
    """Write one shard atomically: ``tensors`` (rows of the images that compressed) and all of its records.

    Args:
        path: the final file name (:func:`shard_file`).
        tensors: ``{name: (N, ...)}`` CPU tensors, ``N`` = records with ``status == "ok"`` (may be empty).
        records: index records of every image of the shard, in source order.
        fingerprint: the run's fingerprint (from the manifest); a restart with other settings redoes the shard.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=_metadata(records, fingerprint)))


def _metadata(records: list[dict[str, Any]], fingerprint: str) -> dict[str, str]:
    return {"format": FORMAT, "fingerprint": fingerprint, "records": json.dumps(records, separators=(",", ":"))}


class ShardFile:
    """One shard's file, filled batch by batch as results arrive, in any order.

    Each batch's rows go to their places in buffers in memory (``position``: the image's place among the shard's
    images). The first batch also creates the file under a temporary name (:mod:`.atomic`) with room for the header,
    and lays out the start of its data section for ``size`` rows of the :data:`STREAMED` tensors (nineteen
    twentieths of a shard's bytes); whenever the rows filled from the first one on grow (batches come nearly in
    order), their rows of those tensors are written there, reaching the page cache while the GPU works on later
    batches. :meth:`finish` of a shard whose images all compressed then writes the header and the other tensors
    after them (the per-region maps padded to the shard's largest grid, known only then) and renames the file, so
    that the end of a run does not wait for a whole shard's write. A shard with images that did not compress (its
    tensors hold only the rows of those that did), whose header outgrew its room, or whose streamed tensors end off
    an 8-byte boundary (the next tensor would be misaligned) is gathered and written whole by :func:`write_shard`.

    Args:
        path: the shard's final file name (:func:`shard_file`).
        size: images in the shard.
        header_room: bytes to keep for the header (rounded up to a multiple of 8, which aligns the data section).
    """

    #: Laid out first and written as the rows filled from the first one grow, the widest dtype first.
    STREAMED = ("positions", "tokens")

    def __init__(self, path: Path, size: int, header_room: int) -> None:
        self.path, self.size = Path(path), size
        self.header_room = -(-header_room // 8) * 8
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.written = 0  # rows 0 .. written-1 of the streamed tensors are in the file
        self.buffers: dict[str, Tensor] = {}  # (size, ...) per row key but the per-region maps
        self.regions: list[tuple[Tensor, dict[str, Tensor]]] = []  # per batch: (positions, its per-region maps)
        self.temporary: str | None = None
        self.handle: Any = None  # the temporary file, open for writing

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = create_temporary(self.path)
        self.handle = open(self.temporary, "r+b", buffering=0)  # noqa: SIM115 - closed by finish() or discard()

    def _write_at(self, offset: int, data: Tensor | bytes) -> None:
        """Write ``data`` (bytes, or a contiguous tensor's bytes) at ``offset`` of the file."""
        view = memoryview(data if isinstance(data, bytes) else data.view(torch.uint8).numpy()).cast("B")
        self.handle.seek(offset)
        while view:
            view = view[self.handle.write(view) :]

    def _streamed_offsets(self) -> dict[str, int]:
        """Where each streamed tensor starts in the file."""
        offsets, end = {}, 8 + self.header_room
        for key in self.STREAMED:
            offsets[key] = end
            end += self.buffers[key].nbytes
        return offsets

    def place(self, positions: Sequence[int], rows: dict[str, Tensor]) -> None:
        """Put a batch's rows in their places.

        Args:
            positions: ``n`` distinct places in ``[0, size)``, not filled before.
            rows: ``{name: (n, ...)}`` CPU tensors, one entry per :data:`ROW_KEYS` name; a batch's per-region
                maps share one grid.
        """
        if self.handle is None:
            self._create()
        where = torch.tensor(positions, dtype=torch.long)  # (n,)
        for key in ROW_KEYS:
            if key in _REGION_KEYS:
                continue
            value = rows[key]
            if key not in self.buffers:
                self.buffers[key] = value.new_zeros((self.size, *value.shape[1:]))
            self.buffers[key].index_copy_(0, where, value)
        self.regions.append((where, {key: rows[key] for key in _REGION_KEYS}))
        self.filled[where] = True
        filled = self.written + int(self.filled[self.written :].cumprod(0).sum())  # ok-sync: host tensors
        if filled > self.written:
            for key, offset in self._streamed_offsets().items():
                rows_of = self.buffers[key][self.written : filled]
                self._write_at(offset + self.written * rows_of[0].nbytes, rows_of)
            self.written = filled

    def _region_maps(self) -> dict[str, Tensor]:
        """``{name: (size, rh, rw)}`` per-region maps, padded to the shard's largest grid."""
        out = {}
        for key in _REGION_KEYS:
            grids = [maps[key] for _, maps in self.regions]
            rh, rw = max(v.shape[-2] for v in grids), max(v.shape[-1] for v in grids)
            full = grids[0].new_zeros((self.size, rh, rw))
            for (where, _), value in zip(self.regions, grids):
                full.index_copy_(0, where, F.pad(value, (0, rw - value.shape[-1], 0, rh - value.shape[-2])))
            out[key] = full
        return out

    def tensors(self) -> dict[str, Tensor]:
        """``{name: (N, ...)}``, the ``N`` filled rows in the order of their positions (``{}`` when none)."""
        if not self.regions:
            return {}
        rows = self.filled.nonzero().squeeze(1)
        full = {**self.buffers, **self._region_maps()}
        return {key: full[key].index_select(0, rows) for key in ROW_KEYS}

    def finish(self, records: list[dict[str, Any]], fingerprint: str) -> None:
        """Write the shard under its final name: ``records`` (every image of the shard, in source order) into the
        header, the rows placed so far as its tensors."""
        try:
            if not (self.written == self.size and self._finish_in_place(records, fingerprint)):
                write_shard(self.path, self.tensors(), records, fingerprint)
        finally:
            self.discard()

    def _finish_in_place(self, records: list[dict[str, Any]], fingerprint: str) -> bool:
        """Lay the other tensors out after the streamed ones, write them and the header, rename; False when the
        header does not fit its room or the streamed tensors end off the 8-byte alignment (nothing renamed)."""
        tensors = {**self.buffers, **self._region_maps()}
        entries, end = {}, 0
        # the streamed tensors first, then the widest dtypes first: every tensor starts at a multiple of its
        # element size when the streamed ones end at a multiple of 8
        rest = sorted((key for key in ROW_KEYS if key not in self.STREAMED), key=lambda k: -tensors[k].element_size())
        for key in (*self.STREAMED, *rest):
            value = tensors[key]
            if key == rest[0] and end % 8:
                return False
            entries[key] = {
                "dtype": _DTYPE_NAMES[value.dtype],
                "shape": list(value.shape),
                "data_offsets": [end, end + value.nbytes],
            }
            end += value.nbytes
        header = json.dumps({"__metadata__": _metadata(records, fingerprint), **entries}, separators=(",", ":"))
        encoded = header.encode()
        if len(encoded) > self.header_room:
            return False
        for key in rest:
            self._write_at(8 + self.header_room + entries[key]["data_offsets"][0], tensors[key])
        self._write_at(0, struct.pack("<Q", self.header_room) + encoded.ljust(self.header_room, b" "))
        self.handle.truncate(8 + self.header_room + end)
        self.handle.close()
        self.handle = None
        commit(self.temporary, self.path)
        self.temporary = None
        return True

    def discard(self) -> None:
        """Close and remove the temporary file (nothing when none is left), and free the buffers."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.temporary is not None:
            Path(self.temporary).unlink(missing_ok=True)
            self.temporary = None
        self.buffers.clear()
        self.regions.clear()


def read_shard_records(path: Path) -> tuple[str, list[dict[str, Any]]] | None:
    """``(fingerprint, records)`` from a shard's header; ``None`` when the file is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            return None
        return metadata["fingerprint"], json.loads(metadata["records"])
    except Exception as err:  # noqa: BLE001 - any damage means: not a complete shard, redo it
        logger.warning("%s is unreadable (%s: %s); it will be written again", path, type(err).__name__, err)
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name and a rename, with normal permissions."""
    write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def merge_index(root: str | os.PathLike[str], shards: int, total: int, fingerprint: str) -> list[dict[str, Any]]:
    """Merge the records of shards ``0 .. shards-1`` into ``root/index.jsonl`` (atomically); returns them.

    Raises:
        InvalidInputError: a shard is missing, belongs to another run, or the records do not cover source
            images ``0 .. total-1`` exactly once.
    """
    records: list[dict[str, Any]] = []
    for shard in range(shards):
        found = read_shard_records(shard_file(root, shard))
        if found is None or found[0] != fingerprint:
            raise InvalidInputError(f"shard {shard} of {os.fspath(root)!r} is missing or belongs to another run")
        records.extend(found[1])
    records.sort(key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(total)):
        raise InvalidInputError(
            f"the shards of {os.fspath(root)!r} hold {len(records)} records for {total} source "
            f"images; expected each of them exactly once"
        )
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    write_text_atomic(Path(root) / INDEX_NAME, text)
    return records


def load_index(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a compressed data set, in source order.

    Each record has ``index`` (position in the source list), ``source`` (the image path), ``shard`` (file
    name relative to ``root``), ``offset`` (row in the shard, ``None`` when the image did not compress),
    ``budget``, ``status`` (``"ok"`` or ``"error"``), ``error`` (the reason, or ``None``), ``bucket`` and
    ``source_size`` (``[height, width]``; ``None`` for an image that could not be read).

    Raises:
        InvalidInputError: ``root`` holds no ``index.jsonl`` (the run is unfinished: run it again to resume).
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise InvalidInputError(
            f"{os.fspath(root)!r} holds no {INDEX_NAME}: not a finished compressed data set "
            f"(run arrcoc compress-dataset again to resume it)"
        )
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _check_ok(record: dict[str, Any]) -> None:
    if record.get("status") != "ok" or record.get("offset") is None:
        raise InvalidInputError(
            f"record {record.get('index')} ({record.get('source')}) holds no tensors: its status "
            f"is {record.get('status')!r} ({record.get('error')})"
        )


def _read_row(handle: Any, record: dict[str, Any]) -> dict[str, Tensor]:
    """One record's row from an open shard, per-region maps cropped to the image's own region grid."""
    row = int(record["offset"])
    rows = handle.get_slice("budget").get_shape()[0]
    if not 0 <= row < rows:
        raise InvalidInputError(
            f"record {record['index']}: offset {row} is outside shard {record['shard']} ({rows} rows)"
        )
    out = {key: handle.get_slice(key)[row : row + 1][0] for key in ROW_KEYS}
    rh, rw = (int(v) for v in out["region_grid"])  # ok-sync: reading a file, on the host
    for key in _REGION_KEYS:
        out[key] = out[key][:rh, :rw]
    return out


def load_record(
    root: str | os.PathLike[str], record: dict[str, Any], *, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """One image's tensors, read back from its shard (only that image's rows are read).

    For many records, :class:`CompressedDataset` keeps the shards open.

    Args:
        root: the data set folder.
        record: a record from :func:`load_index` with ``status == "ok"``.
        device: where to put the tensors.

    Returns:
        ``tokens (T, D)``, ``positions (T, 4)`` int64 (row, col, height, width in patches), ``mask (T,)`` bool
        (``budget`` True, first), ``weights (T,)``, ``prefix (P, D)``, ``allocation (rh, rw)`` int64,
        ``relevance (rh, rw)``, ``region_grid (2,)``, ``patch_grid (2,)``, ``bucket ()``, ``scale ()``,
        ``source_size (2,)``, ``budget ()``; the same values the pipeline returned for that image.

    Raises:
        InvalidInputError: a record of a broken image, or one whose shard or row is missing.
    """
    from safetensors import safe_open

    _check_ok(record)
    path = Path(root) / record["shard"]
    if not path.is_file():
        raise InvalidInputError(f"record {record['index']}: shard {os.fspath(path)!r} is missing")
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as handle:
        return _read_row(handle, record)


class CompressedDataset(torch.utils.data.Dataset):
    """The images of a compressed data set that compressed, as a map-style dataset for training.

    ``dataset[i]`` is :func:`load_record`'s dict plus ``"record"`` (the index record). Shards are opened on
    first use in each process (so DataLoader workers open their own) and kept open.

    Args:
        root: the data set folder (finished: it has ``index.jsonl``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.records = [r for r in load_index(root) if r["status"] == "ok"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors import safe_open

        record = self.records[i]
        handle = self._handles.get(record["shard"])
        if handle is None:
            handle = self._handles[record["shard"]] = safe_open(os.fspath(self.root / record["shard"]), framework="pt")
        return {**_read_row(handle, record), "record": record}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files stay in the process that opened them
