"""CUDA graphs for the stages, chained, and a cache of them keyed on image size.

Each stage of a bucket's chain (``Pipeline.stages``) is captured as its own CUDA graph. The static output
tensors of one stage are the static inputs of the next (no copies), and every graph of a cache allocates
from one shared memory pool. A call copies its inputs into the entry's static input buffers and replays
the graphs in order.

Sharing one pool is safe because entries are replayed one at a time (``GraphCache.lock``) and each replay
runs a whole chain: a graph may reuse memory another entry's graph used for temporaries, so an entry's
static outputs are only valid until the next replay of *any* entry. The pipeline therefore copies results
out under the lock.

This module knows nothing about relevance: it chains functions ``state -> new state entries``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ArrcocError

__all__ = ["GraphKey", "GraphChain", "GraphCache", "CaptureError"]

logger = logging.getLogger(__name__)

Stage = tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape of a captured chain."""

    bucket: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    capacity: int
    query_tokens: int


class GraphChain:
    """One captured chain: static inputs, one CUDA graph per stage, static outputs.

    Args:
        stages: ``(name, fn)`` in order; each ``fn`` reads the state and returns new entries.
        inputs: the static input tensors (owned by the chain; write into them before ``replay``).
        pool: the memory pool shared by the cache's graphs.
        warmup: eager runs on a side stream before capture (lazy initialisation, cuBLAS workspaces).
    """

    def __init__(self, stages: list[Stage], inputs: dict[str, Tensor], pool: Any, warmup: int = 2) -> None:
        self.inputs = inputs
        self.graphs: list[tuple[str, torch.cuda.CUDAGraph]] = []
        device = next(iter(inputs.values())).device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                state = dict(inputs)
                for name, fn in stages:
                    try:
                        state.update(fn(state))
                    except Exception as err:  # e.g. a compiler error: the stage cannot be graphed
                        raise CaptureError(name, err) from err
        torch.cuda.current_stream(device).wait_stream(side)
        del state
        self.state: dict[str, Any] = dict(inputs)
        before = torch.cuda.memory_allocated(device)
        for name, fn in stages:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    out = fn(self.state)
            except Exception as err:
                raise CaptureError(name, err) from err
            self.state.update(out)  # static outputs of this stage = static inputs of the next
            self.graphs.append((name, graph))
        self.bytes = torch.cuda.memory_allocated(device) - before

    def replay(self) -> None:
        for _, graph in self.graphs:
            graph.replay()


class CaptureError(ArrcocError, RuntimeError):
    """A stage could not be captured; the message names the stage and the reason."""

    def __init__(self, stage: str, err: BaseException) -> None:
        super().__init__(f"stage {stage!r} could not be captured as a CUDA graph: {type(err).__name__}: {err}")
        self.stage = stage


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    captures: int = 0
    evictions: int = 0
    capture_seconds: float = 0.0
    entries: dict[GraphKey, dict[str, float]] = field(default_factory=dict)


class GraphCache:
    """Captured chains keyed on :class:`GraphKey`, least recently used first out.

    Args:
        max_entries: most chains kept.
        max_bytes: most bytes of static outputs kept across chains (``None``: no bound).
    """

    def __init__(self, max_entries: int = 32, max_bytes: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[GraphKey, GraphChain] = OrderedDict()
        self._pool: Any = None
        self._stats = _Stats()
        self.lock = threading.RLock()  # replays and captures are serialised: one shared pool

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._entries

    def get(self, key: GraphKey, build: Callable[[], tuple[list[Stage], dict[str, Tensor]]]) -> GraphChain:
        """The chain for ``key``; a miss calls ``build() -> (stages, static inputs)`` and captures."""
        with self.lock:
            chain = self._entries.get(key)
            if chain is not None:
                self._stats.hits += 1
                self._entries.move_to_end(key)
                return chain
            self._stats.misses += 1
            stages, inputs = build()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            start = time.perf_counter()
            try:
                chain = GraphChain(stages, inputs, self._pool)
            except torch.cuda.OutOfMemoryError:
                if not self._entries:
                    raise
                self._evict(len(self._entries))  # free everything once, then try again
                torch.cuda.empty_cache()
                chain = GraphChain(stages, inputs, self._pool)
            seconds = time.perf_counter() - start
            self._stats.captures += 1
            self._stats.capture_seconds += seconds
            self._stats.entries[key] = {"capture_seconds": seconds, "bytes": chain.bytes}
            self._entries[key] = chain
            self._evict(0)
            return chain

    def _evict(self, at_least: int) -> None:
        def over() -> bool:
            total = sum(c.bytes for c in self._entries.values())
            return len(self._entries) > self.max_entries or (self.max_bytes is not None and total > self.max_bytes)

        evicted = 0
        while self._entries and (evicted < at_least or (over() and len(self._entries) > 1)):
            key, _ = self._entries.popitem(last=False)
            self._stats.entries.pop(key, None)
            self._stats.evictions += 1
            evicted += 1

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self._stats.entries.clear()

    def stats(self) -> dict[str, Any]:
        """Hits, misses, captures, evictions, total capture seconds, and bytes and capture time per entry."""
        s = self._stats
        return {"hits": s.hits, "misses": s.misses, "captures": s.captures, "evictions": s.evictions,
                "capture_seconds": s.capture_seconds, "entries": len(self._entries),
                "bytes": sum(c.bytes for c in self._entries.values()),
                "per_entry": {f"{k.bucket}px/b{k.batch}/{str(k.dtype).split('.')[-1]}/T{k.capacity}/L{k.query_tokens}": dict(v)
                              for k, v in s.entries.items()}}
