"""Independent branches of a stage, run concurrently on CUDA side streams (inside a graph capture too).

At batch 1 most kernels of the chain fill a few of the GPU's SMs, so work that does not depend on other work
(the texture features beside the ViT, the three scorers) finishes sooner side by side. Forked from the
current stream and joined back into it, the branches become parallel branches of a captured CUDA graph:
``torch.compile(mode="reduce-overhead")`` records one stream and cannot do this.

Memory stays safe: a branch's inputs outlive the join (the caller holds them), a branch's temporaries live on
its own stream, and every fork first waits for the current stream, so a side stream never reuses a block that
queued work on the current stream still reads. Outside a capture, a side branch's results are also marked as
used on the current stream (``record_stream``): freed, their blocks go back to the side stream, and the next
fork may come from another stream, which the side stream would not wait for.

Side streams are per thread, so a capture in one thread never pulls in another thread's branches. They come
from PyTorch's stream pool (32 per device, handed out in turn, so two threads share one only once the pool has
wrapped around), at the default priority: high-priority side streams measured slower (docs/decisions.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["run_branches"]

_local = threading.local()


def _side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    """``count`` side streams of ``device`` for this thread, made once and kept."""
    streams: dict[int, list[torch.cuda.Stream]] = _local.__dict__.setdefault("streams", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    mine = streams.setdefault(index, [])
    while len(mine) < count:
        mine.append(torch.cuda.Stream(index))
    return mine[:count]


def run_branches(branches: Sequence[Callable[[], Any]], device: torch.device, concurrent: bool = True) -> list[Any]:
    """Run the ``branches`` (callables of no argument), returning their results in order.

    On CUDA with ``concurrent``, the first branch runs on the current stream and each other branch on a side
    stream forked from it; the current stream waits for all of them before this returns. Anywhere else
    they run one after another. The results are the same either way (the same kernels on the same inputs).
    """
    if not concurrent or device.type != "cuda" or len(branches) < 2:
        return [branch() for branch in branches]
    current = torch.cuda.current_stream(device)
    results: list[Any] = [None] * len(branches)
    sides = _side_streams(device, len(branches) - 1)
    for i, (stream, branch) in enumerate(zip(sides, branches[1:]), 1):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            results[i] = branch()
    results[0] = branches[0]()
    for stream in sides:
        current.wait_stream(stream)
    if not torch.cuda.is_current_stream_capturing():  # a capture's memory lives in its graph's pool instead
        for result in results[1:]:
            for tensor in _tensors(result):
                tensor.record_stream(current)
    return results


def _tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of a branch result: a tensor, or a tuple or list of them."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    return []
