"""``arrcoc compress-dataset``: compress a folder (or list) of images into sharded safetensors, on one or many GPUs.

One process::

    arrcoc compress-dataset photos/ tokens/ --budget 64

One process per GPU (or more), with PyTorch's launcher (rank ``r`` of ``K`` takes shards ``r, r+K, r+2K, ...``, runs
on GPU ``LOCAL_RANK`` with its own pipeline and graph cache; rank 0 merges the index at the end)::

    torchrun --nproc-per-node 4 -m arrcoc.cli compress-dataset photos/ tokens/ --budget 64

More processes than GPUs share them (rank ``r`` on GPU ``LOCAL_RANK`` mod the GPUs, the group over gloo): a
process decodes one batch of JPEGs at a time, so two processes per GPU decode photo-sized files side by side.

On CUDA (the batched path), reader threads read the files and their JPEG headers while the GPU compresses the
previous batch, and JPEGs are decoded and letterboxed on the GPU a batch at a time; the few files nvJPEG does
not decode as Pillow does are decoded by Pillow in the reader threads. Without CUDA (the Pillow path),
DataLoader worker processes decode and bucket every image on the CPU. A batch holds images of one bucket. Which
images share a batch depends only on the shard, never on the number of processes, so one process and ``K``
processes write the same tensors.

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
import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from ..cli_help import HelpFormatter
from ..config import PipelineConfig
from ..errors import ArrcocError, InvalidInputError
from ..pipeline import Pipeline
from ..stages.gpu_input import JPEG_SUFFIXES, decode_jpegs, jpeg_file, letterbox, placement, valid_mask
from ..stages.preprocess import PreprocessedBatch, Preprocessor, load_image
from .atomic import remove_partial
from .shards import (
    FORMAT,
    INDEX_NAME,
    MANIFEST_NAME,
    ShardFile,
    merge_index,
    read_shard_records,
    shard_file,
    write_text_atomic,
)
from .sources import IMAGE_SUFFIXES, image_files, load_query

__all__ = ["DatasetStats", "compress_dataset", "list_sources", "main"]

#: Reader threads by default on the batched path when nearly every file is a JPEG: a reader then only reads bytes and
#: headers, holding the interpreter lock while it parses, and each thread more takes that lock from the main and
#: decode threads (H200, the benchmark set, two runs each: 1 reader 5,144-5,392 images/s, 4 readers 4,368-4,624,
#: 12 readers 4,251-4,352; ``bench/results/dataset-readers-nvidia-h200.txt``, docs/decisions.md).
JPEG_READERS = 1
#: Readers by default otherwise: Pillow decodes the other files in them (threads on the batched path, DataLoader
#: worker processes on the Pillow path), and they run in parallel.
READERS = 4
#: The share of JPEG file names from which a data set reads with ``JPEG_READERS``.
JPEG_SHARE = 0.9
#: On CUDA, read large JPEG files (``gpu_input.PINNED_MIN_BYTES``) into page-locked memory (``ARRCOC_PINNED_READS=0``:
#: pageable).
PINNED_READS: bool = os.environ.get("ARRCOC_PINNED_READS", "1") != "0"

#: ``--compile``'s choices, as ``Pipeline`` keyword arguments.
COMPILE_CHOICES: dict[str, dict[str, Any]] = {
    "auto": {"compile": "head", "compile_in_background": "deferred"},
    "off": {"compile": False},
    "head": {"compile": "head"},
    "all": {"compile": True},
    "background": {"compile": "head", "compile_in_background": True},
}
#: ``--compile``'s default: plain graphs, and the head compiled beside them once the job has work enough left.
COMPILE_DEFAULT = "auto"
#: A job whose pipeline defers its background compile (``--compile auto``) decides once, this many seconds into its
#: run (its first captures done, its rate settled), whether to start it.
COMPILE_PROBE_SECONDS = 5.0
#: ... and starts it when the images left would take at least this long at its rate so far: where a compile from
#: cold caches breaks even (H100, 1,000 photos a pass: 152 s of compile, the job at 67% of its plain rate beside it,
#: +11% once compiled, so 616 s; ``bench/results/compile-timeline-nvidia-h100-cold.json``, docs/datasets.md). With
#: warm caches it repays sooner.
COMPILE_WORTH_SECONDS = 600.0


def compile_options(choice: str, batch_size: int, device: torch.device) -> dict[str, Any]:
    """``Pipeline`` keyword arguments for ``--compile choice`` on ``device``: compiled, every batch pads to the job's
    batch size, so that each bucket size compiles once, not once per size of its last batches; ``auto`` is ``off``
    off CUDA, where no graph is captured."""
    if choice == "auto" and device.type != "cuda":
        choice = "off"
    options = COMPILE_CHOICES[choice]
    return {**options, "graph_batch": batch_size if options["compile"] else None}


logger = logging.getLogger(__name__)

#: Exit code of a run that stopped before every shard was written (``--max-shards``); run it again to resume.
EXIT_INCOMPLETE = 75

#: The decode thread's share of a run above which a lone process on a GPU suggests a second one beside it (on an
#: H100 the photos' decode thread was busy 88-94%, and two processes on the GPU gained 2-28%; ``docs/datasets.md``,
#: ``bench/results/dataset-nvidia-h100-80gb-hbm3*.md``).
DECODE_BOUND_SHARE = 0.8

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
        startup_seconds: of ``seconds``, starting the reader (a fixed cost per run): the DataLoader's worker
            processes on the Pillow path, a thread pool on the batched path.
        drain_seconds: of ``seconds``, the wait at the end for the last shard's write.
        wait_seconds: host time waiting for the reader (reading files and headers, decoding on the host).
        decode_seconds: main-thread time getting a batch's decoded images: on CUDA, waiting for the decode
            thread (nvJPEG's host side runs there, overlapping the rest); on the CPU, decoding.
        decode_thread_seconds: time in the decode thread (nvJPEG calls, files it refused decoded by Pillow);
            it overlaps the rest.
        resize_seconds: host time making the batch: letterbox on the device, host-decoded images copied in.
        pipeline_seconds: host time inside pipeline calls.
        copy_seconds: host time issuing the copies of the results to the host (non-blocking).
        write_seconds: time in the writer thread (waiting for the copies, putting rows in place, writing
            shards); it overlaps the rest.
        device_decoded, host_decoded: images decoded by nvJPEG, and by Pillow.
        readers: the reader threads (batched path) or DataLoader worker processes (Pillow path) this run used.
        gpu_ms: device milliseconds per step (decode, resize, pipeline, copy-out) from CUDA events.
        compile_started_at: seconds into the run at which this process started its pipeline's deferred compile
            (``compile_in_background="deferred"``), or None.
        complete: every shard of the data set exists and the index is written.
    """

    rank: int = 0
    world_size: int = 1
    images: int = 0
    errors: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    drain_seconds: float = 0.0
    wait_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_thread_seconds: float = 0.0
    resize_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    copy_seconds: float = 0.0
    write_seconds: float = 0.0
    device_decoded: int = 0
    host_decoded: int = 0
    readers: int = 0
    gpu_ms: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("decode", "resize", "pipeline", "copy-out"), 0.0)
    )
    compile_started_at: float | None = None
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
            raise InvalidInputError(
                f"SRC must be a folder of images or a list file (one path a line); got the image {os.fspath(path)!r}"
            )
        lines = (line.strip() for line in path.read_text().splitlines())
        found = [os.fspath(path.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise InvalidInputError(f"SRC {os.fspath(path)!r}: no such folder or list file")
    if not found:
        raise InvalidInputError(f"SRC {os.fspath(path)!r} names no images")
    return found


@dataclass
class _Loaded:
    """One source image as the reader hands it over (or the reason it failed).

    A JPEG that nvJPEG decodes as Pillow does travels as its file's bytes (``data``), decoded and letterboxed
    with its batch on the GPU; any other image is decoded and letterboxed by the Preprocessor in the reader
    (``pixels``). ``bucket``, ``scale``, ``source_size`` and ``content_size`` are known either way.
    """

    index: int
    source: str
    data: Tensor | None = None  # (bytes,) uint8, the file's bytes
    pixels: Tensor | None = None  # (3, S, S) float32, the Preprocessor's canvas
    error: str | None = None
    bucket: int = 0
    scale: float = 0.0
    source_size: list[int] | None = None
    content_size: tuple[int, int] = (0, 0)


def _reason(err: Exception, source: str) -> str:
    return str(err) if isinstance(err, ArrcocError) else f"{source}: {type(err).__name__}: {err}"


class _Decode(torch.utils.data.Dataset):
    """``(index, path)`` items -> :class:`_Loaded`; any failure becomes an error record, never a dead reader.

    Args:
        items: ``(index, path)`` pairs.
        buckets: the pipeline's bucket sizes.
        device_jpegs: hand over JPEGs that nvJPEG decodes as their bytes (the batched path); else decode all here.
        pinned: read the large ones into page-locked memory (the batched path on CUDA): nvJPEG's copies of pageable
            bytes to the device are staged by the host, 115 µs a photo in the decode thread on the H200.
    """

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        buckets: Sequence[int],
        device_jpegs: bool = False,
        pinned: bool = False,
    ) -> None:
        self.items = items
        self.buckets = tuple(buckets)
        self.device_jpegs = device_jpegs
        self.pinned = pinned
        self.preprocessor = Preprocessor(buckets, multiple=1)  # the pipeline's own bucketing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> _Loaded:
        index, source = self.items[position]
        found = jpeg_file(source, self.pinned) if self.device_jpegs else None
        if found is None:  # not a JPEG nvJPEG reads as Pillow does, or unreadable: the Pillow path names it
            return decode_on_host(index, source, self.preprocessor)
        data, size = found
        bucket, scale, content = placement(size[0], size[1], self.buckets)
        return _Loaded(
            index, source, data=data, bucket=bucket, scale=scale, source_size=list(size), content_size=content
        )


def decode_on_host(index: int, source: str, preprocessor: Preprocessor) -> _Loaded:
    """The Pillow path: Pillow decodes, the Preprocessor resizes and letterboxes; a failure is an error record."""
    try:
        (group,) = preprocessor([load_image(source, name=source)])
        h, w = group.content_size[0].tolist()  # ok-sync: a CPU tensor, in a reader
        return _Loaded(
            index,
            source,
            pixels=group.pixels[0],
            bucket=group.bucket,
            scale=float(group.scale[0]),
            source_size=group.source_size[0].tolist(),  # ok-sync: a CPU tensor
            content_size=(h, w),
        )  # ok-sync: CPU tensors
    except Exception as err:  # noqa: BLE001 - a broken file is a record, whatever the decoder raised
        return _Loaded(index, source, error=_reason(err, source))


class _ThreadedReader:
    """The batched path's reader: :class:`_Decode` run by a pool of threads in this process, in order.

    There it only reads files and their headers (and decodes the odd file that needs Pillow), work that spends
    its time in system calls and in Pillow, both outside the GIL; threads start at once, where worker processes
    cost a fork each (a large one in a process holding a CUDA context) and a pickle per item. Iterating it yields
    chunks of ``chunk`` items, at most ``2 * threads`` chunks read ahead of the consumer (which bounds memory).

    Args:
        dataset: the items to read.
        threads: reader threads (0: read in the consuming thread).
        chunk: items per chunk (one task of a thread).
    """

    def __init__(self, dataset: _Decode, threads: int, chunk: int) -> None:
        self.dataset, self.threads, self.chunk = dataset, threads, chunk

    def _read(self, start: int) -> list[_Loaded]:
        return [self.dataset[p] for p in range(start, min(start + self.chunk, len(self.dataset)))]

    def __iter__(self) -> Iterator[list[_Loaded]]:
        starts = iter(range(0, len(self.dataset), self.chunk))
        if self.threads == 0:
            return map(self._read, starts)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="arrcoc-read")
        ahead = deque(pool.submit(self._read, start) for start in itertools.islice(starts, 2 * self.threads))
        return self._in_order(pool, ahead, starts)

    def _in_order(
        self, pool: ThreadPoolExecutor, ahead: deque[Future[list[_Loaded]]], starts: Iterator[int]
    ) -> Iterator[list[_Loaded]]:
        try:
            while ahead:
                chunk = ahead.popleft().result()
                for start in itertools.islice(starts, 1):
                    ahead.append(pool.submit(self._read, start))
                yield chunk
        finally:  # a consumer that stops early leaves no reads running
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Decoded:
    """One batch after the decode step: JPEGs decoded on the device, the rest letterboxed by the reader."""

    bucket: int
    jpegs: list[_Loaded]  # decoded by nvJPEG, in the order of ``images``
    images: list[Tensor]  # (3, h, w) uint8 on the device
    hosted: list[_Loaded]  # letterboxed on the host (by the reader, or here for files nvJPEG refused)
    failed: list[_Loaded]  # files that turned out broken
    events: tuple[Any, ...] = ()  # CUDA events before and after the decode


@dataclass
class _Compressed:
    """One pipeline call's results on their way to the host (``ready`` fires when the copies have landed)."""

    items: list[_Loaded]
    host: dict[str, Tensor]
    ready: Any = None  # a torch.cuda.Event, or None on the CPU
    events: tuple[Any, ...] = ()  # CUDA events around decode, resize, pipeline, copy-out


@dataclass
class _Shard:
    """One open shard: its file and which of its images compressed (both filled in the writer thread), and which
    failed (the main thread's)."""

    number: int
    first: int  # the index of its first image
    file: ShardFile
    placed: list[_Loaded] = field(default_factory=list)
    errors: dict[int, tuple[_Loaded, str]] = field(default_factory=dict)


class _Background:
    """One thread that runs jobs (placing a batch's rows, writing a shard) in submission order while the main
    thread keeps the GPU busy; at most ``depth`` wait, so the main thread runs at most that far ahead.

    A failure in the thread is raised again in the main thread at its next :meth:`submit` or :meth:`close`.
    """

    def __init__(self, depth: int) -> None:
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="arrcoc-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self.error = err

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()


class _ShardWriter:
    """Collects one shard's images into batches of one bucket, compresses them, and has the shard written.

    Each batch becomes one :class:`~arrcoc.stages.preprocess.PreprocessedBatch` made on the pipeline's device
    (JPEGs decoded and letterboxed there together, other images letterboxed by the reader and copied in), one
    pipeline call, and non-blocking copies of its results to pinned host memory; a background thread waits for
    each batch's copies and puts its rows in their places in the shard's file (:class:`ShardFile`), so that when a
    shard's last batch is done only its header remains to be written.
    """

    #: Batches handed to the decode thread beyond the one being compressed.
    decode_ahead = 1

    def __init__(
        self,
        pipe: Pipeline,
        dest: Path,
        budget: int,
        query: Tensor | None,
        query_mask: Tensor | None,
        batch_size: int,
        shard_size: int,
        sources: Sequence[str],
        token_dtype: torch.dtype,
        fingerprint: str,
        stats: DatasetStats,
        budget_policy: str = "exact",
        decode_thread: bool | None = None,
    ) -> None:
        self.pipe, self.dest, self.budget, self.query, self.query_mask = pipe, dest, budget, query, query_mask
        self.batch_size, self.token_dtype, self.fingerprint, self.stats = batch_size, token_dtype, fingerprint, stats
        self.shard_size, self.sources, self.budget_policy = shard_size, sources, budget_policy
        self.device = pipe.device
        self.cuda = self.device.type == "cuda"
        self.preprocessor = Preprocessor(pipe.config.buckets, multiple=1)
        # up to two shards' batches (full ones, a partial one per bucket, the write) wait for the writer thread,
        # so that writing one shard never stalls the batches of the next
        buckets = len(pipe.config.buckets)
        self.background = _Background(depth=2 * (-(-shard_size // batch_size) + buckets + 1))
        # nvJPEG's host side (about half a millisecond per photo) runs in this thread while the main thread
        # compresses the batch before. The lock keeps its device work, queued on the pipeline's stream, out of the
        # pipeline's graph captures (held there through the graph cache), not out of its replays.
        threaded = self.cuda if decode_thread is None else decode_thread
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="arrcoc-decode") if threaded else None
        self.stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.lock = threading.Lock()
        self.cache_lock = pipe.graph_cache.capture_lock  # put back by close()
        if threaded:
            pipe.graph_cache.capture_lock = self.lock
        self.decoding: deque[Future[_Decoded]] = deque()
        self.shard: _Shard | None = None
        self.unwritten: dict[int, _Shard] = {}  # opened, not yet written: their files are temporaries
        self.pending: dict[int, list[_Loaded]] = {}

    def add(self, item: _Loaded, shard: int) -> None:
        if self.shard is None or shard != self.shard.number:
            self.finish()
            self.shard = self._open(shard)
        if item.error is not None:
            self._fail(item, item.error)
            return
        queue_ = self.pending.setdefault(item.bucket, [])
        queue_.append(item)
        if len(queue_) == self.batch_size:
            self._compress(self.pending.pop(item.bucket))

    def _open(self, number: int) -> _Shard:
        first = number * self.shard_size
        sources = self.sources[first : first + self.shard_size]
        file = ShardFile(shard_file(self.dest, number), len(sources), self._header_room(number, sources))
        self.unwritten[number] = _Shard(number, first, file)
        return self.unwritten[number]

    def _header_room(self, number: int, sources: Sequence[str]) -> int:
        """Bytes that hold a shard's header when every image compresses: its records with their numbers at their
        widest, as a JSON text inside the JSON header (whose escaping at most doubles a source's text), and the
        tensor entries."""
        widest = _Loaded(2**63, "", bucket=2**31, source_size=[2**31, 2**31])
        record = {**self._record(widest, number, "ok", None), "offset": 2**63}
        per_record = len(json.dumps(json.dumps(record, separators=(",", ":")))) + 2  # and the comma, escaped
        return len(sources) * per_record + 2 * sum(len(json.dumps(source)) for source in sources) + 4096

    def _fail(self, item: _Loaded, reason: str) -> None:
        logger.info("broken: %s", reason)
        self.shard.errors[item.index] = (item, reason)
        self.stats.errors += 1

    def _event(self, blocking: bool = False) -> Any:
        """A CUDA event recorded on the current stream (None on the CPU); ``blocking``: a thread waiting for it
        sleeps instead of spinning on a core."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True, blocking=blocking)
        event.record()
        return event

    def _decode(self, jpegs: list[_Loaded]) -> tuple[list[Tensor], list[_Loaded], list[_Loaded]]:
        """Decode on the device: ``(images, their items, items nvJPEG refused, now decoded on the host)``."""
        try:
            return decode_jpegs([item.data for item in jpegs], self.device), jpegs, []
        except (RuntimeError, ValueError):  # one bad file fails the batched call: one at a time, the rest on the host
            images, kept, refused = [], [], []
            for item in jpegs:
                try:
                    images += decode_jpegs([item.data], self.device)
                    kept.append(item)
                except (RuntimeError, ValueError):
                    refused.append(decode_on_host(item.index, item.source, self.preprocessor))
            return images, kept, refused

    def _decode_batch(self, items: list[_Loaded]) -> _Decoded:
        """The decode step of one batch (in the decode thread on CUDA): JPEGs to the device, decoded."""
        start = time.perf_counter()
        jpegs = [item for item in items if item.data is not None]
        hosted = [item for item in items if item.data is None]
        images: list[Tensor] = []
        failed: list[_Loaded] = []
        events: tuple[Any, ...] = ()
        with self.lock, torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            begin = self._event()
            if jpegs:
                images, jpegs, refused = self._decode(jpegs)
                for item in refused:
                    (failed if item.error is not None else hosted).append(item)
            if self.cuda:
                events = (begin, self._event())
        self.stats.decode_thread_seconds += time.perf_counter() - start
        return _Decoded(items[0].bucket, jpegs, images, hosted, failed, events)

    def _batch(self, decoded: _Decoded) -> tuple[PreprocessedBatch | None, list[_Loaded]]:
        """The batch on the device and its items in the batch's order (device-decoded JPEGs first)."""
        bucket, jpegs, images, hosted = decoded.bucket, decoded.jpegs, decoded.images, decoded.hosted
        for item in decoded.failed:
            self._fail(item, item.error)
        pixels, valid = [], []
        if images:
            made = letterbox(
                images, [item.content_size for item in jpegs], bucket, pad_value=self.preprocessor.pad_value
            )
            pixels.append(made[0])
            valid.append(made[1])
        if hosted:
            canvas = torch.stack([item.pixels for item in hosted])  # (b, 3, S, S), letterboxed by the workers
            if self.cuda:
                canvas = canvas.pin_memory().to(self.device, non_blocking=True)
            pixels.append(canvas)
            sizes = torch.tensor([item.content_size for item in hosted], dtype=torch.long)
            valid.append(valid_mask(sizes.to(self.device, non_blocking=True), bucket))
        ordered = jpegs + hosted
        if not ordered:  # every file of the batch turned out broken
            return None, []
        self.stats.device_decoded += len(jpegs)
        self.stats.host_decoded += len(hosted)
        batch = PreprocessedBatch(
            pixels=pixels[0] if len(pixels) == 1 else torch.cat(pixels),
            valid=valid[0] if len(valid) == 1 else torch.cat(valid),
            scale=torch.tensor([item.scale for item in ordered], dtype=torch.float32),
            source_size=torch.tensor([item.source_size for item in ordered], dtype=torch.long),
            content_size=torch.tensor([item.content_size for item in ordered], dtype=torch.long),
            indices=list(range(len(ordered))),
            names=[item.source for item in ordered],
            bucket=bucket,
        )
        return batch, ordered

    def _compress(self, items: list[_Loaded]) -> None:
        """Compress one batch: on CUDA its decode goes to the decode thread, where it runs while this thread
        compresses the batch before it; on the CPU at once."""
        if self.decoder is None:
            start = time.perf_counter()
            decoded = self._decode_batch(items)
            self.stats.decode_seconds += time.perf_counter() - start
            self._compress_decoded(decoded)
            return
        self.decoding.append(self.decoder.submit(self._decode_batch, items))
        while len(self.decoding) > self.decode_ahead:
            self._next()

    def _next(self) -> None:
        """Compress the oldest batch handed to the decode thread."""
        start = time.perf_counter()
        decoded = self.decoding.popleft().result()
        self.stats.decode_seconds += time.perf_counter() - start
        self._compress_decoded(decoded)

    def _compress_decoded(self, decoded: _Decoded) -> None:
        assembling = self._event()
        start = time.perf_counter()
        batch, items = self._batch(decoded)
        self.stats.resize_seconds += time.perf_counter() - start
        if not items:
            return
        resized = self._event()
        start = time.perf_counter()
        try:
            out = self.pipe(
                batch,
                query=self.query,
                query_mask=self.query_mask,
                budget=self.budget,
                copy=False,
                budget_policy=self.budget_policy,
            )  # views of graph buffers, copied below
        except ArrcocError as err:  # one image the pipeline rejects must not cost the others their tokens
            self.stats.pipeline_seconds += time.perf_counter() - start
            if len(items) == 1:
                message = str(err)
                self._fail(items[0], message if items[0].source in message else f"{items[0].source}: {message}")
                return
            for item in items:  # one at a time, in this thread
                self._compress_decoded(self._decode_batch([item]))
            return
        computed = self._event()
        self.stats.pipeline_seconds += time.perf_counter() - start
        for item in items:  # the bytes (a shared-memory blob) and canvases are not needed again
            item.data = item.pixels = None
        start = time.perf_counter()
        on_device = {
            "tokens": out.tokens.to(self.token_dtype),
            "prefix": out.prefix.to(self.token_dtype),
            **{key: getattr(out, key) for key in _DEVICE_KEYS},
        }
        # pinned destinations: the copies overlap the next batch, and the stream orders them before any replay
        host = {key: value.to("cpu", non_blocking=True) for key, value in on_device.items()}
        host.update({key: getattr(out, key) for key in _HOST_KEYS})  # per-image facts, on the host already
        ready = self._event(blocking=True)  # the writer thread waits for it
        self.stats.copy_seconds += time.perf_counter() - start
        events = (*decoded.events, assembling, resized, computed, ready) if self.cuda and decoded.events else ()
        self.background.submit(functools.partial(self._place, self.shard, _Compressed(items, host, ready, events)))

    def finish(self) -> None:
        """Compress what is pending and hand the shard to the writer thread (nothing when no shard is open)."""
        if self.shard is None:
            return
        for bucket in sorted(self.pending):
            self._compress(self.pending.pop(bucket))
        while self.decoding:
            self._next()
        self.background.submit(functools.partial(self._write, self.shard))
        self.shard = None

    def close(self) -> None:
        """Stop the decode thread and wait for the shards handed to the writer thread; the temporary files of
        shards left unwritten (a failed run) are removed."""
        if self.decoder is not None:
            self.decoder.shutdown(wait=True, cancel_futures=True)
        self.pipe.graph_cache.capture_lock = self.cache_lock
        try:
            self.background.close()
        finally:
            for shard in self.unwritten.values():
                shard.file.discard()

    def _record(self, item: _Loaded, shard: int, status: str, error: str | None) -> dict[str, Any]:
        return {
            "index": item.index,
            "source": item.source,
            "shard": f"{shard_file('', shard).as_posix()}",
            "offset": None,
            "budget": self.budget,
            "status": status,
            "error": error,
            "bucket": item.bucket or None,
            "source_size": item.source_size,
        }

    def _place(self, shard: _Shard, part: _Compressed) -> None:
        """In the writer thread: wait for one batch's copies and put its rows in their places in the shard."""
        start = time.perf_counter()
        if part.ready is not None:
            part.ready.synchronize()
            if part.events:
                begin, decoded, assembling, resized, computed, ready = part.events
                self.stats.gpu_ms["decode"] += begin.elapsed_time(decoded)
                self.stats.gpu_ms["resize"] += assembling.elapsed_time(resized)
                self.stats.gpu_ms["pipeline"] += resized.elapsed_time(computed)
                self.stats.gpu_ms["copy-out"] += computed.elapsed_time(ready)
        rows = {
            **part.host,
            "scale": torch.tensor([item.scale for item in part.items], dtype=torch.float32),
            "source_size": torch.tensor([item.source_size for item in part.items], dtype=torch.long),
        }
        shard.file.place([item.index - shard.first for item in part.items], rows)
        shard.placed.extend(part.items)
        self.stats.write_seconds += time.perf_counter() - start

    def _write(self, shard: _Shard) -> None:
        """In the writer thread, after the shard's last batch is placed: its records, and the file."""
        start = time.perf_counter()
        number = shard.number
        records = {index: self._record(item, number, "error", reason) for index, (item, reason) in shard.errors.items()}
        for offset, item in enumerate(sorted(shard.placed, key=lambda placed: placed.index)):
            records[item.index] = {**self._record(item, number, "ok", None), "offset": offset}
        shard.file.finish([records[i] for i in sorted(records)], self.fingerprint)
        del self.unwritten[number]
        self.stats.write_seconds += time.perf_counter() - start
        self.stats.shards_written += 1


#: Results copied from the device per batch; the rest of a row is known on the host (see _HOST_KEYS).
_DEVICE_KEYS = ("positions", "mask", "weights", "allocation", "relevance")
_HOST_KEYS = ("region_grid", "patch_grid", "bucket", "budget")


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


def _manifest(
    sources: list[str],
    budget: int,
    shard_size: int,
    pipe: Pipeline,
    query: Tensor | None,
    token_dtype: torch.dtype,
    budget_policy: str = "exact",
) -> dict[str, Any]:
    """Everything that decides a shard's content; its hash is the run's fingerprint."""
    listing = hashlib.sha256("\n".join(sources).encode()).hexdigest()
    query_hash = (
        None if query is None else hashlib.sha256(query.detach().float().cpu().numpy().tobytes()).hexdigest()  # ok-sync
    )  # hashing the query once, before the run
    manifest = {
        "format": FORMAT,
        "images": len(sources),
        "sources_sha256": listing,
        "shard_size": shard_size,
        "shards": -(-len(sources) // shard_size),
        "budget": budget,
        "token_dtype": str(token_dtype).split(".")[-1],
        "config": json.loads(pipe.config.to_json()),
        "weights": pipe.weights_path,
        "query_sha256": query_hash,
    }
    if budget_policy != "exact":  # absent for exact budgets: data sets made before the option keep their fingerprint
        manifest["budget_policy"] = budget_policy
    manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest


def _check_manifest(dest: Path, manifest: dict[str, Any], rank: int) -> None:
    """Refuse to mix runs of other settings in one folder; rank 0 writes the manifest of a new data set."""
    path = dest / MANIFEST_NAME
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") != manifest["fingerprint"]:
            changed = sorted(k for k in manifest if k != "fingerprint" and existing.get(k) != manifest[k])
            raise InvalidInputError(
                f"DST {os.fspath(dest)!r} holds a data set made with other settings (differing: "
                f"{', '.join(changed) or 'format'}); use another DST, or delete it to start over"
            )
    elif rank == 0:
        write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))


def compress_dataset(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    pipeline: Pipeline,
    budget: int,
    *,
    query: Tensor | None = None,
    query_mask: Tensor | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    shard_size: int = 1000,
    token_dtype: torch.dtype = torch.float32,
    max_shards: int | None = None,
    progress: bool = True,
    budget_policy: str = "exact",
    batch_decode: bool | None = None,
) -> DatasetStats:
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
        workers: readers: threads reading files on the batched path, DataLoader worker processes decoding
            images on the Pillow path (0: read in this thread). None: on the batched path ``JPEG_READERS`` (1) when
            at least 90% of this process's files are named as JPEGs, else ``READERS`` (4). Raise it for storage
            with a high latency per file (network file systems), where more reads in flight pay.
        shard_size: images per shard (the unit of resumption).
        token_dtype: dtype of the stored tokens and prefix tokens.
        max_shards: write at most this many shards in this process, then stop (the run is resumable).
        progress: show a progress bar (rank 0 only) with images/s.
        budget_policy: ``"exact"``: an image whose content yields fewer tokens than ``budget`` is an error
            record; ``"cap"``: its budget is lowered to what it yields (the stored ``budget`` says so).
        batch_decode: decode JPEGs in batches on the pipeline's device (nvJPEG) and letterbox each batch there
            (:mod:`arrcoc.stages.gpu_input`); other files are decoded by Pillow in the reader threads. Default:
            on CUDA. ``False``: Pillow and the Preprocessor in DataLoader workers for every file.

    Returns:
        :class:`DatasetStats` of this process.

    Raises:
        InvalidInputError: bad arguments, no images, or a ``dest`` made with other settings.
    """
    for name, value, low in (
        ("budget", budget, 1),
        ("batch_size", batch_size, 1),
        ("workers", 0 if workers is None else workers, 0),
        ("shard_size", shard_size, 1),
        ("max_shards", 1 if max_shards is None else max_shards, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be a whole number >= {low}; got {value!r}")
    if token_dtype not in _TOKEN_DTYPES.values():
        raise InvalidInputError(f"token_dtype must be one of {sorted(_TOKEN_DTYPES)}; got {token_dtype}")
    if budget_policy not in ("exact", "cap"):
        raise InvalidInputError(f"budget_policy must be 'exact' or 'cap'; got {budget_policy!r}")
    pipeline.prepare_query(query, query_mask, 1)  # a bad query fails here, before any work
    rank, world = _rank_world()
    stats = DatasetStats(rank=rank, world_size=world)
    dest = Path(dest)
    sources = list_sources(source)
    manifest = _manifest(sources, budget, shard_size, pipeline, query, token_dtype, budget_policy)
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
    items = [
        (i, sources[i])
        for shard in todo
        for i in range(shard * shard_size, min(len(sources), (shard + 1) * shard_size))
    ]
    logger.info(
        "rank %d/%d: %d shards to write (%d images), %d already complete",
        rank,
        world,
        len(todo),
        len(items),
        stats.shards_skipped,
    )

    writer = _ShardWriter(
        pipeline,
        dest,
        budget,
        query,
        query_mask,
        batch_size,
        shard_size,
        sources,
        token_dtype,
        fingerprint,
        stats,
        budget_policy,
    )
    batched = pipeline.device.type == "cuda" if batch_decode is None else batch_decode
    if workers is None:
        jpegs = sum(source.lower().endswith(JPEG_SUFFIXES) for _, source in items)
        workers = JPEG_READERS if batched and jpegs >= JPEG_SHARE * len(items) else READERS
    stats.readers = workers
    pinned = batched and pipeline.device.type == "cuda" and PINNED_READS
    decode = _Decode(items, pipeline.config.buckets, device_jpegs=batched, pinned=pinned)
    chunk = min(batch_size, 32)
    reader: Iterable[list[_Loaded]] = (
        _ThreadedReader(decode, workers, chunk)
        if batched
        else torch.utils.data.DataLoader(decode, batch_size=chunk, num_workers=workers, collate_fn=list)
    )
    start = time.perf_counter()
    with tqdm(
        total=len(items),
        unit="img",
        desc=f"rank {rank}/{world}",
        disable=not progress or rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        deferred = pipeline.compiled_chains is not None and not pipeline.compile_started
        try:
            for loaded in _timed(reader, stats):
                for item in loaded:
                    writer.add(item, item.index // shard_size)
                stats.images += len(loaded)
                bar.update(len(loaded))
                bar.set_postfix(errors=stats.errors, refresh=False)
                elapsed = time.perf_counter() - start
                if deferred and elapsed >= COMPILE_PROBE_SECONDS:
                    deferred = False
                    if _start_compile(pipeline, stats, elapsed, len(items) - stats.images):
                        bar.set_postfix(errors=stats.errors, compiling=True, refresh=False)
            writer.finish()
        finally:
            drain = time.perf_counter()
            writer.close()  # waits for the shards handed over; a failed run writes no partial shard
    stats.seconds = time.perf_counter() - start
    stats.drain_seconds = time.perf_counter() - drain

    _barrier(pipeline.device)
    if rank == 0 and all(read_shard_records(shard_file(dest, k)) is not None for k in range(shards)):
        merge_index(dest, shards, len(sources), fingerprint)
    _barrier(pipeline.device)
    stats.complete = (dest / INDEX_NAME).is_file()
    return stats


def _start_compile(pipeline: Pipeline, stats: DatasetStats, elapsed: float, left: int) -> bool:
    """Start ``pipeline``'s deferred compile if the ``left`` images would take ``COMPILE_WORTH_SECONDS`` at this
    run's rate so far (its captures included, so the rate errs low and the estimate long); returns whether it did."""
    seconds_left = left * elapsed / max(stats.images, 1)
    if seconds_left < COMPILE_WORTH_SECONDS:
        return False
    pipeline.start_compile()
    stats.compile_started_at = elapsed
    logger.info(
        "rank %d: compiling arrcoc's stages beside the plain graphs (about %.0f s of work left)",
        stats.rank,
        seconds_left,
    )
    return True


def _timed(reader: Iterable[list[_Loaded]], stats: DatasetStats) -> Iterator[list[_Loaded]]:
    """Iterate ``reader``, adding the time spent starting it to ``stats.startup_seconds`` and the time spent
    waiting for it to ``stats.wait_seconds``."""
    start = time.perf_counter()
    iterator = iter(reader)  # starts the DataLoader's worker processes, or the reader threads
    stats.startup_seconds += time.perf_counter() - start
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
    """Join torchrun's process group when launched by it; choose this rank's device.

    Ranks take GPU ``LOCAL_RANK`` modulo the GPUs visible, so more processes than GPUs share them: a process decodes
    one batch at a time (nvJPEG's host call bounds photo-sized JPEGs), and a second process on the same GPU decodes
    beside it. NCCL holds one rank per GPU, so a group whose GPUs are shared (and a CPU group) uses gloo; the job
    only meets at barriers."""
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    local = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) if launched else 1  # 0: not told (not torchrun)
    if device not in (None, "cpu", "cuda"):
        raise InvalidInputError(
            f"--device must be cpu or cuda (each process takes GPU LOCAL_RANK mod the GPUs); got {device!r}"
        )
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: no CUDA GPU is available")
    gpus = torch.cuda.device_count() if use_cuda else 0
    if use_cuda and local >= gpus and not per_node:  # every rank of a node must agree on the backend
        raise InvalidInputError(
            f"LOCAL_RANK {local} has no GPU of its own ({gpus} visible) and LOCAL_WORLD_SIZE is not set; "
            "launch with torchrun to run more processes than GPUs"
        )
    chosen = torch.device("cuda", local % gpus) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if not launched or dist.is_initialized():
        return _Launch(chosen)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_cuda and per_node <= gpus:  # a launcher that does not say how many share the node: one per GPU
        dist.init_process_group("nccl", timeout=timeout, device_id=chosen)
    else:
        if use_cuda and local == 0:
            logger.warning("%d processes share %d GPU(s) on this node (process group: gloo)", per_node, gpus)
        dist.init_process_group("gloo", timeout=timeout)
    return _Launch(chosen, dist.get_rank(), dist.get_world_size(), owns_group=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc compress-dataset",
        formatter_class=HelpFormatter,
        description="Compress a folder (searched recursively) or a list file of images into sharded safetensors\n"
        "plus DST/index.jsonl. Under torchrun, one process per GPU (two per GPU decode photos faster).\n"
        "Run it again to resume.",
        epilog="read back: arrcoc.datasets.shards.load_index(DST), arrcoc.datasets.shards.load_record(DST, record)\n"
        f"exit codes: 0 complete (broken images are records in the index), {EXIT_INCOMPLETE} stopped early\n"
        "(--max-shards; run again to resume), 2 bad arguments",
    )
    parser.add_argument("source", metavar="SRC", help="a folder of images, or a text file with one image path a line")
    parser.add_argument("dest", metavar="DST", help="output folder")
    parser.add_argument("--budget", type=int, required=True, help="tokens per image")
    parser.add_argument(
        "--query-file",
        default=None,
        help="one query embedding for every image: a .safetensors "
        "file with 'query' (D,) or (L, D) [and 'query_mask'], or a .pt tensor",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="readers per process: threads on CUDA (JPEGs decoded on the GPU), DataLoader processes on the CPU "
        f"(default: {JPEG_READERS} on CUDA when nearly every file is a JPEG, else {READERS}; raise it on network "
        "storage)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument(
        "--max-shards",
        type=int,
        default=None,
        help=f"write at most this many shards per process, then stop with exit code {EXIT_INCOMPLETE}",
    )
    parser.add_argument(
        "--cap-budget",
        action="store_true",
        help="lower the budget of an image whose content yields fewer tokens to what it yields "
        "(default: such an image is an error record)",
    )
    parser.add_argument("--token-dtype", default="float32", choices=sorted(_TOKEN_DTYPES), help="stored token dtype")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="encoder dtype (default: the pipeline's)",
    )
    parser.add_argument("--preset", default=None, help="build the pipeline from a named preset (default, tiny)")
    parser.add_argument("--pretrained", default=None, help="a folder saved by Pipeline.save_pretrained")
    parser.add_argument(
        "--compile",
        default=COMPILE_DEFAULT,
        choices=sorted(COMPILE_CHOICES),
        help="torch.compile before capture: 'off' plain graphs; 'head' arrcoc's own stages (the backbone as it is) "
        "before the first batch; 'all' the backbone too (its bfloat16 arithmetic then moves some allocations); "
        "'background' the head on a helper thread while plain graphs compress, each bucket size switching to its "
        "compiled graph once that is captured; 'auto' the same, started only when the job, "
        f"{COMPILE_PROBE_SECONDS:.0f} s in, has at least {COMPILE_WORTH_SECONDS:.0f} s of work left (on CUDA; off "
        "elsewhere). The first run compiles, later runs read torch.compile's on-disk caches",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--timeout-minutes", type=float, default=60.0, help="how long a rank waits for the others")
    parser.add_argument(
        "--stats-json", default=None, help="write this process's statistics here ('{rank}' is replaced by the rank)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _decode_hint(stats: DatasetStats, device: torch.device) -> str | None:
    """The advice for a lone process on a GPU whose run the JPEG decode bounded, else None."""
    if device.type != "cuda" or stats.world_size != 1 or stats.seconds <= 0:
        return None
    busy = stats.decode_thread_seconds / stats.seconds
    if busy < DECODE_BOUND_SHARE:
        return None
    return (
        f"the JPEG decode bounded this run (its thread busy {100 * busy:.0f}%); two processes on the GPU decode side "
        "by side: torchrun --nproc-per-node 2 -m arrcoc.cli compress-dataset ..."
    )


def main(argv: list[str] | None = None) -> int:
    """``arrcoc compress-dataset``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    launch = None
    try:
        launch = _launch(args.device, args.timeout_minutes)
        overrides = {"encoder_dtype": args.dtype} if args.dtype else {}
        options = compile_options(args.compile, args.batch_size, launch.device)
        if args.preset:
            pipe = Pipeline(PipelineConfig.from_name(args.preset, **overrides), device=launch.device, **options)
        else:
            pipe = Pipeline.from_pretrained(args.pretrained, device=launch.device, **options, **overrides)
        # a compile before the first batch: minutes of silence, unless announced
        if options["compile"] and not options.get("compile_in_background") and _rank_world()[0] == 0:
            print(
                f"arrcoc compress-dataset: --compile {args.compile}: the first batch of each bucket size compiles "
                "(about a minute each from an empty cache); a later run reads torch.compile's on-disk cache",
                file=sys.stderr,
            )
        query, query_mask = (None, None)
        if args.query_file:
            query, query_mask = load_query(argparse.Namespace(query_embedding=args.query_file))
        stats = compress_dataset(
            args.source,
            args.dest,
            pipe,
            args.budget,
            query=query,
            query_mask=query_mask,
            batch_size=args.batch_size,
            workers=args.workers,
            shard_size=args.shard_size,
            token_dtype=_TOKEN_DTYPES[args.token_dtype],
            max_shards=args.max_shards,
            progress=not args.quiet,
            budget_policy="cap" if args.cap_budget else "exact",
        )
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
    print(
        f"arrcoc compress-dataset: rank {stats.rank}/{stats.world_size}: {stats.images} images ({stats.errors} broken), "
        f"{stats.shards_written} shards written, {stats.shards_skipped} already complete, "
        f"{stats.images_per_second:.1f} images/s on {launch.device}"
        + ("" if stats.compile_started_at is None else f", its head compiled from {stats.compile_started_at:.0f} s on")
    )
    hint = _decode_hint(stats, launch.device)
    if hint and not args.quiet:
        print(f"arrcoc compress-dataset: {hint}", file=sys.stderr)
    if stats.rank == 0:
        if stats.complete:
            print(f"arrcoc compress-dataset: complete: {Path(args.dest) / INDEX_NAME}")
        else:
            print("arrcoc compress-dataset: incomplete (shards remain); run the same command again to resume")
    return 0 if stats.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    raise SystemExit(main())
