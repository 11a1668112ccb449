"""The benchmarks' one timing helper and one report writer.

- :func:`device_times_ms`: GPU time per call from CUDA events (``perf_counter`` on a CPU), after warm-up.
- :func:`wall_times_ms`: wall time per call around a synchronised call, after warm-up (what a user waits).
- :func:`busy_ms`: the time GPU kernels actually run per call (the profiler's device time, gaps excluded).
- :func:`write_report`: ``<folder>/<slug of name>[-tag].json`` and ``.md``, under a header naming the device.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["device_times_ms", "wall_times_ms", "busy_ms", "write_report"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # ok-sync: the benchmark's clock


def device_times_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call of ``fn``, ``reps`` times after ``warmup`` calls: CUDA events on a GPU (the device's
    time, launches queued back to back), ``perf_counter`` on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return wall_times_ms(fn, device, 0, reps)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def wall_times_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call of ``fn`` from ``perf_counter`` around a call the device has finished, ``reps`` times
    after ``warmup`` calls."""
    return paired_wall_times_ms([fn], device, warmup, reps)[0]


def paired_wall_times_ms(
    fns: Sequence[Callable[[], Any]], device: torch.device, warmup: int, reps: int
) -> list[list[float]]:
    """:func:`wall_times_ms` of each of ``fns``, the calls interleaved (``fns[0]``, ``fns[1]``, ... ``reps``
    times), so that a difference between two of them is taken call pair by call pair: the host's and the clocks'
    drift over the run then cancels instead of landing on one side."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append((time.perf_counter() - start) * 1e3)
    return times


def busy_ms(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call that GPU kernels actually run (the profiler's device time), gaps excluded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e3 / reps


def write_report(report: dict[str, Any], table: str, folder: str, name: str, tag: str = "") -> None:
    """Write ``<folder>/<slug of name>[-tag].json`` and ``.md``, and print the table."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + (f"-{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table)
    print(table)
