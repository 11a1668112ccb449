"""``arrcoc compress-dataset``: compress a folder (or list) of images into sharded safetensors, on one or many GPUs.

One process::

    arrcoc compress-dataset photos/ tokens/ --budget 64

One process per GPU, with PyTorch's launcher (rank ``r`` of ``K`` takes shards ``r, r+K, r+2K, ...``, runs
on GPU ``LOCAL_RANK`` with its own pipeline and graph cache; rank 0 merges the index at the end)::

    torchrun --nproc-per-node 4 -m arrcoc.cli compress-dataset photos/ tokens/ --budget 64

DataLoader workers decode and bucket the images (resize to the bucket, on the CPU) while the GPU compresses
the previous batch; a batch holds images of one bucket. Which images share a batch depends only on the
shard, never on the number of processes, so one process and ``K`` processes write the same tensors.

A run is resumable: a shard is written under a temporary name and renamed, and a run skips the shards that
exist, so the same command run again after a crash (or after ``--max-shards``) finishes the job with
nothing lost or duplicated. Images that cannot be read or compressed are records with ``status: "error"``
and the reason. The format and the readers (:func:`arrcoc.datasets.shards.load_index`, :func:`arrcoc.datasets.shards.load_record`,
:class:`arrcoc.datasets.shards.CompressedDataset`)
are in :mod:`arrcoc.datasets.shards`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from ..config import PipelineConfig
from ..errors import ArrcocError, InvalidInputError
from ..pipeline import Pipeline
from ..stages.preprocess import Preprocessor, load_image
from .atomic import remove_partial
from .shards import (
    FORMAT,
    INDEX_NAME,
    MANIFEST_NAME,
    merge_index,
    read_shard_records,
    shard_file,
    stack_rows,
    write_shard,
    write_text_atomic,
)
from .sources import IMAGE_SUFFIXES, image_files, load_query

__all__ = ["DatasetStats", "compress_dataset", "list_sources", "main"]

logger = logging.getLogger(__name__)

#: Exit code of a run that stopped before every shard was written (``--max-shards``); run it again to resume.
EXIT_INCOMPLETE = 75

#: The pipeline outputs stored per image (``scale`` and ``source_size`` come from the worker, see _Loaded).
_RESULT_KEYS = ("tokens", "positions", "mask", "weights", "prefix", "allocation", "relevance", "region_grid",
                "patch_grid", "bucket", "budget")

_TOKEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DatasetStats:
    """What one process did in one run.

    Attributes:
        rank: this process's rank; ``world_size``: the number of processes.
        images: images this process handled in this run (broken ones included).
        errors: of those, images recorded with ``status: "error"``.
        shards_written: shards this process wrote; ``shards_skipped``: its shards that were already complete.
        seconds: wall time from the first image requested to the last shard written.
        wait_seconds: time spent waiting for the DataLoader (decoding that did not overlap the GPU).
        pipeline_seconds: time inside pipeline calls, results copied to the host included.
        write_seconds: time stacking and writing shards.
        complete: every shard of the data set exists and the index is written.
    """

    rank: int = 0
    world_size: int = 1
    images: int = 0
    errors: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    write_seconds: float = 0.0
    complete: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


def list_sources(source: str | os.PathLike[str]) -> list[str]:
    """The images of a data set, in a fixed order: a folder's image files (recursively, sorted), or the lines of
    a list file (blank lines and ``#`` comments skipped; relative paths are relative to the list file's folder).

    Raises:
        InvalidInputError: ``source`` is missing, is an image itself, or names no images.
    """
    path = Path(source)
    if path.is_dir():
        found = [os.fspath(p) for p in image_files([os.fspath(path)], recursive=True)]
    elif path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise InvalidInputError(f"SRC must be a folder of images or a list file (one path a line); got the image "
                                    f"{os.fspath(path)!r}")
        lines = (line.strip() for line in path.read_text().splitlines())
        found = [os.fspath(path.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise InvalidInputError(f"SRC {os.fspath(path)!r}: no such folder or list file")
    if not found:
        raise InvalidInputError(f"SRC {os.fspath(path)!r} names no images")
    return found


@dataclass
class _Loaded:
    """One source image, decoded and resized to its bucket in a DataLoader worker (or the reason it failed)."""

    index: int
    source: str
    pixels: Tensor | None = None  # (3, h, w) float32, long side = bucket
    error: str | None = None
    bucket: int = 0
    scale: float = 0.0
    source_size: list[int] | None = None


class _Decode(torch.utils.data.Dataset):
    """``(index, path)`` items -> :class:`_Loaded`; any failure becomes an error record, never a dead worker."""

    def __init__(self, items: Sequence[tuple[int, str]], buckets: Sequence[int]) -> None:
        self.items = items
        self.preprocessor = Preprocessor(buckets, multiple=1)  # the pipeline's own bucketing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> _Loaded:
        index, source = self.items[position]
        try:
            (group,) = self.preprocessor([load_image(source, name=source)])
            h, w = group.content_size[0].tolist()  # ok-sync: a CPU tensor, in a worker
            # The resized image without its padding: the pipeline re-pads it (scale 1, no second resize).
            return _Loaded(index, source, group.pixels[0, :, :h, :w].clone(), None, group.bucket,
                           float(group.scale[0]), group.source_size[0].tolist())  # ok-sync: CPU tensors
        except Exception as err:  # noqa: BLE001 - a broken file is a record, whatever the decoder raised
            reason = str(err) if isinstance(err, ArrcocError) else f"{source}: {type(err).__name__}: {err}"
            return _Loaded(index, source, error=reason)


def _as_list(chunk: list[_Loaded]) -> list[_Loaded]:
    return chunk


class _ShardWriter:
    """Collects one shard's images into batches of one bucket, compresses them, and writes the shard."""

    def __init__(self, pipe: Pipeline, dest: Path, budget: int, query: Tensor | None, query_mask: Tensor | None,
                 batch_size: int, token_dtype: torch.dtype, fingerprint: str, stats: DatasetStats) -> None:
        self.pipe, self.dest, self.budget, self.query, self.query_mask = pipe, dest, budget, query, query_mask
        self.batch_size, self.token_dtype, self.fingerprint, self.stats = batch_size, token_dtype, fingerprint, stats
        self.shard: int | None = None
        self.pending: dict[int, list[_Loaded]] = {}
        self.rows: dict[int, dict[str, Tensor]] = {}
        self.records: dict[int, dict[str, Any]] = {}

    def add(self, item: _Loaded, shard: int) -> None:
        if shard != self.shard:
            self.finish()
            self.shard = shard
        if item.error is not None:
            self._fail(item, item.error)
            return
        queue = self.pending.setdefault(item.bucket, [])
        queue.append(item)
        if len(queue) == self.batch_size:
            self._compress(self.pending.pop(item.bucket))

    def _record(self, item: _Loaded, status: str, error: str | None) -> dict[str, Any]:
        return {"index": item.index, "source": item.source, "shard": f"{shard_file('', self.shard).as_posix()}",
                "offset": None, "budget": self.budget, "status": status, "error": error,
                "bucket": item.bucket or None, "source_size": item.source_size}

    def _fail(self, item: _Loaded, reason: str) -> None:
        logger.info("broken: %s", reason)
        self.records[item.index] = self._record(item, "error", reason)
        self.stats.errors += 1

    def _compress(self, items: list[_Loaded]) -> None:
        start = time.perf_counter()
        try:
            out = self.pipe([item.pixels for item in items], query=self.query, query_mask=self.query_mask,
                            budget=self.budget, copy=False)  # copied to the host right below
        except ArrcocError as err:  # one image the pipeline rejects must not cost the others their tokens
            if len(items) == 1:
                self._fail(items[0], f"{items[0].source}: {err}")
                return
            for item in items:
                self._compress([item])
            return
        host = {key: getattr(out, key).cpu() for key in _RESULT_KEYS}  # ok-sync: results leave the device to be written
        for j, item in enumerate(items):
            rh, rw = host["region_grid"][j].tolist()  # ok-sync: a CPU tensor
            self.rows[item.index] = {
                "tokens": host["tokens"][j].to(self.token_dtype), "positions": host["positions"][j],
                "mask": host["mask"][j], "weights": host["weights"][j], "prefix": host["prefix"][j].to(self.token_dtype),
                "allocation": host["allocation"][j, :rh, :rw], "relevance": host["relevance"][j, :rh, :rw],
                "region_grid": host["region_grid"][j], "patch_grid": host["patch_grid"][j], "bucket": host["bucket"][j],
                # the pipeline saw the resized image; scale and size refer to the source file
                "scale": torch.tensor(item.scale, dtype=torch.float32),
                "source_size": torch.tensor(item.source_size, dtype=torch.long), "budget": host["budget"][j]}
            self.records[item.index] = self._record(item, "ok", None)
        self.stats.pipeline_seconds += time.perf_counter() - start

    def finish(self) -> None:
        """Compress what is pending and write the shard (nothing when no shard is open)."""
        if self.shard is None:
            return
        for bucket in sorted(self.pending):
            self._compress(self.pending.pop(bucket))
        start = time.perf_counter()
        order = sorted(self.rows)
        for offset, index in enumerate(order):
            self.records[index]["offset"] = offset
        tensors = stack_rows([self.rows[index] for index in order])
        write_shard(shard_file(self.dest, self.shard), tensors, [self.records[i] for i in sorted(self.records)],
                    self.fingerprint)
        self.stats.write_seconds += time.perf_counter() - start
        self.stats.shards_written += 1
        self.shard, self.rows, self.records = None, {}, {}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(device: torch.device) -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def _manifest(sources: list[str], budget: int, shard_size: int, pipe: Pipeline, query: Tensor | None,
              token_dtype: torch.dtype) -> dict[str, Any]:
    """Everything that decides a shard's content; its hash is the run's fingerprint."""
    listing = hashlib.sha256("\n".join(sources).encode()).hexdigest()
    query_hash = None if query is None else hashlib.sha256(query.detach().float().cpu().numpy().tobytes()).hexdigest()  # ok-sync: hashing the query once, before the run
    manifest = {"format": FORMAT, "images": len(sources), "sources_sha256": listing, "shard_size": shard_size,
                "shards": -(-len(sources) // shard_size), "budget": budget, "token_dtype": str(token_dtype).split(".")[-1],
                "config": json.loads(pipe.config.to_json()), "weights": pipe.weights_path, "query_sha256": query_hash}
    manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest


def _check_manifest(dest: Path, manifest: dict[str, Any], rank: int) -> None:
    """Refuse to mix runs of other settings in one folder; rank 0 writes the manifest of a new data set."""
    path = dest / MANIFEST_NAME
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") != manifest["fingerprint"]:
            changed = sorted(k for k in manifest if k != "fingerprint" and existing.get(k) != manifest[k])
            raise InvalidInputError(f"DST {os.fspath(dest)!r} holds a data set made with other settings (differing: "
                                    f"{', '.join(changed) or 'format'}); use another DST, or delete it to start over")
    elif rank == 0:
        write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))


def compress_dataset(source: str | os.PathLike[str], dest: str | os.PathLike[str], pipeline: Pipeline, budget: int, *,
                     query: Tensor | None = None, query_mask: Tensor | None = None, batch_size: int = 64,
                     workers: int = 4, shard_size: int = 1000, token_dtype: torch.dtype = torch.float32,
                     max_shards: int | None = None, progress: bool = True) -> DatasetStats:
    """Compress every image of ``source`` into shards under ``dest``; this process's share when distributed.

    When ``torch.distributed`` is initialised, rank ``r`` of ``K`` takes shards ``r, r+K, ...``; after a
    barrier, rank 0 merges the index. Without a process group, one process does everything.

    Args:
        source: a folder of images (searched recursively) or a list file, one path a line.
        dest: the output folder (created); see :mod:`arrcoc.datasets.shards` for its layout.
        pipeline: this process's pipeline, on its device.
        budget: tokens per image.
        query: one query embedding for every image (``(D,)`` or ``(L, D)``), or None.
        query_mask: ``(L,)`` bool, True on real query tokens.
        batch_size: images per pipeline call (each call holds images of one bucket).
        workers: DataLoader worker processes decoding images (0: decode in this process).
        shard_size: images per shard (the unit of resumption).
        token_dtype: dtype of the stored tokens and prefix tokens.
        max_shards: write at most this many shards in this process, then stop (the run is resumable).
        progress: show a progress bar (rank 0 only) with images/s.

    Returns:
        :class:`DatasetStats` of this process.

    Raises:
        InvalidInputError: bad arguments, no images, or a ``dest`` made with other settings.
    """
    for name, value, low in (("budget", budget, 1), ("batch_size", batch_size, 1), ("workers", workers, 0),
                             ("shard_size", shard_size, 1), ("max_shards", 1 if max_shards is None else max_shards, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be a whole number >= {low}; got {value!r}")
    if token_dtype not in _TOKEN_DTYPES.values():
        raise InvalidInputError(f"token_dtype must be one of {sorted(_TOKEN_DTYPES)}; got {token_dtype}")
    pipeline.prepare_query(query, query_mask, 1)  # a bad query fails here, before any work
    rank, world = _rank_world()
    stats = DatasetStats(rank=rank, world_size=world)
    dest = Path(dest)
    sources = list_sources(source)
    manifest = _manifest(sources, budget, shard_size, pipeline, query, token_dtype)
    (dest / "shards").mkdir(parents=True, exist_ok=True)
    _check_manifest(dest, manifest, rank)
    if rank == 0:
        (dest / INDEX_NAME).unlink(missing_ok=True)  # rewritten when every shard exists
    shards, fingerprint = manifest["shards"], manifest["fingerprint"]

    todo = []
    for shard in range(rank, shards, world):
        path = shard_file(dest, shard)
        remove_partial(path.parent, [path.name])  # a killed writer's temporaries
        found = read_shard_records(path)
        if found is not None and found[0] == fingerprint:
            stats.shards_skipped += 1
        else:
            todo.append(shard)
    todo = todo[:max_shards] if max_shards is not None else todo
    items = [(i, sources[i]) for shard in todo for i in range(shard * shard_size, min(len(sources), (shard + 1) * shard_size))]
    logger.info("rank %d/%d: %d shards to write (%d images), %d already complete", rank, world, len(todo), len(items),
                stats.shards_skipped)

    writer = _ShardWriter(pipeline, dest, budget, query, query_mask, batch_size, token_dtype, fingerprint, stats)
    loader = torch.utils.data.DataLoader(_Decode(items, pipeline.config.buckets), batch_size=min(batch_size, 16),
                                         num_workers=workers, collate_fn=_as_list)
    start = time.perf_counter()
    with tqdm(total=len(items), unit="img", desc=f"rank {rank}/{world}", disable=not progress or rank != 0,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for chunk in _timed(loader, stats):
            for item in chunk:
                writer.add(item, item.index // shard_size)
            stats.images += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(errors=stats.errors, refresh=False)
        writer.finish()
    stats.seconds = time.perf_counter() - start

    _barrier(pipeline.device)
    if rank == 0 and all(read_shard_records(shard_file(dest, k)) is not None for k in range(shards)):
        merge_index(dest, shards, len(sources), fingerprint)
    _barrier(pipeline.device)
    stats.complete = (dest / INDEX_NAME).is_file()
    return stats


def _timed(loader: torch.utils.data.DataLoader, stats: DatasetStats) -> Iterator[list[_Loaded]]:
    """Iterate ``loader``, adding the time spent waiting for it to ``stats.wait_seconds``."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        finally:
            stats.wait_seconds += time.perf_counter() - start
        yield chunk


# --- command line ---------------------------------------------------------------------------------------------------
@dataclass
class _Launch:
    """Where this process runs: rank facts from torchrun's environment, and whether we opened the process group."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False


def _launch(device: str | None, timeout_minutes: float) -> _Launch:
    """Join torchrun's process group when launched by it (nccl on GPUs, gloo on CPUs); choose this rank's device."""
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    local = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if device not in (None, "cpu", "cuda"):
        raise InvalidInputError(f"--device must be cpu or cuda (each process takes GPU LOCAL_RANK); got {device!r}")
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA GPU is available")
    if use_cuda and local >= torch.cuda.device_count():
        raise InvalidInputError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible")
    chosen = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if not launched or dist.is_initialized():
        return _Launch(chosen)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_cuda:
        dist.init_process_group("nccl", timeout=timeout, device_id=chosen)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return _Launch(chosen, dist.get_rank(), dist.get_world_size(), owns_group=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc compress-dataset",
        description="Compress a folder (searched recursively) or a list file of images into sharded safetensors "
                    "plus DST/index.jsonl. Under torchrun, one process per GPU. Run it again to resume.",
        epilog="read back: arrcoc.datasets.shards.load_index(DST), arrcoc.datasets.shards.load_record(DST, record). "
               f"Exit codes: 0 complete (broken images are records in the index), {EXIT_INCOMPLETE} stopped early "
               "(--max-shards; run again to resume), 2 bad arguments.")
    parser.add_argument("source", metavar="SRC", help="a folder of images, or a text file with one image path a line")
    parser.add_argument("dest", metavar="DST", help="output folder")
    parser.add_argument("--budget", type=int, required=True, help="tokens per image")
    parser.add_argument("--query-file", default=None, help="one query embedding for every image: a .safetensors "
                                                           "file with 'query' (D,) or (L, D) [and 'query_mask'], or a .pt tensor")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default 64)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per GPU (default 4)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--max-shards", type=int, default=None, help="write at most this many shards per process, "
                                                                     f"then stop with exit code {EXIT_INCOMPLETE}")
    parser.add_argument("--token-dtype", default="float32", choices=sorted(_TOKEN_DTYPES), help="stored token dtype")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="encoder dtype (default: the pipeline's)")
    parser.add_argument("--preset", default=None, help="build the pipeline from a named preset (default, tiny)")
    parser.add_argument("--pretrained", default=None, help="a folder saved by Pipeline.save_pretrained")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--timeout-minutes", type=float, default=60.0, help="how long a rank waits for the others")
    parser.add_argument("--stats-json", default=None, help="write this process's statistics here "
                                                           "('{rank}' is replaced by the rank)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``arrcoc compress-dataset``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    launch = None
    try:
        launch = _launch(args.device, args.timeout_minutes)
        overrides = {"encoder_dtype": args.dtype} if args.dtype else {}
        if args.preset:
            pipe = Pipeline(PipelineConfig.from_name(args.preset, **overrides), device=launch.device)
        else:
            pipe = Pipeline.from_pretrained(args.pretrained, device=launch.device, **overrides)
        query, query_mask = (None, None)
        if args.query_file:
            query, query_mask = load_query(argparse.Namespace(query_embedding=args.query_file))
        stats = compress_dataset(args.source, args.dest, pipe, args.budget, query=query, query_mask=query_mask,
                                 batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                                 token_dtype=_TOKEN_DTYPES[args.token_dtype], max_shards=args.max_shards,
                                 progress=not args.quiet)
    except ArrcocError as err:
        print(f"arrcoc compress-dataset: error: {err}", file=sys.stderr)
        return 2
    finally:
        if launch is not None and launch.owns_group:
            dist.destroy_process_group()
    if args.stats_json:
        path = Path(args.stats_json.replace("{rank}", str(stats.rank)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats.to_dict(), indent=1))
    print(f"arrcoc compress-dataset: rank {stats.rank}/{stats.world_size}: {stats.images} images ({stats.errors} broken), "
          f"{stats.shards_written} shards written, {stats.shards_skipped} already complete, "
          f"{stats.images_per_second:.1f} images/s on {launch.device}")
    if stats.rank == 0:
        if stats.complete:
            print(f"arrcoc compress-dataset: complete: {Path(args.dest) / INDEX_NAME}")
        else:
            print("arrcoc compress-dataset: incomplete (shards remain); run the same command again to resume")
    return 0 if stats.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    raise SystemExit(main())
