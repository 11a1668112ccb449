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
  valid until the next replay of that entry and checked by a generation counter (:class:`StaleOutputError`);
- a result's views are built when first read (:class:`ChainResult`, :func:`lazy_output`): one ``as_strided``
  each, from offsets computed once per entry, so a caller that reads three results builds three views;
- what a call would otherwise rebuild is made once: keys carry their hash, and small inputs passed again
  (a caller's cached zeros) keep their byte views.

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
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ArrcocError, InvalidInputError

__all__ = ["GraphKey", "GraphChain", "GraphCache", "PackedTensors", "ChainResult", "CaptureError",
           "CaptureMemoryError", "StaleOutputError", "guard_output", "lazy_output"]

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

    def __post_init__(self) -> None:  # hashed once: every call looks its key up three times
        object.__setattr__(self, "_hash", hash((self.bucket, self.batch, self.dtype, self.device, self.capacity,
                                                self.query_tokens, self.thread)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]


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
#: Inputs up to this size keep the byte view of the last tensor written (kept alive: small ones only).
_MEMO_BYTES = 1 << 16
#: Packed buffers are padded to a multiple of this many bytes (the widest item of any dtype a stage returns).
_ALIGN = 16


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
        self.order = tuple(specs)  # as given (results are handed out in this order)
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
        # name -> (dtype run, storage offset in that dtype's elements, shape, contiguous strides): one view of a
        # packed buffer is then one as_strided on its run's typed view, with nothing recomputed per call
        self.layout: dict[str, tuple[int, int, tuple[int, ...], tuple[int, ...]]] = {}
        start, index = 0, 0
        for run, (dtype, run_bytes, numels, shapes) in enumerate(self._runs):
            itemsize, offset = _itemsize(dtype), start
            for numel, shape in zip(numels, shapes):
                self.layout[self.names[index]] = (run, offset // itemsize, shape, _contiguous_strides(shape))
                offset += numel * itemsize
                index += 1
            start += run_bytes
        # per tensor in buffer order: name, shape, dtype, and whether it is small enough to remember its bytes
        self._plan = [(n, shape, dtype, size <= _MEMO_BYTES)
                      for n, shape, dtype, size in zip(self.names, self.shapes, self.dtypes, self.sizes)]
        self._memo: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (the last small value written, its byte view)
        # padded to a whole number of the widest item, so the whole buffer has a typed view for every dtype
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
        """Typed views ``(rows, *shape[1:])`` of every tensor in ``buffer`` (a copy of :attr:`buffer`)."""
        runs: dict[int, tuple[Tensor, int]] = {}
        return {name: self.view(buffer, name, rows, runs) for name in self.names}

    def view(self, buffer: Tensor, name: str, rows: int | None = None,
             runs: dict[int, tuple[Tensor, int]] | None = None) -> Tensor:
        """One tensor's contiguous view ``(rows, *shape[1:])`` in ``buffer`` (a copy of :attr:`buffer`).

        ``runs`` caches the typed view of ``buffer`` for each dtype between calls (one per buffer): with it, a
        view costs one ``as_strided``, so a caller can build only the views it reads.
        """
        run, offset, shape, strides = self.layout[name]
        typed = None if runs is None else runs.get(run)
        if typed is None:
            whole = buffer.view(self._runs[run][0])  # the padded buffer divides into whole items of any dtype
            typed = (whole, whole.storage_offset())
            if runs is not None:
                runs[run] = typed
        if rows is not None and rows != shape[0]:
            shape = (rows, *shape[1:])  # the first rows of a contiguous block: still one contiguous block
        return typed[0].as_strided(shape, strides, typed[1] + offset)

    def write(self, values: Mapping[str, Tensor], rows: int | None = None) -> None:
        """Copy ``values`` (each ``(rows, *shape[1:])``) into the first ``rows`` of every view.

        With every tensor present, of its dtype and full shape this is one kernel (``torch.cat`` into the
        buffer, after one copy of each non-contiguous value); otherwise one copy per tensor (which converts
        dtypes and broadcasts).
        """
        if (rows is None or rows == self.batch) and len(values) == len(self.names):
            parts, memo = [], self._memo
            for name, shape, dtype, small in self._plan:
                value = values[name]
                if small:  # the same small tensor as last time (a caller's cached zeros): its bytes are known
                    known = memo.get(name)
                    if known is not None and known[0] is value:
                        parts.append(known[1])
                        continue
                if value.dtype != dtype or value.shape != shape:
                    break
                if value.is_contiguous():
                    parts.append(_bytes(value))
                    if small:
                        memo[name] = (value, parts[-1])  # a view: it follows in-place changes of the tensor
                else:  # e.g. one query expanded over the batch: one copy here still beats a copy per tensor below
                    parts.append(_bytes(value.contiguous()))
            else:
                try:
                    torch.cat(parts, out=self.body)  # shapes and dtypes match: the buffer is never resized
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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


# --- results ---------------------------------------------------------------------------------------------
class ChainResult(Mapping[str, Any]):
    """A chain's results for the first ``rows`` images: top-level keys, nested dicts rebuilt (``"balance"``).

    Each key's views are built on its first access (one ``as_strided`` per tensor), so a caller pays only
    for what it reads. With ``copy=False`` they view the entry's own output buffer, and every access checks
    that no replay of the entry happened since (:meth:`check`).
    """

    __slots__ = ("_chain", "_rows", "_owned", "_generation", "_buffer", "_views", "_runs", "_cache")

    def __init__(self, chain: GraphChain, buffer: Tensor, rows: int, owned: bool) -> None:
        self._chain, self._rows, self._owned = chain, rows, owned
        self._generation = chain.generation
        self._buffer = buffer
        # zero-copy at a full batch bucket: the entry's own views, built once at capture
        self._views = chain.outputs.views if buffer is chain.outputs.buffer and rows == chain.outputs.batch else None
        self._runs: dict[int, tuple[Tensor, int]] = {}  # typed view of the buffer per dtype, on first use
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
        if not self._owned and self._chain.generation != self._generation:
            raise StaleOutputError(
                f"this zero-copy result (copy=False) of the {self._chain.name} graph was overwritten by a later "
                f"call on the same entry ({self._chain.generation - self._generation} since); read results "
                "before the next call, or call with copy=True to own them")

    def _leaf(self, name: str) -> Tensor:
        if self._views is not None:
            return self._views[name]
        return self._chain.outputs.view(self._buffer, name, self._rows, self._runs)

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
class _LazyField:
    """A field built on its first read by the instance's ``_arrcoc_source(name)``, then a plain attribute (a
    non-data descriptor: once the value sits in the instance's ``__dict__``, reads never come here again)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = obj.__dict__["_arrcoc_source"](self.name)
        return value


class _CheckedField(_LazyField):
    """A zero-copy field: every read first runs the instance's ``_arrcoc_check()`` (which raises
    :class:`StaleOutputError` once the buffers it views were overwritten), then builds the value on first read."""

    __slots__ = ()

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        state = obj.__dict__
        check = state.get("_arrcoc_check")
        if check is not None:
            check()
        try:
            return state[self.name]
        except KeyError:
            source = state.get("_arrcoc_source")
            if source is None:  # a guarded plain instance whose field was never set
                raise AttributeError(self.name) from None
            value = state[self.name] = source(self.name)
            return value

    def __set__(self, obj: Any, value: Any) -> None:  # a data descriptor: reads always come through __get__
        obj.__dict__[self.name] = value


_CLASSES: dict[tuple[type, frozenset[str], frozenset[str]], type] = {}


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _materialise(self: Any) -> tuple[Any, ...]:
    """Pickling and copying give an instance of the plain class, every field built (and checked)."""
    names = (*self._arrcoc_lazy, *self._arrcoc_checked)
    state = {k: v for k, v in self.__dict__.items() if not k.startswith("_arrcoc_")}
    state.update({name: getattr(self, name) for name in names})
    return _rebuild, (self._arrcoc_base, state)


def _lazy_class(cls: type, lazy: frozenset[str], checked: frozenset[str]) -> type:
    """A cached subclass of ``cls`` whose ``lazy`` fields are built on first read and ``checked`` fields checked."""
    key = (cls, lazy, checked)
    sub = _CLASSES.get(key)
    if sub is None:
        attrs: dict[str, Any] = {name: _LazyField(name) for name in lazy - checked}
        attrs.update({name: _CheckedField(name) for name in checked})
        attrs.update(__doc__=cls.__doc__, __module__=cls.__module__, __reduce__=_materialise, _arrcoc_base=cls,
                     _arrcoc_lazy=tuple(sorted(lazy - checked)), _arrcoc_checked=tuple(sorted(checked)))
        sub = _CLASSES[key] = type(f"{'ZeroCopy' if checked else 'Lazy'}{cls.__name__}", (cls,), attrs)
    return sub


def lazy_output(cls: type, values: Mapping[str, Any], source: Callable[[str], Any], lazy: Collection[str], *,
                check: Callable[[], None] | None = None, checked: Collection[str] = ()) -> Any:
    """An instance of (a cached subclass of) ``cls`` without running its ``__init__``.

    Fields in ``values`` are set now; each field in ``lazy`` is built by ``source(name)`` on its first read and
    kept. With ``check`` (zero-copy results), every read of a field in ``checked`` calls it first, so a read
    after the buffers were overwritten raises (:class:`StaleOutputError`) even where the view was never built.
    ``isinstance(out, cls)`` holds; pickling or copying gives a plain ``cls`` with every field built.
    """
    checked = frozenset(checked) if check is not None else frozenset()
    obj = object.__new__(_lazy_class(cls, frozenset(lazy), checked))
    state = obj.__dict__
    state.update(values)
    state["_arrcoc_source"] = source
    if check is not None:
        state["_arrcoc_check"] = check
    return obj


def guard_output(output: Any, result: ChainResult, fields: Sequence[str]) -> Any:
    """Make ``output`` (a plain-class instance) raise :class:`StaleOutputError` when ``fields`` are read stale.

    The instance keeps its type's behaviour (``isinstance`` holds); its class becomes a cached subclass
    that checks ``result`` before returning any of ``fields``. Tensors taken out of it before the next
    call are plain views and are not checked: keep the output object, not the tensor, across calls.
    """
    output.__class__ = _lazy_class(type(output), frozenset(), frozenset(fields))
    output.__dict__["_arrcoc_check"] = result.check
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
            self.tree = _tree(self.outputs.order)
            self.pool_bytes = 0
            self.bytes = self.inputs.nbytes + self.outputs.nbytes
            return
        state = self._warm(warmup)
        self.outputs = PackedTensors.like(_leaves(state, self.output_keys))  # outside the pool: the entry owns it
        self.tree = _tree(self.outputs.order)  # top-level result key -> its packed tensors
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
        torch.cat([_bytes(leaves[n].contiguous()) for n in self.outputs.names], out=self.outputs.body)

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
            ``python -m arrcoc.tools.bench_graphs`` measures both.
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
        self._raw_stream: tuple[int | None, int] | None = None  # its (device index, raw handle)
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
        if evicted:
            self._drop_unused_pools()

    def _drop_unused_pools(self) -> None:
        """Forget the pool of a thread with no entries left: its next capture starts a new pool.

        Once the last graph of a pool is gone, the allocator keeps the pool only while something still holds
        its memory (a compiled stage's buffer, a tensor a caller kept), with a use count of 0; capturing into
        it again then fails an internal assert (``use_count > 0``, pytorch/pytorch#189126). It happened in the
        benchmark after ``torch.compile`` ran inside a capture and the cache was cleared.
        """
        live = {key.thread for key in self._entries}
        for thread in [t for t in self._pools if t not in live]:
            del self._pools[thread]

    def run(self, key: GraphKey, build: Callable[[], tuple[list[Stage], dict[str, Tensor], Sequence[str]]],
            values: Mapping[str, Tensor], rows: int, copy: bool = True) -> ChainResult:
        """Fill, replay and read out the chain for ``key`` (captured on a miss), safely across threads."""
        if self.threads == "per_thread":
            key = self.key_for(key)
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
                # the raw handle is an int (no Stream object per call); a Stream only when the stream changes
                raw = (chain.device.index, torch._C._cuda_getCurrentRawStream(chain.device.index))
                if raw != self._raw_stream:
                    stream = torch.cuda.current_stream(chain.device)
                    if self._stream is not None:
                        stream.wait_stream(self._stream)  # one pool: never overlap another stream's replay
                    self._stream, self._raw_stream = stream, raw
            return chain.run(values, rows, copy)

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self._stats.entries.clear()
            self._drop_unused_pools()

    def stats(self) -> dict[str, Any]:
        """Hits, misses, captures, evictions, out-of-memory retries, capture seconds, and bytes per entry."""
        s = self._stats
        return {"hits": s.hits, "misses": s.misses, "captures": s.captures, "evictions": s.evictions,
                "oom_retries": s.oom_retries, "capture_seconds": s.capture_seconds, "entries": len(self._entries),
                "bytes": self.nbytes, "per_entry": {_describe(k): dict(v) for k, v in s.entries.items()}}


def _describe(key: GraphKey) -> str:
    thread = f"/t{key.thread}" if key.thread else ""
    return f"{key.bucket}px/b{key.batch}/{str(key.dtype).split('.')[-1]}/T{key.capacity}/L{key.query_tokens}{thread}"
