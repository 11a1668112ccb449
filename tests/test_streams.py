"""Branches run side by side on CUDA side streams; elsewhere (and when switched off) one after another."""

from __future__ import annotations

import threading

import pytest
import torch

from arrcoc.runtime import streams
from arrcoc.runtime.streams import run_branches


def test_branches_return_their_results_in_order_and_run_in_order_off_cuda() -> None:
    calls: list[int] = []

    def branch(i: int) -> int:
        calls.append(i)
        return i * 10

    assert run_branches([lambda i=i: branch(i) for i in range(4)], torch.device("cpu")) == [0, 10, 20, 30]
    assert calls == [0, 1, 2, 3]
    assert run_branches([], torch.device("cpu")) == []


@pytest.mark.cuda
def test_side_streams_are_per_thread() -> None:
    """Two threads never share a side stream (a capture in one must not pull in the other's work)."""

    seen: dict[str, set[int]] = {}

    def record(name: str) -> None:
        seen[name] = {stream.cuda_stream for stream in streams._side_streams(torch.device("cuda"), 2)}

    threads = [threading.Thread(target=record, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen["a"]) == len(seen["b"]) == 2 and not seen["a"] & seen["b"]
