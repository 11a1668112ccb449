"""What a call returns: fields built on first read (the same values as building them at once), owned copies that
outlive later calls, zero-copy outputs whose every read checks staleness, and plain classes when pickled, copied
or moved. The graph path runs through the cache's eager backend, so all of it runs without a GPU."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

import arrcoc
from arrcoc.runtime.graphs import GraphCache, StaleOutputError
from arrcoc.stages.balance import BALANCE_KEYS

#: Fields that view a chain's buffers (checked on zero-copy outputs), and the per-image facts (never checked).
_RESULTS = ("scores", "relevance", "balance", "tokens", "positions", "mask", "weights", "allocation", "prefix")
_FACTS = ("region_grid", "patch_grid", "bucket", "scale", "source_size", "budget", "names", "region_size", "timings")


def _images(seed: int) -> list[torch.Tensor]:
    """Two images of the 64px bucket (small buckets keep these tests quick on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 40, 64, generator=g), torch.rand(3, 60, 50, generator=g)]  # 12 and 16 real patches


@pytest.fixture(scope="module")
def pipes(tiny_config: arrcoc.PipelineConfig) -> tuple[arrcoc.Pipeline, arrcoc.Pipeline]:
    config = tiny_config.replace(buckets=(64, 128))
    return (
        arrcoc.Pipeline(config, graph_cache=GraphCache(backend="eager")),
        arrcoc.Pipeline(config, cuda_graphs=False),
    )


def _same(a: object, b: object) -> bool:
    """Equal values: integers and flags exactly, floats to float32 rounding (a graph pads the query, so the
    float sums may run in another order)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _assert_same_output(a: arrcoc.ScoreOutput, b: arrcoc.ScoreOutput) -> None:
    for f in dataclasses.fields(a):
        assert _same(getattr(a, f.name), getattr(b, f.name)), f.name


def test_fields_are_built_on_first_read_with_the_values_of_the_eager_path(pipes) -> None:
    graphed, eager = pipes
    images, query = _images(0), torch.randn(3, graphed.width, generator=torch.Generator().manual_seed(1))
    out, reference = graphed(images, query=query, budget=[7, 12]), eager(images, query=query, budget=[7, 12])
    assert isinstance(out, arrcoc.CompressionOutput)
    assert not {"tokens", "balance", "scores", "region_grid"} & set(vars(out))  # nothing built yet
    assert out.tokens is out.tokens and "tokens" in vars(out)  # built once, then a plain attribute
    _assert_same_output(out, reference)
    assert list(out.balance) == list(BALANCE_KEYS) and list(out.scores) == list(arrcoc.config.SCORER_NAMES)
    assert out.bucket.tolist() == [64, 64] and out.budget.tolist() == [7, 12] and out.budget.device.type == "cpu"
    assert out.scale.dtype == torch.float32 and out.source_size.tolist() == [[40, 64], [60, 50]]
    scores, reference_scores = graphed.score(images), eager.score(images)
    assert type(scores).__mro__[1] is arrcoc.ScoreOutput and not hasattr(scores, "tokens")
    _assert_same_output(scores, reference_scores)


def test_several_buckets_in_one_call_equal_the_eager_path(pipes) -> None:
    graphed, eager = pipes
    g = torch.Generator().manual_seed(2)
    images = [
        torch.rand(3, 100, 120, generator=g),
        torch.rand(3, 50, 40, generator=g),
        torch.rand(3, 128, 90, generator=g),
    ]
    out, reference = graphed(images, budget=[5, 9, 30]), eager(images, budget=[5, 9, 30])
    assert out.bucket.tolist() == [128, 64, 128]
    _assert_same_output(out, reference)


def test_an_owned_output_read_first_after_later_calls_holds_its_own_call(pipes) -> None:
    graphed, eager = pipes
    first, second = _images(3), _images(4)
    out = graphed(first, budget=12)  # copy=True: nothing read before the entry replays twice more
    graphed(second, budget=11)
    graphed(second, budget=11)
    _assert_same_output(out, eager(first, budget=12))


@pytest.mark.parametrize("read_before", [False, True])
def test_a_zero_copy_output_raises_on_any_result_read_after_the_entry_replays(pipes, read_before: bool) -> None:
    graphed, eager = pipes
    first = _images(5)
    zero = graphed(first, budget=11, copy=False)
    if read_before:  # views built and cached before the next call are checked all the same
        _assert_same_output(zero, eager(first, budget=11))
    graphed(_images(6), budget=11, copy=False)  # the same entry: its buffers now hold this call
    for name in _RESULTS:
        with pytest.raises(StaleOutputError, match="overwritten"):
            getattr(zero, name)
    reference = eager(first, budget=11)
    for name in _FACTS:  # per-image facts are the output's own: still readable, still right
        assert _same(getattr(zero, name), getattr(reference, name)), name


def test_zero_copy_views_are_the_entrys_buffers_and_score_outputs_are_checked_too(pipes) -> None:
    graphed, _ = pipes
    images = _images(7)
    zero = graphed(images, budget=9, copy=False)
    chain = graphed.graph_cache.get(graphed._graph_key(64, 2, 64, 1), None)
    assert zero.tokens.data_ptr() == chain.outputs.views["tokens"].data_ptr()
    score = graphed.score(images, copy=False)
    balance = score.balance
    graphed.score(_images(8), copy=False)
    with pytest.raises(StaleOutputError):
        score.balance  # noqa: B018 (the read is the test)
    assert set(balance) == set(BALANCE_KEYS)  # a dict taken out before the call is a plain dict (documented)


def test_pickle_copy_replace_and_to_give_the_plain_class_with_every_field(pipes) -> None:
    graphed, eager = pipes
    images = _images(9)
    reference = eager(images, budget=12)
    for out in (graphed(images, budget=12), graphed(images, budget=12, copy=False)):
        for twin in (pickle.loads(pickle.dumps(out)), copy.copy(out), copy.deepcopy(out), out.to("cpu")):
            assert type(twin) is arrcoc.CompressionOutput
            _assert_same_output(twin, reference)
        replaced = dataclasses.replace(out, names=["a", "b"])
        assert replaced.names == ["a", "b"] and torch.equal(replaced.tokens, reference.tokens)
    stale = graphed(images, budget=12, copy=False)
    graphed(_images(10), budget=12, copy=False)
    with pytest.raises(StaleOutputError):
        pickle.dumps(stale)


def test_a_call_builds_no_result_tensor_until_one_is_read(pipes, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the replay stubbed and preprocessing done before, a graphed call issues one input cat, one copy-out,
    the budget fill and the no-query zeros, and byte views of its five inputs: no result view, no per-image tensor
    (the budget check reads the CPU content sizes)."""
    graphed, _ = pipes
    images = _images(11)
    graphed(images, budget=10)
    chain = graphed.graph_cache.get(graphed._graph_key(64, 2, 64, 1), None)
    monkeypatch.setattr(chain, "replay", lambda: setattr(chain, "generation", chain.generation + 1))
    fresh = iter([graphed.preprocessor(images) for _ in range(2)])  # new pixel tensors per call, as preprocessing makes
    monkeypatch.setattr(graphed, "preprocessor", lambda *_, **__: next(fresh))
    graphed(images, budget=10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = graphed(images, budget=10)
    ops = sorted(e.name for e in prof.events() if e.cpu_parent is None)
    views = ops.count("aten::view")
    assert [op for op in ops if op != "aten::view"] == [
        "aten::cat",
        "aten::clone",
        "aten::full",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::zeros",
        "aten::zeros",
    ]
    assert views == 2 * 5  # pixels, valid, query, query_mask, budget: each viewed as bytes
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.tokens  # noqa: B018
    assert sorted(e.name for e in prof.events() if e.cpu_parent is None) == ["aten::as_strided", "aten::view"]


def test_balance_is_one_dict_of_batched_tensors_and_image_gives_one_images_values(pipes) -> None:
    _, eager = pipes
    out = eager(_images(12), budget=[5, 9])
    assert all(v.shape[0] == 2 for v in out.balance.values())  # the batch is the first dimension of every value
    second = out.image(1)["balance"]
    assert second["exploit"] == pytest.approx(float(out.balance["exploit"][1]))
    assert second["weights"] == pytest.approx(out.balance["weights"][1].tolist())
