"""CUDA graphs: graphed equals eager, no stale data, no leaking padding, fallbacks, threads (GPU tests marked
``cuda``), and the cache's host-side logic (packing, keying, LRU, generation counter, threads) on any device
through the eager backend, which replays by re-running the stages into the same static buffers."""

from __future__ import annotations

import dataclasses
import threading
import warnings

import pytest
import torch

import arrcoc
from arrcoc.runtime.graphs import (
    CaptureMemoryError,
    ChainResult,
    GraphCache,
    GraphChain,
    GraphKey,
    PackedTensors,
    StaleOutputError,
    lazy_output,
)

cuda = pytest.mark.cuda


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


@cuda
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
        # budgets up to the bucket's patches: capped at each image's real patches, the same way on both paths
        _assert_same(
            graphed(batch, query=query, budget=budget, budget_policy="cap"),
            eager(batch, query=query, budget=budget, budget_policy="cap"),
        )
    assert graphed.graph_cache.stats()["hits"] > 0


@cuda
def test_consecutive_calls_never_return_old_data(pipes) -> None:
    graphed, eager = pipes
    first, second = _images(4, 384, seed=1), _images(4, 384, seed=2)
    a = graphed(first, budget=50)
    b = graphed(second, budget=70)
    assert not torch.equal(a.tokens, b.tokens)
    _assert_same(a, eager(first, budget=50))  # `a` still holds its own data after the second call
    _assert_same(b, eager(second, budget=70))


def _assert_the_padding_row_is_ignored(graphed: arrcoc.Pipeline, images: list, fillers: list, budget: list) -> None:
    """Three images fill a batch bucket of 4; the 4th row of the entry's static inputs keeps what the last full
    call left there. The same three images, after full calls that left different images (and budgets) in that
    row, must give bit-identical results from the same entry: any difference is the padding row leaking in."""
    results = []
    for filler, extra in zip(fillers, (1, max(budget))):
        graphed([*images, filler], budget=[*budget, extra])
        captures = graphed.graph_cache.stats()["captures"]
        results.append(graphed(images, budget=budget))
        assert graphed.graph_cache.stats()["captures"] == captures  # replayed the entry the full call filled
    first, second = results
    for name in ("tokens", "positions", "mask", "weights", "allocation", "relevance", "prefix"):
        assert torch.equal(getattr(first, name), getattr(second, name)), f"{name} depends on the padding row"
    assert all(torch.equal(first.scores[k], second.scores[k]) for k in first.scores)


@cuda
def test_batch_padding_never_leaks(pipes) -> None:
    graphed, eager = pipes
    images = _images(5, 512, seed=3)
    out = graphed(images[:3], budget=[10, 100, 200])  # batch 3 pads to the batch bucket 4
    assert out.tokens.shape[0] == 3 and out.mask.sum(1).tolist() == [10, 100, 200]
    assert out.mask[:, :10].all() and not out.mask[0, 10:].any()  # exactly the first `budget` tokens
    reference = eager(images[:3], budget=[10, 100, 200])
    torch.testing.assert_close(out.relevance, reference.relevance, rtol=1e-3, atol=1e-5)
    assert (out.allocation == reference.allocation).float().mean() > 0.98
    _assert_the_padding_row_is_ignored(graphed, images[:3], images[3:], [10, 100, 200])


def test_batch_padding_never_leaks_on_any_device(tiny_config) -> None:
    """The same check through the eager backend, which re-runs the stages over every row of the static buffers."""
    graphed = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"))
    g = torch.Generator().manual_seed(31)
    images = [torch.rand(3, 200, 224, generator=g) for _ in range(5)]
    _assert_the_padding_row_is_ignored(graphed, images[:3], images[3:], [5, 20, 40])


@cuda
def test_budget_above_capacity_is_a_clear_error() -> None:
    config = arrcoc.PipelineConfig.from_name("tiny", token_capacity=64)
    pipe = arrcoc.Pipeline(config, device="cuda")
    pipe(_images(1, 384, seed=4), budget=64)
    with pytest.raises(arrcoc.BudgetError, match="token_capacity 64"):
        pipe(_images(1, 384, seed=4), budget=65)


@cuda
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
    assert chain is not None and [name for name, _ in chain.graphs] == ["chain"]  # the whole chain, one launch


@cuda
def test_new_budget_and_query_replay_without_recapture() -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    images = _images(2, 224, seed=5)
    pipe(images, budget=10)  # no question: the chain with the query-free pick
    pipe(images, budget=10, query=torch.randn(pipe.width).cuda())  # every image asked: the chain without it
    captures = pipe.graph_cache.stats()["captures"]
    pipe(images, budget=40, query=torch.randn(pipe.width).cuda())
    pipe(images, budget=[3, 60])
    assert captures == 2 and pipe.graph_cache.stats()["captures"] == captures


@cuda
def test_capture_failure_falls_back_with_one_warning(monkeypatch) -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    original = pipe.stages

    def syncing(bucket, capacity=0, **options):
        chain = original(bucket, capacity, **options)
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


@cuda
def test_graphs_switched_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("ARRCOC_CUDA_GRAPHS", "0")
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"), device="cuda")
    pipe(_images(1, 224, seed=7), budget=10)
    assert pipe.graph_cache.stats()["captures"] == 0


@cuda
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


@cuda
def test_warmup_and_lru_bound() -> None:
    pipe = arrcoc.Pipeline(
        arrcoc.PipelineConfig.from_name("tiny", buckets=(224, 384)),
        device="cuda",
        graph_cache=GraphCache(max_entries=3),
    )
    stats = pipe.warmup(batch_sizes=(1, 2))
    # per size and batch: the compression chain with the query-free pick, the one without (every image asked),
    # the relevance-only chain; 2 sizes x 2 batches
    assert stats["entries"] == 3 and stats["evictions"] == 9 and stats["captures"] == 12
    assert all(v["bytes"] > 0 for v in stats["per_entry"].values())
    assert {(k.bucket, k.batch) for k in pipe.graph_cache._entries} == {(224, 1)}
    key = GraphKey(224, 1, torch.float32, pipe.device, 64, 1)
    assert key in pipe.graph_cache  # the smallest, captured last, is kept


@cuda
def test_a_pool_still_holding_memory_after_its_last_graph_is_not_captured_into_again() -> None:
    """A stage that keeps a tensor made inside its capture (as a compiled stage's buffers can) holds the pool's
    memory after the cache is cleared. Capturing into that pool again failed an allocator assert (use_count > 0,
    pytorch/pytorch#189126); the cache starts a new pool instead."""
    device = torch.device("cuda")
    kept: list[torch.Tensor] = []

    def keep(state: dict) -> dict:
        y = state["x"] * 2
        kept.append(y)  # allocated from the pool during capture; outlives the graph
        return {"y": y + 1}

    def build():
        return [("keep", keep)], {"x": torch.zeros(2, 5, device=device)}, ("y",)

    values = {"x": torch.ones(2, 5, device=device)}
    cache = GraphCache()
    for bucket in (224, 384, 512):  # capture, clear, capture again: each time into a fresh pool
        out = cache.run(GraphKey(bucket, 2, torch.float32, device, 0, 1), build, values, 2)
        torch.testing.assert_close(out["y"], torch.full((2, 5), 3.0, device=device))
        cache.clear()
    assert cache.stats()["captures"] == 3 and len(kept) >= 3


@cuda
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


@cuda
def test_compile_head_gives_the_plain_chains_allocations() -> None:
    """compile="head" leaves the backbone plain, so the features are the plain chain's bits and only the head's
    float32 rounding could move a token: the allocations must be the plain pipeline's (issue 22: >= 99%)."""
    from arrcoc.tools.bench_graphs import _world_images

    config = arrcoc.PipelineConfig.from_name("tiny", encoder_dtype="bfloat16")
    plain = arrcoc.Pipeline(config, device="cuda")
    head = arrcoc.Pipeline(config, device="cuda", compile="head")
    images = _world_images(224, range(900_000, 900_128)).cuda()
    same = []
    for start in range(0, 128, 64):
        a, b = plain(images[start : start + 64], budget=49), head(images[start : start + 64], budget=49)
        assert not head._eager_only and b.mask.sum().item() == 64 * 49
        same.append((a.allocation == b.allocation).flatten(1).all(1).cpu())
    assert torch.cat(same).sum().item() >= 127  # 99.2% of 128 scenes


@cuda
@pytest.mark.parametrize("size", [224, 384])
def test_bf16_graphed_equals_eager(size: int) -> None:
    """The bf16 encoder: graphs replay the same kernels, so integer outputs are exact, floats within bf16 tolerance."""
    config = arrcoc.PipelineConfig.from_name("tiny", encoder_dtype="bfloat16")
    graphed = arrcoc.Pipeline(config, device="cuda", cuda_graphs=True)
    eager = arrcoc.Pipeline(config, device="cuda", cuda_graphs=False)
    g = torch.Generator().manual_seed(size + 1)
    images = _images(64, size, seed=size + 1)
    for start in range(0, 64, 8):
        batch = images[start : start + 8]
        budget = torch.randint(1, 197, (len(batch),), generator=g).tolist()  # up to the 14x14 patches of 224px
        query = None if start % 16 == 0 else torch.randn(3, graphed.width, generator=g).cuda()
        a = graphed(batch, query=query, budget=budget, budget_policy="cap")
        b = eager(batch, query=query, budget=budget, budget_policy="cap")
        assert a.tokens.dtype == b.tokens.dtype
        assert torch.equal(a.allocation, b.allocation) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.tokens.float(), b.tokens.float(), rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=1.6e-2, atol=1e-4)


@cuda
def test_zero_copy_results_are_views_until_the_entry_replays(pipes) -> None:
    graphed, eager = pipes
    first, second, other = _images(2, 224, seed=20), _images(2, 224, seed=21), _images(2, 384, seed=22)
    zero = graphed(first, budget=30, copy=False)
    assert (
        zero.tokens.data_ptr()
        == graphed.graph_cache.get(graphed._graph_key(224, 2, 64, 1), None).outputs.views["tokens"].data_ptr()
    )
    graphed(other, budget=30)  # another entry (384px) shares the pool but never writes this entry's buffers
    _assert_same(zero, eager(first, budget=30))
    owned = graphed(second, budget=30)  # the same entry: the views now hold the second call's data
    with pytest.raises(StaleOutputError, match="overwritten"):
        zero.tokens  # noqa: B018 (the read is the test)
    _assert_same(owned, eager(second, budget=30))


@cuda
def test_per_stage_graphs_equal_one_graph(pipes) -> None:
    graphed, _ = pipes
    key = graphed._graph_key(224, 2, 64, 1)
    stages, inputs, outputs = graphed._build(key)
    with torch.inference_mode():
        one = GraphChain(stages, inputs, torch.cuda.graph_pool_handle(), outputs=outputs)
        many = GraphChain(stages, inputs, torch.cuda.graph_pool_handle(), outputs=outputs, per_stage=True)
        values = {
            "pixels": torch.rand(2, 3, 224, 224, device="cuda"),
            "valid": torch.ones(2, 1, 224, 224, device="cuda"),
            "query": torch.randn(2, 1, graphed.width, device="cuda"),
            "query_mask": torch.ones(2, 1, dtype=torch.bool, device="cuda"),
            "budget": torch.tensor([5, 60], device="cuda"),
        }
        a, b = one.run(values, 2), many.run(values, 2)
    assert [n for n, _ in many.graphs] == ["encode", "score", "balance", "allocate", "compress", "pack"]
    assert torch.equal(a["allocation"], b["allocation"]) and torch.equal(a["tokens"], b["tokens"])


@cuda
@pytest.mark.parametrize("size", [224, 512])
def test_side_stream_branches_equal_one_stream(pipes, size: int) -> None:
    """The independent branches (the backbone beside the layout and allocation bounds, the scorers beside each
    other and the region similarity): the same results as on one stream, graphed and eager, with budgets and
    queries changing; and the forked capture syncs no more than before."""
    graphed, eager = pipes
    config = graphed.config
    one_stream = arrcoc.Pipeline(config, device="cuda", concurrent=False)
    eager_one_stream = arrcoc.Pipeline(config, device="cuda", cuda_graphs=False, concurrent=False)
    g = torch.Generator().manual_seed(size + 7)
    images = _images(48, size, seed=size + 7)
    with torch.inference_mode():
        graphed.encoder(size)  # the encoder's weights move before the checked capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert graphed._chain(graphed._graph_key(size, 8, 512, 1)) is not None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for start in range(0, 48, 8):
        batch = images[start : start + 8]
        budget = torch.randint(1, 197, (len(batch),), generator=g).tolist()
        query = None if start % 16 == 0 else torch.randn(2, graphed.width, generator=g).cuda()
        cap = {"budget": budget, "budget_policy": "cap"}
        forked = graphed(batch, query=query, **cap)
        _assert_same(forked, one_stream(batch, query=query, **cap))
        _assert_same(eager(batch, query=query, **cap), eager_one_stream(batch, query=query, **cap))


@cuda
def test_calls_from_another_stream_see_their_own_inputs(pipes) -> None:
    graphed, eager = pipes
    images = _images(2, 224, seed=23)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = graphed(images, budget=25)
    side.synchronize()
    _assert_same(out, eager(images, budget=25))


# --- host-side logic on any device (the eager backend) ------------------------------------------------------
def _toy_stages() -> list:
    def double(s):
        return {"y": s["x"] * 2 + s["n"][:, None].float(), "flag": s["x"].sum(1) > 0}

    def report(s):
        return {"stats": {"mean": s["y"].mean(1), "count": s["n"] + 1}, "half": s["y"].to(torch.bfloat16) / 2}

    return [("double", double), ("report", report)]


def _toy_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 5, generator=g), "n": torch.randint(0, 9, (batch,), generator=g)}


def _toy_expected(values: dict[str, torch.Tensor]) -> dict:
    state = dict(values)
    for _, fn in _toy_stages():
        state.update(fn(state))
    return state


_TOY_OUT = ("y", "flag", "stats", "half")


def test_packed_tensors_one_kernel_for_a_full_write() -> None:
    specs = {
        "flag": ((3, 2), torch.bool),
        "x": ((3, 4, 5), torch.float32),
        "n": ((3,), torch.int64),
        "h": ((3, 7), torch.bfloat16),
        "empty": ((3, 0, 4), torch.float32),
    }
    packed = PackedTensors(specs, "cpu")
    assert packed.names[0] == "n" and packed.names[-1] == "flag"  # largest items first: every block aligned
    values = {
        "flag": torch.rand(3, 2) > 0.5,
        "x": torch.randn(3, 4, 5),
        "n": torch.arange(3) - 5,
        "h": torch.randn(3, 7).bfloat16(),
        "empty": torch.zeros(3, 0, 4),
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        packed.write(values)
    names = [e.name for e in prof.events()]
    assert names.count("aten::cat") == 1 and "aten::copy_" not in names
    for name, value in values.items():
        assert packed.views[name].is_contiguous() and torch.equal(packed.views[name], value)
    packed.write({"x": torch.ones(2, 4, 5), "n": torch.tensor([7, 8])}, rows=2)  # a partial write: rows 0-1 only
    assert torch.equal(packed.views["x"][:2], torch.ones(2, 4, 5)) and torch.equal(packed.views["x"][2], values["x"][2])
    assert packed.views["n"].tolist() == [7, 8, -3] and torch.equal(packed.views["h"], values["h"])
    copy = packed.unpack(packed.buffer.clone(), rows=2)
    assert copy["x"].shape == (2, 4, 5) and copy["x"].data_ptr() != packed.views["x"].data_ptr()


def test_chain_results_owned_or_zero_copy_with_a_generation_check() -> None:
    chain = GraphChain(_toy_stages(), _toy_inputs(4), None, outputs=_TOY_OUT, backend="eager")
    first, second = _toy_inputs(4, seed=1), _toy_inputs(4, seed=2)
    owned, zero = chain.run(first, 4), chain.run(first, 4, copy=False)
    expected = _toy_expected(first)
    for result in (owned, zero):
        assert isinstance(result, ChainResult) and set(result) == set(_TOY_OUT)
        torch.testing.assert_close(result["y"], expected["y"])
        assert (
            torch.equal(result["stats"]["count"], expected["stats"]["count"]) and result["half"].dtype == torch.bfloat16
        )
    assert zero["y"].data_ptr() == chain.outputs.views["y"].data_ptr()  # zero-copy: the entry's own buffer
    assert owned.owned and not zero.owned and zero.valid()
    chain.run(second, 4)
    assert not zero.valid()
    with pytest.raises(StaleOutputError, match="1 since"):
        zero["y"]
    torch.testing.assert_close(owned["y"], expected["y"])  # the owned copy is untouched
    partial = chain.run(_toy_inputs(3, seed=3), 3)
    assert partial["y"].shape == (3, 5) and partial["stats"]["mean"].shape == (3,)
    torch.testing.assert_close(partial["y"], _toy_expected(_toy_inputs(3, seed=3))["y"])


def test_chain_results_build_only_the_views_read() -> None:
    """Listing a result builds nothing; reading a key builds its views only (one as_strided per tensor plus one
    typed view of the copy per dtype), once; owned views are contiguous blocks of the copy."""
    chain = GraphChain(_toy_stages(), _toy_inputs(4), None, outputs=_TOY_OUT, backend="eager")
    assert chain.outputs.buffer.numel() % 16 == 0 and chain.outputs.body.numel() == chain.outputs.nbytes
    result = chain.run(_toy_inputs(3, seed=11), 3)

    def ops(fn) -> list[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sorted(e.name for e in prof.events() if e.cpu_parent is None)

    assert ops(lambda: (list(result), len(result), "stats" in result)) == []
    assert ops(lambda: result["stats"]) == ["aten::as_strided"] * 2 + ["aten::view"] * 2  # float32 and int64
    assert ops(lambda: result["stats"]) == []
    stats = result["stats"]
    assert list(stats) == ["mean", "count"] and stats["mean"].shape == (3,) and stats["count"].is_contiguous()
    expected = _toy_expected(_toy_inputs(3, seed=11))
    torch.testing.assert_close(stats["mean"], expected["stats"]["mean"])
    assert torch.equal(stats["count"], expected["stats"]["count"]) and torch.equal(result["flag"], expected["flag"])
    with pytest.raises(KeyError):
        result["missing"]  # noqa: B018
    assert result.get("missing") is None


def test_zero_copy_output_raises_on_stale_fields_only() -> None:
    @dataclasses.dataclass
    class Out:
        tokens: torch.Tensor
        names: list

    chain = GraphChain(_toy_stages(), _toy_inputs(2), None, outputs=_TOY_OUT, backend="eager")
    result = chain.run(_toy_inputs(2, seed=4), 2, copy=False)
    out = lazy_output(
        Out,
        {"names": ["a", "b"]},
        lambda name: result.get_unchecked("y"),
        ["tokens"],
        check=result.check,
        checked=["tokens"],
    )
    assert isinstance(out, Out) and type(out).__name__ == "ZeroCopyOut"
    assert torch.equal(out.tokens, result["y"])
    chain.run(_toy_inputs(2, seed=5), 2)
    assert out.names == ["a", "b"]  # not a graph buffer: still readable
    with pytest.raises(StaleOutputError) as info:
        out.tokens  # noqa: B018
    assert isinstance(info.value, arrcoc.ArrcocError)


def _toy_key(bucket: int, batch: int = 2) -> GraphKey:
    return GraphKey(bucket, batch, torch.float32, torch.device("cpu"), 0, 1)


def _toy_build(batch: int = 2):
    return lambda: (_toy_stages(), _toy_inputs(batch), _TOY_OUT)


def test_cache_keys_hits_and_lru_eviction() -> None:
    cache = GraphCache(max_entries=2, backend="eager")
    a, b, c = _toy_key(224), _toy_key(384), _toy_key(512)
    first = cache.get(a, _toy_build())
    assert cache.get(a, _toy_build()) is first
    cache.get(b, _toy_build())
    cache.get(a, _toy_build())  # a is now the most recently used
    cache.get(c, _toy_build())
    assert a in cache and c in cache and b not in cache
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["captures"], stats["evictions"], stats["entries"]) == (2, 3, 3, 1, 2)
    assert stats["bytes"] == sum(v["bytes"] for v in stats["per_entry"].values()) > 0
    bounded = GraphCache(max_entries=8, max_bytes=1, backend="eager")  # a byte bound keeps only the newest
    bounded.get(a, _toy_build())
    bounded.get(b, _toy_build())
    assert len(bounded) == 1 and b in bounded


def test_the_capture_lock_is_held_for_captures_only() -> None:
    """compress-dataset's decode thread takes this lock: a capture must hold it, a replay must not wait for it."""

    class Recording:
        depth = entries = 0

        def __enter__(self) -> None:
            self.depth += 1
            self.entries += 1

        def __exit__(self, *_: object) -> None:
            self.depth -= 1

    cache = GraphCache(max_entries=8, backend="eager")
    cache.capture_lock = lock = Recording()
    held = []
    real = cache.chain_factory

    def factory(*args, **kwargs):
        held.append(lock.depth)
        return real(*args, **kwargs)

    cache.chain_factory = factory
    cache.get(_toy_key(224), _toy_build())
    cache.run(_toy_key(224), _toy_build(), _toy_inputs(2), 2)  # a hit: replayed without the lock
    cache.run(_toy_key(384), _toy_build(), _toy_inputs(2), 2)  # a miss: captured under it
    assert held == [1, 1] and lock.entries == 2 and lock.depth == 0


def test_out_of_memory_during_capture_evicts_then_retries_once() -> None:
    cache = GraphCache(max_entries=8, backend="eager")
    for bucket in (224, 384, 512, 768):
        cache.get(_toy_key(bucket), _toy_build())
    real, failures = cache.chain_factory, [1]

    def flaky(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise torch.cuda.OutOfMemoryError("injected: out of memory")
        return real(*args, **kwargs)

    cache.chain_factory = flaky
    cache.get(_toy_key(1024), _toy_build())  # fails once, evicts the older half, captures
    assert _toy_key(1024) in cache and _toy_key(224) not in cache and _toy_key(384) not in cache
    assert _toy_key(768) in cache and cache.stats()["oom_retries"] == 1
    failures[0] = 2
    with pytest.raises(CaptureMemoryError, match="retried once") as info:
        cache.get(_toy_key(100), _toy_build())
    assert isinstance(info.value, arrcoc.ArrcocError) and _toy_key(100) not in cache
    cache.chain_factory = real  # the cache is still usable
    result = cache.run(_toy_key(100), _toy_build(), _toy_inputs(2, seed=6), 2)
    torch.testing.assert_close(result["y"], _toy_expected(_toy_inputs(2, seed=6))["y"])


def test_a_failed_call_never_returns_half_written_buffers() -> None:
    cache = GraphCache(backend="eager")
    key, good = _toy_key(224), _toy_inputs(2, seed=7)
    zero = cache.run(key, _toy_build(), good, 2, copy=False)
    chain = cache.get(key, _toy_build())
    replay = chain.replay

    def broken() -> None:
        raise RuntimeError("injected: replay failed")

    chain.replay = broken
    with pytest.raises(RuntimeError, match="injected"):
        cache.run(key, _toy_build(), _toy_inputs(2, seed=8), 2)  # inputs written, nothing replayed
    chain.replay = replay
    after = cache.run(key, _toy_build(), _toy_inputs(2, seed=9), 2)
    torch.testing.assert_close(after["y"], _toy_expected(_toy_inputs(2, seed=9))["y"])
    assert not zero.valid()  # any later call on the entry makes an earlier zero-copy result unreadable


def test_threads_get_their_own_results_on_any_device() -> None:
    cache = GraphCache(backend="eager")
    jobs = [_toy_inputs(2, seed=100 + i) for i in range(8)]
    expected = [_toy_expected(v)["y"] for v in jobs]
    wrong, barrier = [0] * 8, threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(40):
            result = cache.run(_toy_key(224), _toy_build(), jobs[i], 2)
            wrong[i] += not torch.allclose(result["y"], expected[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0] * 8
    assert len(cache) == 1


def test_pipeline_graph_path_on_cpu_equals_eager(tiny_config) -> None:
    """The pipeline's graph plumbing (keys, packing, query padding, zero-copy guard) without a GPU."""
    graphed = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"))
    eager = arrcoc.Pipeline(tiny_config, cuda_graphs=False)
    images = [torch.rand(3, 120, 224), torch.rand(3, 200, 90)]
    query = torch.randn(3, graphed.width)  # 3 tokens: padded to the entry's bucket of 4
    a, b = graphed(images, query=query, budget=[7, 40]), eager(images, query=query, budget=[7, 40])
    assert (
        torch.equal(a.allocation, b.allocation)
        and torch.equal(a.mask, b.mask)
        and torch.equal(a.positions, b.positions)
    )
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.scores["participatory"], b.scores["participatory"])
    # every image has a question (an embedding, no mask): the chain builds no query-free pick
    assert graphed.graph_cache.stats()["per_entry"].keys() == {"224px/b2/float32/T64/L4/asked"}
    zero = graphed(images, query=query, budget=[7, 40], copy=False)
    assert isinstance(zero, arrcoc.CompressionOutput) and torch.equal(zero.mask, b.mask)
    graphed([torch.rand(3, 50, 50), torch.rand(3, 60, 60)], query=torch.randn(4, graphed.width), budget=3)
    with pytest.raises(StaleOutputError):
        zero.allocation  # noqa: B018
    assert zero.names == a.names


def test_a_call_issues_one_input_kernel_one_replay_and_one_copy_out() -> None:
    """The host side of a call at a full batch bucket: one cat into the inputs, the replay, one clone out."""
    chain = GraphChain(_toy_stages(), _toy_inputs(4), None, outputs=_TOY_OUT, backend="eager")
    replays = []
    chain.replay = lambda: replays.append(1)  # what the GPU would run; here only the host side is counted
    values = _toy_inputs(4, seed=10)
    for copy, expected in ((True, ["aten::cat", "aten::clone"]), (False, ["aten::cat"])):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            chain.run(values, 4, copy=copy)
        kernels = [
            e.name
            for e in prof.events()
            if e.name in ("aten::cat", "aten::clone", "aten::copy_", "aten::fill_")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        ]
        assert kernels == expected
    assert len(replays) == 2


@pytest.mark.parametrize(
    "kwargs, match", [({"backend": "tpu"}, "backend must be one of"), ({"max_entries": 0}, "max_entries must be")]
)
def test_cache_rejects_bad_arguments_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(arrcoc.InvalidInputError, match=match):
        GraphCache(**kwargs)
