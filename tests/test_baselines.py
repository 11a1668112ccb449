"""Every registered reducer (arrcoc's and the baselines) against the reducer contract, and each baseline's
defining property from its paper."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc.reducers import ReducedTokens, VisualInput, create_reducer, list_reducers

GH, GW, D = 6, 8, 16
N = GH * GW
BASELINES = {"uniform", "random", "visionzip", "divprune", "tome", "fastv"}
SELECTION = {"random", "divprune", "fastv"}  # keep patches as they are
MERGING = {"uniform", "tome"}  # every patch pooled into exactly one token
NAMES = list_reducers()


def _visual(b: int = 2, seed: int = 0, gh: int = GH, gw: int = GW) -> VisualInput:
    """Every optional field filled, so any reducer can run."""
    g = torch.Generator().manual_seed(seed)
    return VisualInput(
        features=torch.randn(b, gh, gw, D, generator=g),
        pixels=torch.rand(b, 3, gh * 4, gw * 4, generator=g),
        cls_attention=torch.rand(b, gh, gw, generator=g).softmax(-1),
        text_attention=torch.rand(b, gh, gw, generator=g),
    )


def _take(visual: VisualInput, index: int) -> VisualInput:
    """Image ``index`` of a batch as a batch of one."""
    return VisualInput(
        **{
            f.name: None if getattr(visual, f.name) is None else getattr(visual, f.name)[index : index + 1]
            for f in dataclasses.fields(visual)
        }
    )


def _covered(out: ReducedTokens, b: int) -> torch.Tensor:
    """``(b, GH, GW)`` how many token boxes cover each patch."""
    rows, cols = torch.arange(GH)[:, None], torch.arange(GW)[None]
    r, c, h, w = (out.positions[..., i][..., None, None] for i in range(4))  # (b, K, 1, 1)
    inside = (rows >= r) & (rows < r + h) & (cols >= c) & (cols < c + w)  # (b, K, GH, GW)
    return inside.sum(1)


def test_registry_holds_every_baseline() -> None:
    assert BASELINES <= set(NAMES)
    fields = {f.name for f in dataclasses.fields(VisualInput)}
    for name in NAMES:
        needs = create_reducer(name).needs
        assert isinstance(needs, frozenset) and needs <= fields, name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1, 5, 17, N])
def test_exactly_budget_tokens_with_boxes_and_weights(name: str, budget: int) -> None:
    visual = _visual()
    out = create_reducer(name)(visual, budget)
    assert out.tokens.shape == (2, budget, D) and out.tokens.dtype == torch.float32
    assert out.positions.shape == (2, budget, 4) and out.positions.dtype == torch.int64
    assert out.weights.shape == (2, budget)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.weights).all()
    row, col, h, w = out.positions.unbind(-1)
    assert (row >= 0).all() and (col >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (row + h <= GH).all() and (col + w <= GW).all()
    # A token pools at least one patch, never more patches than its box holds, and no patch twice.
    assert (out.weights >= 1).all() and (out.weights <= h * w).all()
    assert (out.weights.sum(1) <= N).all() and (out.weights.sum(1) >= budget).all()


@pytest.mark.parametrize("name", sorted(SELECTION))
@pytest.mark.parametrize("budget", [1, 9, N])
def test_selection_methods_keep_distinct_patches_unchanged(name: str, budget: int) -> None:
    visual = _visual()
    out = create_reducer(name)(visual, budget)
    assert (out.weights == 1).all() and (out.positions[..., 2:] == 1).all()
    index = out.positions[..., 0] * GW + out.positions[..., 1]  # (2, K)
    assert (index.diff(dim=1) > 0).all()  # distinct, in reading order
    patches = visual.features.flatten(1, 2).gather(1, index[..., None].expand(-1, -1, D))
    assert torch.equal(out.tokens, patches)


@pytest.mark.parametrize("name", sorted(MERGING | {"visionzip"}))
@pytest.mark.parametrize("budget", [7, 13, 30, N - 1])
def test_merging_methods_pool_every_patch_once_and_conserve_the_mean(name: str, budget: int) -> None:
    visual = _visual()
    out = create_reducer(name)(visual, budget)
    torch.testing.assert_close(out.weights.sum(1), torch.full((2,), float(N)))
    mean = (out.tokens * out.weights[..., None]).sum(1) / N
    torch.testing.assert_close(mean, visual.features.mean((1, 2)), rtol=1e-5, atol=1e-5)
    assert (_covered(out, 2) >= 1).all()  # every patch lies in some token's box


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_keeps_every_patch(name: str) -> None:
    visual = _visual()
    out = create_reducer(name)(visual, N)
    assert (out.weights == 1).all()
    index = out.positions[..., 0] * GW + out.positions[..., 1]
    assert torch.equal(index.sort(1).values, torch.arange(N).expand(2, -1))
    patches = visual.features.flatten(1, 2).gather(1, index[..., None].expand(-1, -1, D))
    torch.testing.assert_close(out.tokens, patches)
    if name in BASELINES:  # the baselines all read in raster order: at full budget they are one method
        assert torch.equal(out.tokens, visual.features.flatten(1, 2))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_independent_of_batch_neighbours(name: str) -> None:
    reducer = create_reducer(name)
    batch = _visual(b=3, seed=1)
    first, again = reducer(batch, 11), reducer(batch, 11)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.positions, again.positions)
    for i in (0, 2):
        alone = reducer(_take(batch, i), 11)
        torch.testing.assert_close(alone.tokens[0], first.tokens[i], rtol=1e-5, atol=1e-6)
        assert torch.equal(alone.positions[0], first.positions[i])
        torch.testing.assert_close(alone.weights[0], first.weights[i])


@pytest.mark.parametrize("name", NAMES)
def test_keeps_the_feature_dtype(name: str) -> None:
    visual = _visual()
    visual.features = visual.features.bfloat16()
    out = create_reducer(name)(visual, 9)
    assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (2, 9, D)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [0, -3, N + 1, 2.0, True, "4", None])
def test_bad_budgets_are_budget_errors(name: str, budget: object) -> None:
    with pytest.raises(arrcoc.BudgetError, match="budget"):
        create_reducer(name)(_visual(), budget)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "field"), [("visionzip", "cls_attention"), ("fastv", "text_attention")])
def test_a_missing_or_misshapen_attention_map_is_named(name: str, field: str) -> None:
    reducer = create_reducer(name)
    assert field in reducer.needs
    visual = _visual()
    setattr(visual, field, None)
    with pytest.raises(arrcoc.InvalidInputError, match=f"{name} needs visual.{field}.*got None"):
        reducer(visual, 8)
    setattr(visual, field, torch.rand(2, GH * GW))
    with pytest.raises(arrcoc.InvalidInputError, match=rf"visual.{field} must have shape \(B, gh, gw\) = \(2, 6, 8\)"):
        reducer(visual, 8)


def test_features_must_be_a_grid() -> None:
    visual = _visual()
    visual.features = visual.features.flatten(1, 2)
    with pytest.raises(arrcoc.InvalidInputError, match=r"\(B, gh, gw, D\); got shape \(2, 48, 16\)"):
        create_reducer("uniform")(visual, 4)


@pytest.mark.parametrize("name", sorted(SELECTION | {"visionzip"}))
def test_selection_ranks_padding_last(name: str) -> None:
    visual = _visual()
    visual.patch_valid = torch.ones(2, GH, GW)
    visual.patch_valid[:, :, 5:] = 0  # the right three columns are letterbox padding
    visual.cls_attention[:, :, 5:] = 10.0  # even when the maps prefer them
    visual.text_attention[:, :, 5:] = 10.0
    out = create_reducer(name)(visual, 24)  # of 30 image patches
    single = out.weights == 1
    assert single.sum() >= 2 * 21 and (out.positions[..., 1][single] < 5).all()  # kept patches: image only
    if name in SELECTION:
        assert single.all()


def test_uniform_tiles_the_grid_and_equals_average_pooling_when_it_divides() -> None:
    visual = _visual()
    for budget in (1, 5, 7, 12, 29, N):
        out = create_reducer("uniform")(visual, budget)
        assert (_covered(out, 2) == 1).all(), budget  # cells tile the grid: no overlap, no gap
        assert torch.equal(out.weights, (out.positions[..., 2] * out.positions[..., 3]).float())
        assert out.weights.max() - out.weights.min() <= max(2.0, 0.75 * out.weights.max())  # near-equal cells
    out = create_reducer("uniform")(visual, 12)  # 3 x 4 cells of 2 x 2 patches
    pooled = F.avg_pool2d(visual.features.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(out.tokens, pooled)
    assert torch.equal(out.positions[0, 5], torch.tensor([2, 2, 2, 2]))


def test_random_differs_by_seed_and_image_and_is_spread_evenly() -> None:
    visual = _visual(b=1)

    def picks(seed: int, v: VisualInput) -> torch.Tensor:
        out = create_reducer("random", seed=seed)(v, 12)
        return out.positions[..., 0] * GW + out.positions[..., 1]

    assert not torch.equal(picks(0, visual), picks(1, visual))
    assert not torch.equal(picks(0, visual), picks(0, _visual(b=1, seed=5)))
    # Over many images every patch is kept about K/N of the time (expected 50 of 200; binomial sd ~6).
    many = _visual(b=200, seed=2)
    counts = torch.bincount(picks(0, many).flatten(), minlength=N)
    assert counts.sum() == 200 * 12 and counts.min() >= 25 and counts.max() <= 80
    with pytest.raises(arrcoc.InvalidInputError, match="seed must be an int"):
        create_reducer("random", seed="x")


def test_divprune_picks_one_token_per_cluster() -> None:
    """Four tight clusters of features: max-min diversity takes one patch from each before any repeat."""
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(D)[:4] * 5
    cluster = torch.randint(0, 4, (1, GH, GW), generator=g)
    features = centres[cluster] + 0.01 * torch.randn(1, GH, GW, D, generator=g)
    out = create_reducer("divprune")(VisualInput(features=features), 4)
    index = out.positions[0, :, 0] * GW + out.positions[0, :, 1]
    assert sorted(cluster.flatten()[index].tolist()) == [0, 1, 2, 3]
    # And on random features its picks are more spread out (larger min distance) than random selection's.
    visual = _visual(b=8, seed=4)

    def min_distance(out: ReducedTokens) -> torch.Tensor:
        unit = F.normalize(out.tokens, dim=-1)
        distance = 1 - unit @ unit.transpose(1, 2) + 3 * torch.eye(out.tokens.shape[1])
        return distance.flatten(1).amin(1)

    spread = min_distance(create_reducer("divprune")(visual, 10))
    assert (spread > min_distance(create_reducer("random")(visual, 10))).all()
    assert (spread > min_distance(create_reducer("fastv")(visual, 10))).all()


def test_tome_merges_duplicates_first_and_keeps_the_odd_one_out() -> None:
    features = torch.ones(1, GH, GW, D)
    features[0, 2, 3] = -1.0  # one patch unlike every other
    out = create_reducer("tome")(VisualInput(features=features), 2)
    odd = out.weights[0] == 1
    assert odd.sum() == 1 and torch.equal(out.positions[0][odd][0], torch.tensor([2, 3, 1, 1]))
    torch.testing.assert_close(out.tokens[0][odd][0], torch.full((D,), -1.0))
    assert out.weights[0].max() == N - 1


def test_visionzip_keeps_the_top_attention_patches_and_merges_the_rest() -> None:
    visual = _visual()
    budget = 32  # 27 dominant + 5 contextual
    out = create_reducer("visionzip")(visual, budget)
    contextual = budget * 10 // 64
    top = visual.cls_attention.flatten(1).topk(budget - contextual, dim=1).indices.sort(1).values
    single = out.weights == 1
    for i in range(2):
        index = out.positions[i][single[i]][:, 0] * GW + out.positions[i][single[i]][:, 1]
        assert set(top[i].tolist()) <= set(index.tolist())
        torch.testing.assert_close(out.tokens[i][single[i]], visual.features[i].flatten(0, 1)[index])
    assert ((~single).sum(1) >= 1).all()  # some context was merged
    assert (out.weights.sum(1) == N).all()


def test_fastv_keeps_the_most_attended_patches() -> None:
    visual = _visual()
    out = create_reducer("fastv")(visual, 10)
    top = visual.text_attention.flatten(1).topk(10, dim=1).indices.sort(1).values
    assert torch.equal(out.positions[..., 0] * GW + out.positions[..., 1], top)
