"""CUDA graphs for the stages, chained, and a cache of them keyed on image size.

A bucket's chain (``Pipeline.stages``) is captured as ONE CUDA graph by default (one launch per call), or
as one graph per stage (``per_stage=True``, for the per-stage benchmark). Either way the static output
tensors of one stage are the static inputs of the next (no copies), and every graph of a cache allocates
its temporaries from one shared memory pool.

Host cost per call is what limits batch-1 serving, so a call touches as few tensors as possible:

- the static inputs are views into one byte buffer (:class:`PackedTensors`), so a call whose batch fills
  the batch bucket writes all of its inputs with one ``torch.cat`` (one kernel);
- the last step inside the graph packs every result into one byte buffer the entry owns (outside the
  pool), so copying results out is one ``clone`` and zero-copy results (``copy=False``) are views of it,
  valid until the next replay of that entry and checked by a generation counter (:class:`StaleOutputError`).

Sharing one pool is safe because replays are serialised (``GraphCache.lock``) and ordered on one stream:
a graph may reuse memory another entry's graph used for temporaries. Results live in the entry's own
buffer, which no other entry writes. With per-thread entries (``GraphCache(threads="per_thread")``) each
thread has its own entries and its own pool, so threads replay without waiting for each other.

This module knows nothing about relevance: it chains functions ``state -> new state entries``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ArrcocError, InvalidInputError

__all__ = ["GraphKey", "GraphChain", "GraphCache", "PackedTensors", "ChainResult", "CaptureError",
           "CaptureMemoryError", "StaleOutputError", "guard_output"]

logger = logging.getLogger(__name__)

Stage = tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]

#: The ways a cache serves several threads (see ``GraphCache``).
THREAD_MODES = ("lock", "per_thread")
#: How a chain replays: captured CUDA graphs, or (anywhere, for tests) the stages re-run into the same buffers.
BACKENDS = ("cuda", "eager")


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape of a captured chain (``thread``: the owning thread in per-thread mode, else 0)."""

    bucket: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    capacity: int
    query_tokens: int
    thread: int = 0


class CaptureError(ArrcocError, RuntimeError):
    """A stage could not be captured; the message names the stage and the reason."""

    def __init__(self, stage: str, err: BaseException) -> None:
        super().__init__(f"stage {stage!r} could not be captured as a CUDA graph: {type(err).__name__}: {err}")
        self.stage = stage


class CaptureMemoryError(ArrcocError, MemoryError):
    """The GPU ran out of memory capturing a chain, even after evicting least-recently-used entries."""


class StaleOutputError(ArrcocError, RuntimeError):
    """A zero-copy result (``copy=False``) was read after a later call overwrote its buffers."""


# --- packing ---------------------------------------------------------------------------------------------
def _leaves(state: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Tensor]:
    """``{"balance": {"x": t}}`` -> ``{"balance.x": t}`` for the given top-level keys present in ``state``."""
    out: dict[str, Tensor] = {}
    for key in keys:
        value = state.get(key)
        if isinstance(value, Tensor):
            out[key] = value
        elif isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
    return out


class PackedTensors:
    """Named tensors of mixed dtypes laid out one after another in one flat byte buffer.

    Each tensor keeps its own contiguous block (so the views are contiguous, as stages expect), blocks are
    ordered by item size (largest first) so every block is aligned for its dtype, and writing all of them
    at once is one ``torch.cat`` into the buffer.

    Args:
        specs: ``name -> (shape, dtype)``; the first dimension of every shape is the batch ``B``.
        device: where the buffer lives.
    """

    def __init__(self, specs: Mapping[str, tuple[Sequence[int], torch.dtype]], device: torch.device | str) -> None:
        # largest items first, one run per dtype (stable: a dtype's tensors keep their order)
        self.names = sorted(specs, key=lambda n: (-_itemsize(specs[n][1]), str(specs[n][1])))
        self.shapes = [tuple(int(s) for s in specs[n][0]) for n in self.names]
        self.dtypes = [specs[n][1] for n in self.names]
        self.sizes = [math.prod(shape) * _itemsize(dtype) for shape, dtype in zip(self.shapes, self.dtypes)]
        self.nbytes = sum(self.sizes)
        self._runs: list[tuple[torch.dtype, int, list[int], list[tuple[int, ...]]]] = []  # dtype, bytes, numels, shapes
        for dtype, size, shape in zip(self.dtypes, self.sizes, self.shapes):
            if not self._runs or self._runs[-1][0] != dtype:
                self._runs.append((dtype, 0, [], []))
            run = self._runs[-1]
            self._runs[-1] = (dtype, run[1] + size, run[2] + [math.prod(shape)], run[3] + [shape])
        self.batch = self.shapes[0][0] if self.shapes else 0
        self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.views = self.unpack(self.buffer)

    @classmethod
    def like(cls, tensors: Mapping[str, Tensor], device: torch.device | str | None = None) -> PackedTensors:
        """A packing with the shapes and dtypes of ``tensors``, initialised with their values."""
        first = next(iter(tensors.values()))
        packed = cls({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, device or first.device)
        packed.write(tensors)
        return packed

    def unpack(self, buffer: Tensor, rows: int | None = None) -> dict[str, Tensor]:
        """Typed views ``(rows, *shape[1:])`` of every tensor in ``buffer`` (a copy of :attr:`buffer`)."""
        views = []  # one typed view and one split per dtype, then one view per tensor: the host cost of a call
        for run, (dtype, _, numels, shapes) in zip(buffer.split_with_sizes([r[1] for r in self._runs]), self._runs):
            views += [p.view(s) for p, s in zip(run.view(dtype).split_with_sizes(numels), shapes)]
        if rows is not None and rows != self.batch:
            views = [v[:rows] for v in views]
        return dict(zip(self.names, views))

    def write(self, values: Mapping[str, Tensor], rows: int | None = None) -> None:
        """Copy ``values`` (each ``(rows, *shape[1:])``) into the first ``rows`` of every view.

        With every tensor present, contiguous, of its dtype and full shape this is one kernel (``torch.cat``
        into the buffer); otherwise one copy per tensor (which converts dtypes and broadcasts).
        """
        if (rows is None or rows == self.batch) and len(values) == len(self.names):
            parts = []
            for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
                value = values[name]
                if value.dtype != dtype or value.shape != shape or not value.is_contiguous():
                    break
                parts.append(_bytes(value))
            else:
                try:
                    torch.cat(parts, out=self.buffer)  # shapes and dtypes match: the buffer is never resized
                    return
                except RuntimeError:  # e.g. a value on another device: copy one by one below
                    pass
        rows = self.batch if rows is None else rows
        for name, value in values.items():
            self.views[name][:rows].copy_(value)


def _bytes(value: Tensor) -> Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (a single element may carry any stride: reset it)."""
    flat = value.view(-1)
    if flat.numel() <= 1:
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- results ---------------------------------------------------------------------------------------------
class ChainResult(Mapping[str, Any]):
    """A chain's results for the first ``rows`` images: top-level keys, nested dicts rebuilt (``"balance"``).

    Views are built on first access. With ``copy=False`` they view the entry's own output buffer; every
    access checks that no replay of the entry happened since (:meth:`check`).
    """

    def __init__(self, chain: GraphChain, buffer: Tensor, rows: int, owned: bool) -> None:
        self._chain, self._rows, self._owned = chain, rows, owned
        self._generation = chain.generation
        self._views = buffer is chain.outputs.buffer and rows == chain.outputs.batch
        self._buffer = buffer
        self._cache: dict[str, Any] | None = None

    @property
    def owned(self) -> bool:
        """True when the tensors are the caller's own copies (``copy=True``)."""
        return self._owned

    def valid(self) -> bool:
        """False once the entry was replayed again and (zero-copy) views would read another call's data."""
        return self._owned or self._chain.generation == self._generation

    def check(self) -> None:
        """Raise :class:`StaleOutputError` when :meth:`valid` is False."""
        if not self.valid():
            raise StaleOutputError(
                f"this zero-copy result (copy=False) of the {self._chain.name} graph was overwritten by a later "
                f"call on the same entry ({self._chain.generation - self._generation} since); read results "
                "before the next call, or call with copy=True to own them")

    def _all(self) -> dict[str, Any]:
        if self._cache is None:
            flat = self._chain.outputs.views if self._views else self._chain.outputs.unpack(self._buffer, self._rows)
            tree: dict[str, Any] = {}
            for name, value in flat.items():
                head, _, leaf = name.partition(".")
                if leaf:
                    tree.setdefault(head, {})[leaf] = value
                else:
                    tree[head] = value
            self._cache = tree
        return self._cache

    def __getitem__(self, key: str) -> Any:
        self.check()
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_GUARDED: dict[type, type] = {}


class _Guarded:
    """Mixin of a zero-copy output: reading a field that views graph buffers first checks they are current."""

    def __getattribute__(self, name: str) -> Any:
        state = object.__getattribute__(self, "__dict__")
        if name in state["_arrcoc_fields"]:
            state["_arrcoc_result"].check()
        return object.__getattribute__(self, name)


def guard_output(output: Any, result: ChainResult, fields: Sequence[str]) -> Any:
    """Make ``output`` (a plain-class instance) raise :class:`StaleOutputError` when ``fields`` are read stale.

    The instance keeps its type's behaviour (``isinstance`` holds); its class becomes a cached subclass
    that checks ``result`` before returning any of ``fields``. Tensors taken out of it before the next
    call are plain views and are not checked: keep the output object, not the tensor, across calls.
    """
    cls = type(output)
    if cls not in _GUARDED:
        _GUARDED[cls] = type(f"ZeroCopy{cls.__name__}", (_Guarded, cls), {"__doc__": cls.__doc__})
    output.__dict__["_arrcoc_result"] = result
    output.__dict__["_arrcoc_fields"] = frozenset(fields)
    output.__class__ = _GUARDED[cls]
    return output


# --- the chain -------------------------------------------------------------------------------------------
class GraphChain:
    """One captured chain: packed static inputs, the graph(s), and a packed buffer of its results.

    Args:
        stages: ``(name, fn)`` in order; each ``fn`` reads the state and returns new entries.
        inputs: initial values of the static inputs (the chain copies them into its packed input buffer).
        pool: the memory pool shared by the cache's graphs (``None`` with the eager backend).
        outputs: the top-level state keys returned to callers (dicts of tensors are flattened).
        warmup: eager runs on a side stream before capture (lazy initialisation, cuBLAS workspaces).
        per_stage: one graph per stage (and one for packing the results) instead of one for the chain.
        backend: ``"cuda"`` captures; ``"eager"`` re-runs the stages on replay into the same buffers
            (the same host-side contract on any device: used by CPU tests).
        name: shown in messages.
    """

    def __init__(self, stages: list[Stage], inputs: Mapping[str, Tensor], pool: Any, *, outputs: Sequence[str],
                 warmup: int = 2, per_stage: bool = False, backend: str = "cuda", name: str = "chain") -> None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.name, self.backend, self.stages, self.output_keys = name, backend, stages, tuple(outputs)
        self.inputs = PackedTensors.like(inputs)
        self.device = self.inputs.buffer.device
        self.generation = 0  # replays so far: zero-copy results compare against it
        self.graphs: list[tuple[str, Any]] = []
        if backend == "eager":
            state = self._run_stages()
            self.outputs = PackedTensors.like(_leaves(state, self.output_keys))
            self.pool_bytes = 0
            self.bytes = self.inputs.nbytes + self.outputs.nbytes
            return
        state = self._warm(warmup)
        self.outputs = PackedTensors.like(_leaves(state, self.output_keys))  # outside the pool: the entry owns it
        del state
        before = torch.cuda.memory_allocated(self.device)
        self.state: dict[str, Any] = dict(self.inputs.views)
        steps = [[s] for s in stages] if per_stage else [list(stages)]
        if per_stage:
            steps.append([])  # a last graph that only packs the results
        current, failure = "capture", None
        try:
            for step in steps:
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's allocation or sync (e.g. preprocessing) must not void this capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    try:
                        for current, fn in step:  # noqa: B007 (named in the error below)
                            self.state.update(fn(self.state))
                        if step is steps[-1]:
                            current = "pack"
                            self._pack(self.state)
                    except Exception as err:
                        failure = err  # the capture's exit may raise over it: keep the stage's own error
                        raise
                self.graphs.append(("chain" if not per_stage else step[0][0] if step else "pack", graph))
        except Exception as err:
            first = failure or err
            if isinstance(first, torch.cuda.OutOfMemoryError):
                raise first from None  # the cache evicts and retries
            raise CaptureError(current, first) from err
        self.pool_bytes = torch.cuda.memory_allocated(self.device) - before
        self.bytes = self.pool_bytes + self.inputs.nbytes + self.outputs.nbytes

    def _run_stages(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self.inputs.views)
        for stage_name, fn in self.stages:
            state.update(_call(stage_name, fn, state))
        return state

    def _warm(self, runs: int) -> dict[str, Any]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(runs):
                state = self._run_stages()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return state

    def _pack(self, state: Mapping[str, Any]) -> None:
        """Inside the graph: every result into the entry's output buffer (one kernel for contiguous results)."""
        leaves = _leaves(state, self.output_keys)
        torch.cat([_bytes(leaves[n].contiguous()) for n in self.outputs.names],
                  out=self.outputs.buffer)

    def replay(self) -> None:
        """Run the chain on whatever the static inputs hold; the results land in ``outputs``."""
        self.generation += 1  # before the launch: a zero-copy result of the previous call is stale from now on
        if self.backend == "eager":
            self._pack(self._run_stages())
            return
        for _, graph in self.graphs:
            graph.replay()

    def run(self, values: Mapping[str, Tensor], rows: int, copy: bool = True) -> ChainResult:
        """Copy ``values`` into the static inputs, replay, and return the results of the first ``rows``.

        Not thread-safe on its own: :meth:`GraphCache.run` serialises callers.
        """
        self.inputs.write(values, rows)
        self.replay()
        buffer = self.outputs.buffer.clone() if copy else self.outputs.buffer
        return ChainResult(self, buffer, rows, owned=copy)


def _call(name: str, fn: Callable[[dict[str, Any]], dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    try:
        return fn(state)
    except torch.cuda.OutOfMemoryError:
        raise  # the cache evicts and retries
    except Exception as err:  # e.g. a host sync or a compiler error: the stage cannot be graphed
        raise CaptureError(name, err) from err


# --- the cache -------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    captures: int = 0
    evictions: int = 0
    oom_retries: int = 0
    capture_seconds: float = 0.0
    entries: dict[GraphKey, dict[str, float]] = field(default_factory=dict)


class _SharedLock:
    """Many holders of ``shared()`` at once, or one of ``exclusive()`` (re-entrant for its holder). A waiting
    ``exclusive()`` stops new shared holders, so a capture is not starved by a stream of replays."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._waiting = 0  # threads waiting for exclusive access
        self._writer: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                self._cond.notify_all()


class GraphCache:
    """Captured chains keyed on :class:`GraphKey`, least recently used first out.

    Args:
        max_entries: most chains kept.
        max_bytes: most bytes (pool growth at capture plus the entries' own buffers) kept (``None``: no bound).
        threads: ``"lock"`` (default): one entry per key, calls serialised from input copy to copy-out (the
            GPU work itself runs after the lock is released); ``"per_thread"``: each thread gets its own
            entries and pool and replays without waiting for other threads (captures still exclusive).
            ``python -m arrcoc.bench_graphs`` measures both.
        backend: ``"cuda"``, or ``"eager"`` to exercise the cache's host logic without a GPU.
        per_stage: capture one graph per stage instead of one per chain.
    """

    def __init__(self, max_entries: int = 32, max_bytes: int | None = None, *, threads: str = "lock",
                 backend: str = "cuda", per_stage: bool = False) -> None:
        if threads not in THREAD_MODES:
            raise InvalidInputError(f"threads must be one of {THREAD_MODES}; got {threads!r}")
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if max_entries < 1:
            raise InvalidInputError(f"max_entries must be a whole number of at least 1; got {max_entries!r}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.threads, self.backend, self.per_stage = threads, backend, per_stage
        self._entries: OrderedDict[GraphKey, GraphChain] = OrderedDict()
        self._pools: dict[int, Any] = {}
        self._stats = _Stats()
        self._lock = _SharedLock()  # per-thread mode: replays shared, captures exclusive
        self._rlock = threading.RLock()  # lock mode: everything under one plain (cheaper) lock
        self._meta = threading.Lock()  # LRU order and hit counts under a shared lock
        self._stream: Any = None  # the stream of the last replay (lock mode orders replays on other streams after it)
        self.chain_factory: Callable[..., GraphChain] = GraphChain  # tests inject faults here

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._entries

    @property
    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Exclusive access to the cache (captures, eviction, and every replay in lock mode)."""
        return self._rlock if self.threads == "lock" else self._lock.exclusive()

    def key_for(self, key: GraphKey) -> GraphKey:
        """``key`` bound to the calling thread in per-thread mode."""
        if self.threads == "per_thread" and not key.thread:
            return GraphKey(key.bucket, key.batch, key.dtype, key.device, key.capacity, key.query_tokens,
                            threading.get_ident())
        return key

    def get(self, key: GraphKey, build: Callable[[], tuple[list[Stage], dict[str, Tensor], Sequence[str]]]) -> GraphChain:
        """The chain for ``key``; a miss calls ``build() -> (stages, static inputs, output keys)`` and captures."""
        key = self.key_for(key)
        with self.lock:
            chain = self._entries.get(key)
            if chain is not None:
                self._stats.hits += 1
                self._entries.move_to_end(key)
                return chain
            self._stats.misses += 1
            stages, inputs, outputs = build()
            start = time.perf_counter()
            try:
                chain = self._capture(key, stages, inputs, outputs)
            except torch.cuda.OutOfMemoryError as err:
                self._stats.oom_retries += 1
                self._free_for_retry()
                try:
                    chain = self._capture(key, stages, inputs, outputs)
                except torch.cuda.OutOfMemoryError as again:
                    raise CaptureMemoryError(
                        f"out of GPU memory capturing {_describe(key)} (retried once after evicting least-recently-"
                        f"used entries; {len(self._entries)} entries, {self.nbytes} bytes kept): {again}") from err
            seconds = time.perf_counter() - start
            self._stats.captures += 1
            self._stats.capture_seconds += seconds
            self._stats.entries[key] = {"capture_seconds": seconds, "bytes": chain.bytes}
            self._entries[key] = chain
            self._evict(0)
            return chain

    def _capture(self, key: GraphKey, stages: list[Stage], inputs: dict[str, Tensor], outputs: Sequence[str]) -> GraphChain:
        pool = None
        if self.backend == "cuda":
            if key.thread not in self._pools:
                self._pools[key.thread] = torch.cuda.graph_pool_handle()
            pool = self._pools[key.thread]
        return self.chain_factory(stages, inputs, pool, outputs=outputs, per_stage=self.per_stage,
                                  backend=self.backend, name=_describe(key))

    def _free_for_retry(self) -> None:
        """After an out-of-memory capture: drop the older half of the entries (at least one), release memory."""
        self._evict(max(1, (len(self._entries) + 1) // 2) if self._entries else 0)
        if self.backend == "cuda":
            torch.cuda.empty_cache()

    @property
    def nbytes(self) -> int:
        return sum(c.bytes for c in self._entries.values())

    def _evict(self, at_least: int) -> None:
        def over() -> bool:
            return len(self._entries) > self.max_entries or (self.max_bytes is not None and self.nbytes > self.max_bytes)

        evicted = 0
        while self._entries and (evicted < at_least or (over() and len(self._entries) > 1)):
            key, _ = self._entries.popitem(last=False)
            self._stats.entries.pop(key, None)
            self._stats.evictions += 1
            evicted += 1

    def run(self, key: GraphKey, build: Callable[[], tuple[list[Stage], dict[str, Tensor], Sequence[str]]],
            values: Mapping[str, Tensor], rows: int, copy: bool = True) -> ChainResult:
        """Fill, replay and read out the chain for ``key`` (captured on a miss), safely across threads."""
        key = self.key_for(key)
        if self.threads == "per_thread":
            while True:
                with self._lock.shared():  # captures and evictions wait; other threads replay their own entries
                    chain = self._entries.get(key)
                    if chain is not None:
                        with self._meta:
                            self._stats.hits += 1
                            self._entries.move_to_end(key)
                        return chain.run(values, rows, copy)
                self.get(key, build)
                with self._meta:
                    self._stats.hits -= 1  # the loop counts the capture's first replay as a hit again
        with self._rlock:
            chain = self._entries.get(key)
            if chain is None:
                chain = self.get(key, build)
            else:  # the hit path of get(), inlined: this is every call's host cost
                self._stats.hits += 1
                self._entries.move_to_end(key)
            if self.backend == "cuda":
                stream = torch.cuda.current_stream(chain.device)
                if self._stream is not None and stream != self._stream:
                    stream.wait_stream(self._stream)  # one pool: never overlap another stream's replay
                self._stream = stream
            return chain.run(values, rows, copy)

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self._stats.entries.clear()

    def stats(self) -> dict[str, Any]:
        """Hits, misses, captures, evictions, out-of-memory retries, capture seconds, and bytes per entry."""
        s = self._stats
        return {"hits": s.hits, "misses": s.misses, "captures": s.captures, "evictions": s.evictions,
                "oom_retries": s.oom_retries, "capture_seconds": s.capture_seconds, "entries": len(self._entries),
                "bytes": self.nbytes, "per_entry": {_describe(k): dict(v) for k, v in s.entries.items()}}


def _describe(key: GraphKey) -> str:
    thread = f"/t{key.thread}" if key.thread else ""
    return f"{key.bucket}px/b{key.batch}/{str(key.dtype).split('.')[-1]}/T{key.capacity}/L{key.query_tokens}{thread}"
