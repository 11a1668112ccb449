"""CUDA graphs of a chain of tensor functions, and a bounded cache of them keyed on shapes.

A chain is ``[(name, fn)]`` where each ``fn(state) -> new state entries``; it is captured as one CUDA graph
(or one per stage, ``per_stage=True``) and replayed on whatever its static inputs hold. Inputs and results
each live in one byte buffer (:class:`PackedTensors`), so a call writes its inputs with one ``torch.cat``
and copies its results out with one ``clone``; with ``copy=False`` the results are views of the entry's
buffer, valid until its next replay (:class:`StaleOutputError`). Per-tensor copies cost several times more
host time (bench/results/graphs-host-2cpu-x86-64.md). All entries share one memory pool, which is safe
because calls hold one lock and replays are ordered on one stream. This module knows nothing of relevance.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import ArrcocError, InvalidInputError

__all__ = [
    "GraphKey",
    "GraphChain",
    "GraphCache",
    "PackedTensors",
    "ChainResult",
    "CaptureError",
    "CaptureMemoryError",
    "StaleOutputError",
    "lazy_output",
    "warm_up",
    "capture",
]

Stage = tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]
Build = Callable[[], tuple[list[Stage], dict[str, Tensor], Sequence[str]]]

#: How a chain replays: captured CUDA graphs, or (anywhere, for tests) the stages re-run into the same buffers.
BACKENDS = ("cuda", "eager")


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape of a captured chain."""

    bucket: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    capacity: int
    query_tokens: int
    pick: bool = True  # False: every image has a question, so the chain builds no query-free pick

    def __str__(self) -> str:
        dtype = str(self.dtype).split(".")[-1]
        return f"{self.bucket}px/b{self.batch}/{dtype}/T{self.capacity}/L{self.query_tokens}" + (
            "" if self.pick else "/asked"
        )


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
#: Packed buffers are padded to a multiple of this many bytes, so the whole buffer views as any dtype.
_ALIGN = 16


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes(value: Tensor) -> Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (a single element may carry any stride: reset it)."""
    flat = value.view(-1)
    if flat.numel() <= 1:
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


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
    """Named tensors of mixed dtypes, each a contiguous block of one flat byte buffer.

    Blocks are ordered by item size, largest first, so every block is aligned for its dtype; writing every
    tensor at once is one ``torch.cat`` into the buffer.

    Args:
        specs: ``name -> (shape, dtype)``; the first dimension of every shape is the batch ``B``.
        device: where the buffer lives.
    """

    def __init__(self, specs: Mapping[str, tuple[Sequence[int], torch.dtype]], device: torch.device | str) -> None:
        self.order = tuple(specs)  # as given: results are handed out in this order
        self.names = sorted(specs, key=lambda n: -_itemsize(specs[n][1]))
        # name -> (dtype, offset in that dtype's items, shape, contiguous strides)
        self.layout: dict[str, tuple[torch.dtype, int, tuple[int, ...], tuple[int, ...]]] = {}
        offset = 0
        for name in self.names:
            shape, dtype = tuple(int(s) for s in specs[name][0]), specs[name][1]
            itemsize = _itemsize(dtype)
            strides = torch.empty(shape, device="meta").stride()
            self.layout[name] = (dtype, offset // itemsize, shape, strides)
            offset += math.prod(shape) * itemsize
        self.nbytes = offset
        self.batch = self.layout[self.names[0]][2][0] if self.names else 0
        self.buffer = torch.zeros(-(-self.nbytes // _ALIGN) * _ALIGN, dtype=torch.uint8, device=device)
        self.body = self.buffer[: self.nbytes]  # what one torch.cat writes: every tensor, no padding
        self.views = self.unpack(self.buffer)

    @classmethod
    def like(cls, tensors: Mapping[str, Tensor], device: torch.device | str | None = None) -> PackedTensors:
        """A packing with the shapes and dtypes of ``tensors``, initialised with their values."""
        first = next(iter(tensors.values()))
        packed = cls({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, device or first.device)
        packed.write(tensors)
        return packed

    def unpack(self, buffer: Tensor, rows: int | None = None) -> dict[str, Tensor]:
        """Views ``(rows, *shape[1:])`` of every tensor in ``buffer`` (a copy of :attr:`buffer`)."""
        typed: dict[torch.dtype, Tensor] = {}
        return {name: self.view(buffer, name, rows, typed) for name in self.names}

    def view(
        self, buffer: Tensor, name: str, rows: int | None = None, typed: dict[torch.dtype, Tensor] | None = None
    ) -> Tensor:
        """One tensor's contiguous view ``(rows, *shape[1:])`` in ``buffer`` (a copy of :attr:`buffer`).

        ``typed`` keeps ``buffer`` viewed as each dtype between calls, so a view costs one ``as_strided``.
        """
        dtype, offset, shape, strides = self.layout[name]
        typed = {} if typed is None else typed
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = buffer.view(dtype)
        if rows is not None:
            shape = (rows, *shape[1:])  # the first rows of a contiguous block: still one contiguous block
        return whole.as_strided(shape, strides, whole.storage_offset() + offset)

    def write(self, values: Mapping[str, Tensor], rows: int | None = None) -> None:
        """Copy ``values`` (each ``(rows, *shape[1:])``) into the first ``rows`` of every view.

        With every tensor present, of its dtype and full shape, this is one ``torch.cat``; otherwise one copy
        per tensor (which converts dtypes and broadcasts).
        """
        if (rows is None or rows == self.batch) and len(values) == len(self.names):
            parts = []
            for name in self.names:
                value, (dtype, _, shape, _) = values.get(name), self.layout[name]
                if value is None or value.dtype != dtype or value.shape != shape:
                    break
                parts.append(_bytes(value.contiguous()))
            else:
                try:
                    torch.cat(parts, out=self.body)
                    return
                except RuntimeError:  # e.g. a value on another device: copy one by one below
                    pass
        rows = self.batch if rows is None else rows
        for name, value in values.items():
            self.views[name][:rows].copy_(value)


# --- results ---------------------------------------------------------------------------------------------
class ChainResult(Mapping[str, Any]):
    """A chain's results for the first ``rows`` images: top-level keys, nested dicts rebuilt (``"balance"``).

    A key's views are built on its first read, so a caller pays only for what it reads (building all of
    them costs more host time than the call itself: bench/results/graphs-host-2cpu-x86-64.md). With
    ``copy=False`` they view the entry's own buffer, and every read checks that the entry has not replayed
    since (:meth:`check`).
    """

    def __init__(self, chain: GraphChain, buffer: Tensor, rows: int | None, owned: bool) -> None:
        self._chain, self._buffer, self._rows, self._owned = chain, buffer, rows, owned
        self._generation = chain.generation
        self._typed: dict[torch.dtype, Tensor] = {}
        self._cache: dict[str, Any] = {}

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
                "before the next call, or call with copy=True to own them"
            )

    def _leaf(self, name: str) -> Tensor:
        outputs = self._chain.outputs
        if self._buffer is outputs.buffer and self._rows == outputs.batch:
            return outputs.views[name]  # zero-copy at a full batch: the entry's own views, built at capture
        return outputs.view(self._buffer, name, self._rows, self._typed)

    def get_unchecked(self, key: str) -> Any:
        """``self[key]`` without the staleness check (for a caller that has just made it)."""
        value = self._cache.get(key)
        if value is None:
            node = self._chain.tree[key]  # KeyError for an unknown key, as a Mapping should
            value = self._leaf(node) if isinstance(node, str) else {leaf: self._leaf(name) for leaf, name in node}
            self._cache[key] = value
        return value

    def __getitem__(self, key: str) -> Any:
        self.check()
        return self.get_unchecked(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._chain.tree)

    def __len__(self) -> int:
        return len(self._chain.tree)

    def __contains__(self, key: object) -> bool:
        return key in self._chain.tree


def _tree(names: Sequence[str]) -> dict[str, str | tuple[tuple[str, str], ...]]:
    """Flat packed names -> top-level key: its name, or its leaves ``(leaf, name)`` (``"balance.x"`` -> ``x``)."""
    tree: dict[str, Any] = {}
    for name in names:
        head, _, leaf = name.partition(".")
        if leaf:
            tree.setdefault(head, []).append((leaf, name))
        else:
            tree[head] = name
    return {k: v if isinstance(v, str) else tuple(v) for k, v in tree.items()}


# --- outputs built on first read, checked when zero-copy -----------------------------------------------------
class _Field:
    """An output field built by the instance's ``_arrcoc_source(name)`` on first read; a ``checked`` field
    first calls the instance's ``_arrcoc_check()``, on every read (a data descriptor: reads always come here)."""

    __slots__ = ("name", "checked")

    def __init__(self, name: str, checked: bool) -> None:
        self.name, self.checked = name, checked

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        state = obj.__dict__
        if self.checked and "_arrcoc_check" in state:  # absent in a copy made by __init__ (dataclasses.replace)
            state["_arrcoc_check"]()
        if self.name not in state:
            state[self.name] = state["_arrcoc_source"](self.name)
        return state[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _plain(self: Any) -> tuple[Any, ...]:
    """Pickling and copying give an instance of the plain class, every field built (and checked)."""
    state = {k: v for k, v in self.__dict__.items() if not k.startswith("_arrcoc_")}
    state.update({name: getattr(self, name) for name in self._arrcoc_fields})
    return _rebuild, (self._arrcoc_base, state)


_CLASSES: dict[tuple[type, frozenset[str], frozenset[str]], type] = {}


def lazy_output(
    cls: type,
    values: Mapping[str, Any],
    source: Callable[[str], Any],
    lazy: Collection[str],
    *,
    check: Callable[[], None] | None = None,
    checked: Collection[str] = (),
) -> Any:
    """An instance of (a cached subclass of) ``cls`` without running its ``__init__``.

    Fields in ``values`` are set now; each field in ``lazy`` is built by ``source(name)`` on its first read and
    kept. With ``check`` (zero-copy results), every read of a field in ``checked`` calls it first, so a read
    after the buffers were overwritten raises (:class:`StaleOutputError`) even where the view was never built.
    ``isinstance(out, cls)`` holds; pickling or copying gives a plain ``cls`` with every field built.
    """
    checks = frozenset(checked) if check is not None else frozenset()
    key = (cls, frozenset(lazy), checks)
    sub = _CLASSES.get(key)
    if sub is None:
        fields = sorted(key[1] | checks)
        attrs: dict[str, Any] = {name: _Field(name, name in checks) for name in fields}
        attrs.update(
            __doc__=cls.__doc__,
            __module__=cls.__module__,
            __reduce__=_plain,
            _arrcoc_base=cls,
            _arrcoc_fields=tuple(fields),
        )
        sub = _CLASSES[key] = type(f"{'ZeroCopy' if checks else 'Lazy'}{cls.__name__}", (cls,), attrs)
    obj = object.__new__(sub)
    obj.__dict__.update(values, _arrcoc_source=source)
    if check is not None:
        obj.__dict__["_arrcoc_check"] = check
    return obj


# --- the chain -------------------------------------------------------------------------------------------
T = TypeVar("T")


def warm_up(fn: Callable[[], T], runs: int, device: torch.device | None = None) -> T:
    """Run ``fn`` ``runs`` times on a side stream (lazy initialisation, cuBLAS workspaces), as a capture needs first;
    returns the last result (``runs >= 1``)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(runs):
            out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def capture(
    fn: Callable[[], T], pool: Any, *, warmup: int = 2, device: torch.device | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Warm ``fn`` up (``warmup`` runs, see :func:`warm_up`), then capture one call of it as a CUDA graph whose
    temporaries come from ``pool``; returns the graph and the call's (static) result.

    The one capture path of arrcoc: :class:`GraphChain` and the graphed decoder both capture through it.
    """
    if warmup:
        warm_up(fn, warmup, device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's allocation or sync (e.g. preprocessing) must not void this capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


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

    def __init__(
        self,
        stages: list[Stage],
        inputs: Mapping[str, Tensor],
        pool: Any,
        *,
        outputs: Sequence[str],
        warmup: int = 2,
        per_stage: bool = False,
        backend: str = "cuda",
        name: str = "chain",
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.name, self.backend, self.stages, self.output_keys = name, backend, stages, tuple(outputs)
        self.inputs = PackedTensors.like(inputs)
        self.device = self.inputs.buffer.device
        self.generation = 0  # replays so far: zero-copy results compare against it
        self.graphs: list[tuple[str, Any]] = []
        self.pool_bytes = 0
        self.capture_seconds = 0.0  # set by the cache
        # the results' buffer is made outside the pool: the entry owns it, no other graph reuses it
        self.outputs = PackedTensors.like(
            _leaves(self._run_stages() if backend == "eager" else self._warm(warmup), self.output_keys)
        )
        self.tree = _tree(self.outputs.order)  # top-level result key -> its packed tensors
        if backend == "cuda":
            self._capture(pool, per_stage)
        self.bytes = self.pool_bytes + self.inputs.nbytes + self.outputs.nbytes

    def _capture(self, pool: Any, per_stage: bool) -> None:
        before = torch.cuda.memory_allocated(self.device)
        self.state: dict[str, Any] = dict(self.inputs.views)
        steps = [[s] for s in self.stages] + [[]] if per_stage else [list(self.stages)]  # [] : a graph that packs
        current, failure = "capture", None
        try:
            for step in steps:

                def run_step(step: list[Stage] = step) -> None:
                    nonlocal current, failure
                    try:
                        for current, fn in step:  # noqa: B007 (named in the error below)
                            self.state.update(fn(self.state))
                        if step is steps[-1]:
                            current = "pack"
                            self._pack(self.state)
                    except Exception as err:
                        failure = err  # the capture's exit may raise over it: keep the stage's own error
                        raise

                graph, _ = capture(run_step, pool, warmup=0, device=self.device)
                self.graphs.append(("chain" if not per_stage else step[0][0] if step else "pack", graph))
        except Exception as err:
            first = failure or err
            if isinstance(first, torch.cuda.OutOfMemoryError):
                raise first from None  # the cache evicts and retries
            raise CaptureError(current, first) from err
        self.pool_bytes = torch.cuda.memory_allocated(self.device) - before

    def _run_stages(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self.inputs.views)
        for name, fn in self.stages:
            try:
                state.update(fn(state))
            except torch.cuda.OutOfMemoryError:
                raise  # the cache evicts and retries
            except Exception as err:  # e.g. a host sync or a compiler error: the stage cannot be graphed
                raise CaptureError(name, err) from err
        return state

    def _warm(self, runs: int) -> dict[str, Any]:
        return warm_up(self._run_stages, runs, self.device)

    def _pack(self, state: Mapping[str, Any]) -> None:
        """Every result into the entry's output buffer, in one kernel (inside the graph when captured)."""
        leaves = _leaves(state, self.output_keys)
        torch.cat([_bytes(leaves[n].contiguous()) for n in self.outputs.names], out=self.outputs.body)

    def replay(self) -> None:
        """Run the chain on whatever the static inputs hold; the results land in ``outputs``."""
        self.generation += 1  # before the launch: a zero-copy result of the previous call is stale from now on
        if self.backend == "eager":
            self._pack(self._run_stages())
            return
        for _, graph in self.graphs:
            graph.replay()

    def run(self, values: Mapping[str, Tensor], rows: int | None, copy: bool = True) -> ChainResult:
        """Copy ``values`` into the static inputs, replay, and return the results of the first ``rows`` (``None``:
        every tensor whole, for chains whose tensors' first sizes are not one batch).

        Not thread-safe on its own: :meth:`GraphCache.run` serialises callers.
        """
        self.inputs.write(values, rows)
        self.replay()
        buffer = self.outputs.buffer.clone() if copy else self.outputs.buffer
        return ChainResult(self, buffer, rows, owned=copy)


# --- the cache -------------------------------------------------------------------------------------------
class GraphCache:
    """Captured chains keyed on :class:`GraphKey`, least recently used first out.

    Calls are serialised by one lock from input copy to copy-out (the GPU work runs after it is released).
    ``capture_lock``, when set, is also held around each capture: another thread that queues device work on the
    capturing stream (work a capture would take in) holds it too, and otherwise runs beside replays.

    Args:
        max_entries: most chains kept.
        max_bytes: most bytes (pool growth at capture plus the entries' own buffers) kept (``None``: no bound).
        backend: ``"cuda"``, or ``"eager"`` to exercise the cache's host logic without a GPU.
        per_stage: capture one graph per stage instead of one per chain.
    """

    def __init__(
        self, max_entries: int = 32, max_bytes: int | None = None, *, backend: str = "cuda", per_stage: bool = False
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if max_entries < 1:
            raise InvalidInputError(f"max_entries must be a whole number of at least 1; got {max_entries!r}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.backend, self.per_stage = backend, per_stage
        self.lock = threading.Lock()
        self.capture_lock: AbstractContextManager[Any] | None = None
        self._entries: OrderedDict[GraphKey, GraphChain] = OrderedDict()
        self._pool: Any = None
        self._stream: Any = None  # the stream of the last replay: a call on another stream waits for it
        self._stats = {"hits": 0, "misses": 0, "captures": 0, "evictions": 0, "oom_retries": 0, "capture_seconds": 0.0}
        self.chain_factory: Callable[..., GraphChain] = GraphChain  # tests inject faults here

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(c.bytes for c in self._entries.values())

    def get(self, key: GraphKey, build: Build) -> GraphChain:
        """The chain for ``key``; a miss calls ``build() -> (stages, static inputs, output keys)`` and captures."""
        with self.lock:
            return self._get(key, build)

    def run(
        self, key: GraphKey, build: Build, values: Mapping[str, Tensor], rows: int, copy: bool = True
    ) -> ChainResult:
        """Fill, replay and read out the chain for ``key`` (captured on a miss), safely across threads."""
        with self.lock:
            chain = self._get(key, build)
            if self.backend == "cuda":
                stream = torch.cuda.current_stream(chain.device)
                if self._stream is not None and stream != self._stream:
                    stream.wait_stream(self._stream)  # one pool: never overlap another stream's replay
                self._stream = stream
            return chain.run(values, rows, copy)

    def _get(self, key: GraphKey, build: Build) -> GraphChain:
        chain = self._entries.get(key)
        if chain is not None:
            self._stats["hits"] += 1
            self._entries.move_to_end(key)
            return chain
        self._stats["misses"] += 1
        stages, inputs, outputs = build()
        start = time.perf_counter()
        try:
            with self.capture_lock or nullcontext():
                chain = self._capture(key, stages, inputs, outputs)
        except torch.cuda.OutOfMemoryError as err:
            self._stats["oom_retries"] += 1
            self._evict(max(1, (len(self._entries) + 1) // 2) if self._entries else 0)  # the older half
            if self.backend == "cuda":
                torch.cuda.empty_cache()
            try:
                with self.capture_lock or nullcontext():
                    chain = self._capture(key, stages, inputs, outputs)
            except torch.cuda.OutOfMemoryError as again:
                raise CaptureMemoryError(
                    f"out of GPU memory capturing {key} (retried once after evicting least-recently-used "
                    f"entries; {len(self._entries)} entries, {self.nbytes} bytes kept): {again}"
                ) from err
        seconds = time.perf_counter() - start
        self._stats["captures"] += 1
        self._stats["capture_seconds"] += seconds
        chain.capture_seconds = seconds
        self._entries[key] = chain
        self._evict(0)
        return chain

    def _capture(
        self, key: GraphKey, stages: list[Stage], inputs: dict[str, Tensor], outputs: Sequence[str]
    ) -> GraphChain:
        if self.backend == "cuda" and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self.chain_factory(
            stages, inputs, self._pool, outputs=outputs, per_stage=self.per_stage, backend=self.backend, name=str(key)
        )

    def _evict(self, at_least: int) -> None:
        """Drop the least recently used entries: ``at_least`` of them, then while over a bound (keeping one)."""
        evicted = 0
        while self._entries and (evicted < at_least or (len(self._entries) > 1 and self._over())):
            self._entries.popitem(last=False)
            self._stats["evictions"] += 1
            evicted += 1
        if not self._entries:
            self._pool = None  # see clear()

    def _over(self) -> bool:
        return len(self._entries) > self.max_entries or (self.max_bytes is not None and self.nbytes > self.max_bytes)

    def clear(self) -> None:
        """Drop every entry; the next capture starts a new pool.

        Once the last graph of a pool is gone, the allocator keeps the pool only while something still holds
        its memory (a compiled stage's buffer, a tensor a caller kept), with a use count of 0; capturing into
        it again then fails an internal assert (``use_count > 0``, pytorch/pytorch#189126).
        """
        with self.lock:
            self._entries.clear()
            self._pool = None

    def stats(self) -> dict[str, Any]:
        """Hits, misses, captures, evictions, out-of-memory retries, capture seconds, and bytes per entry."""
        per_entry = {str(k): {"capture_seconds": c.capture_seconds, "bytes": c.bytes} for k, c in self._entries.items()}
        return {**self._stats, "entries": len(self._entries), "bytes": self.nbytes, "per_entry": per_entry}
