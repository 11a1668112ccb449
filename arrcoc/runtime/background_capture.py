"""Chains built and captured on a helper thread while other chains serve the calls.

A compiled chain is the faster one, but compiling it takes seconds to a minute per graph key (dynamo traces it,
inductor builds or loads its kernels), while a plain graph is captured in a second. So the caller serves each key
from its plain chain at once and asks this for the compiled one; once that is captured here, calls for the key
replay it instead. The compile runs on the helper thread's own stream; the calls replaying beside it are not held
up. Each build holds :attr:`BackgroundCapture.gate`, which the caller holds through a capture of its own, so that
no capture runs beside a compile; the build's capture also takes the caller's capture lock. This module knows
nothing of relevance or of what makes one chain better than another.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch import Tensor

from .graphs import GraphCache, GraphKey, Stage, warm_up

__all__ = ["BackgroundCapture"]


class BackgroundCapture:
    """A :class:`GraphCache` filled on a helper thread, one key at a time, in the order keys were asked for.

    Args:
        build: ``build(key) -> (stages, static inputs, result keys)`` of the chain to capture (run on the helper
            thread: a compiled chain compiles there, on its first run).
        max_entries: most chains kept (as :class:`GraphCache`).
        backend: :class:`GraphCache`'s (``"eager"``: the same bookkeeping without a GPU, for tests).
        prepare: ``prepare(key)``, run in the asking thread before a key's build is queued: what the build needs
            that must not be created on the helper thread beside the caller's own use of it.
        started: build as keys are asked for (``False``: only note them, until :meth:`start`).
    """

    def __init__(
        self,
        build: Callable[[GraphKey], tuple[list[Stage], dict[str, Tensor], Sequence[str]]],
        max_entries: int = 32,
        backend: str = "cuda",
        prepare: Callable[[GraphKey], object] | None = None,
        started: bool = True,
    ) -> None:
        self.build, self.prepare = build, prepare
        self.started = started
        self.cache = GraphCache(max_entries, backend=backend)
        self.lock = threading.Lock()
        # held through each build; a caller holds it through a capture of its own, which a build beside could void
        self.gate = threading.Lock()
        self._jobs: dict[GraphKey, Future[None]] = {}
        self._queue: deque[tuple[GraphKey, Future[None], AbstractContextManager[Any] | None]] = deque()
        self._thread: threading.Thread | None = None  # running while the queue holds work
        self.failures: dict[GraphKey, str] = {}  # keys whose chain failed to build, with the reason

    def ready(self, key: GraphKey, capture_lock: AbstractContextManager[Any] | None = None) -> bool:
        """Whether ``key``'s chain is in :attr:`cache`; the first time a key is asked for, its build is queued (its
        capture then holds ``capture_lock``, the lock the caller's own captures hold)."""
        with self.lock:
            job = self._jobs.get(key)
            if job is None:
                if self.prepare is not None:
                    self.prepare(key)
                self._jobs[key] = job = Future()
                self._queue.append((key, job, capture_lock))
                self._run_queue()
                return False
            if not job.done():
                return False
            if job.exception() is not None:
                return False  # warned once, on the helper thread: this key stays on the caller's chain
            if key not in self.cache:  # evicted: build it again
                del self._jobs[key]
                return False
            return True

    def start(self) -> None:
        """Build the keys noted so far and, from now on, each key as it is asked for."""
        with self.lock:
            self.started = True
            self._run_queue()

    def _run_queue(self) -> None:
        """Start the helper thread if it has work and may run (under :attr:`lock`)."""
        if self.started and self._queue and self._thread is None:
            # a daemon: a process that finishes its work before a compile does exits without waiting for it; it
            # ends when the queue is empty (nothing keeps the pipeline alive after its last call)
            self._thread = threading.Thread(target=self._work, name="arrcoc-compile", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every chain asked for so far is built (or failed); returns whether all were, in time (False
        at once while not :attr:`started`: nothing is being built)."""
        with self.lock:
            if not self.started and self._jobs:
                return False
            jobs = list(self._jobs.values())
        return not wait(jobs, timeout).not_done  # a failure was warned about where it happened

    def clear(self) -> None:
        """Forget every chain (a built one holds the old device's or dtype's tensors): queued builds are cancelled, and
        a build under way finishes into a cache no call reads."""
        with self.lock:
            for _, job, _ in self._queue:
                job.cancel()
            self._queue.clear()
            self._jobs.clear()
            self.cache = GraphCache(self.cache.max_entries, backend=self.cache.backend)

    def _work(self) -> None:
        while True:
            with self.lock:  # the lock ready() queues under: no key is queued after this thread decides to end
                if not self._queue:
                    self._thread = None
                    return
                key, job, capture_lock = self._queue.popleft()
            if not job.set_running_or_notify_cancel():
                continue
            try:
                with self.gate:
                    self._capture(key, capture_lock)
            except Exception as err:  # any failure leaves the key on the caller's chain
                self.failures[key] = f"{type(err).__name__}: {err}"
                if threading.main_thread().is_alive():  # else the process is exiting under the compile: no news
                    warnings.warn(
                        f"arrcoc: {key} stays on its plain graph: building its other chain failed: {err}", stacklevel=1
                    )
                job.set_exception(err)
            else:
                job.set_result(None)

    def _capture(self, key: GraphKey, capture_lock: AbstractContextManager[Any] | None) -> None:
        cache = self.cache
        with ExitStack() as context:
            context.enter_context(torch.inference_mode())  # as the calls it serves run
            if key.device.type == "cuda":  # its own stream: nothing the calls queue waits for the compile's runs
                context.enter_context(torch.cuda.device(key.device))
                context.enter_context(torch.cuda.stream(torch.cuda.Stream(key.device)))
            stages, inputs, outputs = self.build(key)

            def run() -> None:
                state: dict[str, Any] = dict(inputs)
                for _, fn in stages:
                    state.update(fn(state))

            if key.device.type == "cuda":
                warm_up(run, 1, key.device)  # the compile: outside every lock
            else:
                run()
            cache.capture_lock = capture_lock
            cache.get(key, lambda: (stages, inputs, outputs))
