"""Reliability of the CUDA-graph path (issue 6, GPU parts): faults during capture and calls, memory, threads.

Each test records its figures; with ``ARRCOC_RELIABILITY_OUT`` set they are written there as JSON
(``graphs-<test>.json``). The tiny preset keeps the whole file to a minute or two on one GPU.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import arrcoc
from arrcoc.runtime.graphs import CaptureMemoryError, GraphCache, GraphChain

pytestmark = pytest.mark.cuda


def _record(name: str, figures: dict[str, Any]) -> None:
    folder = os.environ.get("ARRCOC_RELIABILITY_OUT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"graphs-{name}.json").write_text(json.dumps(figures, indent=2, default=str))


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1 + h // 16, 1 + w // 16, generator=g)
    return torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear")[0].clamp(0, 1)


def _pipe(**kwargs: Any) -> arrcoc.Pipeline:
    return arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=(224, 384, 512)), device="cuda", **kwargs)


def _same(a: arrcoc.CompressionOutput, b: arrcoc.CompressionOutput) -> bool:
    return (
        torch.equal(a.allocation, b.allocation)
        and torch.equal(a.mask, b.mask)
        and torch.equal(a.positions, b.positions)
        and torch.equal(a.tokens, b.tokens)
        and torch.equal(a.relevance, b.relevance)
    )


def test_out_of_memory_during_capture_evicts_retries_then_raises_clearly() -> None:
    pipe = _pipe(graph_cache=GraphCache(max_entries=8))
    eager = _pipe(cuda_graphs=False)
    images = {size: [_image(size, size - 20, seed=size)] for size in (224, 384, 512)}
    for size in (224, 384):
        pipe(images[size], budget=20)
    real, plan = GraphChain, []

    def factory(*args: Any, **kwargs: Any) -> GraphChain:
        if plan and plan.pop(0):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(*args, **kwargs)

    pipe.graph_cache.chain_factory = factory
    plan[:] = [True]  # the first capture fails, the retry succeeds
    before = pipe.graph_cache.stats()
    out = pipe(images[512], budget=20)
    after = pipe.graph_cache.stats()
    assert _same(out, eager(images[512], budget=20))
    assert after["oom_retries"] == 1 and after["evictions"] == before["evictions"] + 1
    plan[:] = [True, True]  # both tries fail: a clear error, nothing half-built in the cache
    with pytest.raises(CaptureMemoryError, match="out of GPU memory capturing 224px/b2") as info:
        pipe(images[224] * 2, budget=20)
    assert isinstance(info.value, arrcoc.ArrcocError)
    entries = pipe.graph_cache.stats()["entries"]
    plan[:] = []  # the cache is still usable
    again = pipe(images[224] * 2, budget=20)
    assert _same(again, eager(images[224] * 2, budget=20))
    assert pipe.graph_cache.stats()["entries"] == entries + 1
    _record(
        "oom",
        {
            "faults_injected": 3,
            "retries": pipe.graph_cache.stats()["oom_retries"],
            "entries_before": before["entries"],
            "evictions": pipe.graph_cache.stats()["evictions"],
            "clear_error": str(info.value),
        },
    )


def test_a_failed_call_never_leaves_a_buffer_a_later_call_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, eager = _pipe(), _pipe(cuda_graphs=False)
    first, second, third = ([_image(200, 180, seed=s)] for s in (1, 2, 3))
    zero = pipe(first, budget=40, copy=False)
    chain = next(iter(pipe.graph_cache._entries.values()))
    faults = 0
    for stage in ("replay", "write"):  # an exception after the input copy, and one during it
        target = chain if stage == "replay" else chain.inputs
        original = getattr(target, stage)

        def broken(*args: Any, where: str = stage, **kwargs: Any) -> None:
            raise RuntimeError(f"injected failure in {where}")

        monkeypatch.setattr(target, stage, broken)
        with pytest.raises(RuntimeError, match="injected"):
            pipe(second, budget=40)
        faults += 1
        monkeypatch.setattr(target, stage, original)
        out = pipe(third, budget=40)
        assert _same(out, eager(third, budget=40))
    with pytest.raises(arrcoc.ArrcocError):
        zero.tokens  # noqa: B018 (a later call replayed the entry: the zero-copy result is refused, not wrong)

    # a capture that fails half-way leaves no entry behind
    def failing_capture(*args: Any, **kwargs: Any) -> GraphChain:
        raise RuntimeError("injected failure during capture")

    monkeypatch.setattr(pipe.graph_cache, "chain_factory", failing_capture)
    with pytest.raises(RuntimeError):
        pipe([_image(500, 300, seed=4)], budget=40)
    assert all(key.bucket != 512 for key in pipe.graph_cache._entries)
    _record("failed-calls", {"faults_injected": faults + 1, "later_calls_correct": True})


def test_memory_stays_bounded_cycling_sizes() -> None:
    """1,000 calls cycling through 20 image sizes with a bound of 4 entries: no growth of allocated memory."""
    pipe = _pipe(graph_cache=GraphCache(max_entries=4))
    sizes = [(int(s), int(s * 0.75)) for s in torch.linspace(120, 512, 20)]  # 3 buckets x 2 batch buckets
    batches = [1 if i % 2 else 2 for i in range(20)]
    images = [[_image(h, w, seed=i)] * batches[i] for i, (h, w) in enumerate(sizes)]
    marks: dict[int, dict[str, int]] = {}
    for call in range(1000):
        out = pipe(images[call % 20], budget=16)
        assert len(pipe.graph_cache) <= 4
        if call in (199, 599, 999):
            torch.cuda.synchronize()
            marks[call + 1] = {
                "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
                "entries": len(pipe.graph_cache),
                "cache_bytes": pipe.graph_cache.stats()["bytes"],
            }
    assert int(out.mask.sum()) == 16 * len(images[999 % 20])
    stats = pipe.graph_cache.stats()
    figures = {
        "calls": 1000,
        "image_sizes": len(sizes),
        "max_entries": 4,
        "captures": stats["captures"],
        "evictions": stats["evictions"],
        "marks": marks,
    }
    _record("memory", figures)
    assert stats["evictions"] >= stats["captures"] - 4 > 0
    growth = marks[1000]["allocated"] - marks[200]["allocated"]
    assert growth <= 2**20, figures  # no growth beyond allocator rounding
    assert marks[1000]["reserved"] <= marks[200]["reserved"] * 1.1 + 2**26, figures


def test_threads_mixed_calls_equal_the_same_call_alone() -> None:
    """8 threads x 200 calls of mixed sizes, budgets and queries on one pipeline."""
    pipe = _pipe(graph_cache=GraphCache(max_entries=128))
    rng = random.Random(0)
    jobs = []
    for i in range(16):
        size = rng.choice([(180, 200), (300, 250), (224, 100), (400, 380)])
        batch = rng.choice([1, 2, 3])
        query = (
            None
            if i % 3 == 0
            else torch.randn(rng.choice([1, 3]), pipe.width, generator=torch.Generator().manual_seed(i)).cuda()
        )
        jobs.append(
            ([_image(*size, seed=10 * i + j) for j in range(batch)], query, [rng.randint(1, 60) for _ in range(batch)])
        )
    alone = [pipe(images, query=query, budget=budget) for images, query, budget in jobs]
    wrong, errors, barrier = [0] * 8, [], threading.Barrier(8)

    def work(t: int) -> None:
        order = random.Random(t)
        try:
            barrier.wait()
            for _ in range(200):
                j = order.randrange(len(jobs))
                images, query, budget = jobs[j]
                wrong[t] += not _same(pipe(images, query=query, budget=budget), alone[j])
        except Exception as err:  # reported below with the thread's number
            errors.append(f"thread {t}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pipe.graph_cache.stats()
    _record(
        "threads",
        {
            "threads": 8,
            "calls": 1600,
            "distinct_calls": len(jobs),
            "wrong": sum(wrong),
            "errors": errors,
            "entries": stats["entries"],
            "captures": stats["captures"],
        },
    )
    assert not errors and wrong == [0] * 8
