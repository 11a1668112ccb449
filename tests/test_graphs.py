"""CUDA graphs: graphed equals eager, no stale data, no leaking padding, fallbacks, threads (GPU only)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import arrcoc
from arrcoc.graphs import GraphCache, GraphKey

pytestmark = pytest.mark.cuda


def _images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """Random images whose long side falls in the bucket of ``size``, with random aspect ratios."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        long = int(torch.randint(size * 3 // 4, size + 1, (1,), generator=g))
        short = int(torch.randint(max(1, long // 3), long + 1, (1,), generator=g))
        h, w = (long, short) if torch.rand(1, generator=g) < 0.5 else (short, long)
        base = torch.rand(3, 1 + h // 16, 1 + w // 16, generator=g)  # smooth structure plus noise
        image = torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear")[0]
        out.append((image * 0.8 + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1))
    return out


@pytest.fixture(scope="module")
def pipes() -> tuple[arrcoc.Pipeline, arrcoc.Pipeline]:
    config = arrcoc.PipelineConfig.from_name("tiny")
    graphed = arrcoc.Pipeline(config, device="cuda", cuda_graphs=True)
    eager = arrcoc.Pipeline(config, device="cuda", cuda_graphs=False)
    return graphed, eager


def _assert_same(a: arrcoc.CompressionOutput, b: arrcoc.CompressionOutput) -> None:
    assert torch.equal(a.allocation, b.allocation)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [224, 384, 512, 768, 1024])
def test_graphed_equals_eager(pipes, size: int) -> None:
    """200 random images per bucket, in batches of 8, budgets and queries changing between calls."""
    graphed, eager = pipes
    g = torch.Generator().manual_seed(size)
    images = _images(200, size, seed=size)
    patches = (size // 16) ** 2
    for start in range(0, 200, 8):
        batch = images[start : start + 8]
        budget = torch.randint(1, min(patches, 512) + 1, (len(batch),), generator=g).tolist()
        query = torch.randn(int(torch.randint(1, 6, (1,), generator=g)), graphed.width, generator=g).cuda()
        if start % 16 == 0:
            query = None
        _assert_same(graphed(batch, query=query, budget=budget), eager(batch, query=query, budget=budget))
    assert graphed.graph_cache.stats()["hits"] > 0


def test_consecutive_calls_never_return_old_data(pipes) -> None:
    graphed, eager = pipes
    first, second = _images(4, 384, seed=1), _images(4, 384, seed=2)
    a = graphed(first, budget=50)
    b = graphed(second, budget=70)
    assert not torch.equal(a.tokens, b.tokens)
    _assert_same(a, eager(first, budget=50))  # `a` still holds its own data after the second call
    _assert_same(b, eager(second, budget=70))


def test_batch_padding_never_leaks(pipes) -> None:
    graphed, eager = pipes
    images = _images(3, 512, seed=3)  # batch 3 pads to the batch bucket 4
    out = graphed(images, budget=[10, 100, 200])
    assert out.tokens.shape[0] == 3 and out.mask.sum(1).tolist() == [10, 100, 200]
    alone = graphed(images[1], budget=100)
    assert out.allocation[1].sum() == 100 and alone.mask.sum() == 100
    reference = eager(images, budget=[10, 100, 200])
    torch.testing.assert_close(out.relevance, reference.relevance, rtol=1e-3, atol=1e-5)
    assert (out.allocation == reference.allocation).float().mean() > 0.98


def test_budget_above_capacity_is_a_clear_error() -> None:
    config = arrcoc.PipelineConfig.from_name("tiny", token_capacity=64)
    pipe = arrcoc.Pipeline(config, device="cuda")
    pipe(_images(1, 384, seed=4), budget=64)
    with pytest.raises(arrcoc.BudgetError, match="token_capacity 64"):
        pipe(_images(1, 384, seed=4), budget=65)


def test_capture_has_no_hidden_sync() -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    pipe.encoder(224), pipe.encoder(384)  # build the encoders (host-to-device copies) outside the checked region
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            chain = pipe._chain(pipe._graph_key(384, 2, 64, 1))
            chain.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert chain is not None and [name for name, _ in chain.graphs] == ["encode", "score", "balance", "allocate", "compress"]


def test_new_budget_and_query_replay_without_recapture() -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    images = _images(2, 224, seed=5)
    pipe(images, budget=10)
    captures = pipe.graph_cache.stats()["captures"]
    pipe(images, budget=40, query=torch.randn(pipe.width).cuda())
    pipe(images, budget=[3, 60])
    assert pipe.graph_cache.stats()["captures"] == captures


def test_capture_failure_falls_back_with_one_warning(monkeypatch) -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    original = pipe.stages

    def syncing(bucket, capacity=0):
        chain = original(bucket, capacity)
        name, fn = chain[1]
        chain[1] = (name, lambda s: (s["features"].sum().item(), fn(s))[1])  # a host sync: cannot be captured
        return chain

    monkeypatch.setattr(pipe, "stages", syncing)
    images = _images(2, 224, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pipe(images, budget=20)
        second = pipe(images, budget=20)
    messages = [str(w.message) for w in caught if "eagerly" in str(w.message)]
    assert len(messages) == 1 and "score" in messages[0]
    assert torch.equal(first.allocation, second.allocation) and first.mask.sum() == 40


def test_graphs_switched_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("ARRCOC_CUDA_GRAPHS", "0")
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    pipe(_images(1, 224, seed=7), budget=10)
    assert pipe.graph_cache.stats()["captures"] == 0


def test_threads_get_their_own_results(pipes) -> None:
    graphed, eager = pipes
    jobs = [(_images(2, size, seed=100 + i), 20 + i) for i, size in enumerate([224, 384, 224, 512, 384, 224, 512, 224])]
    expected = [eager(images, budget=budget) for images, budget in jobs]
    results: dict[int, arrcoc.CompressionOutput] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = graphed(jobs[i][0], budget=jobs[i][1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, reference in enumerate(expected):
        _assert_same(results[i], reference)


def test_warmup_and_lru_bound() -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=(224, 384)), device="cuda",
                           graph_cache=GraphCache(max_entries=3))
    stats = pipe.warmup(batch_sizes=(1, 2))
    assert stats["entries"] == 3 and stats["evictions"] == 5 and stats["captures"] == 8
    assert all(v["bytes"] > 0 for v in stats["per_entry"].values())
    key = GraphKey(224, 1, torch.float32, pipe.device, 64, 1)
    assert key in pipe.graph_cache  # the smallest, captured last, is kept


def test_compile_option_gives_the_same_results(pipes) -> None:
    """compile=True compiles each stage before capture; where the compiler fails, the warning names the stage."""
    _, eager = pipes
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda", compile=True)
    images = _images(2, 224, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(images, budget=30)
    failures = [str(w.message) for w in caught if "running eagerly" in str(w.message)]
    assert len(failures) <= 1
    reference = eager(images, budget=30)
    torch.testing.assert_close(out.relevance, reference.relevance, rtol=1e-3, atol=1e-5)
    assert out.mask.sum().item() == 60
