"""The reducer interface: arrcoc's reducer on a feature grid equals the pipeline's compression of it."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc.reducers import REDUCERS, ArrcocReducer, VisualInput, create_reducer
from arrcoc.stages.balance import pick_patches


def _visual(b: int = 2, gh: int = 8, gw: int = 8, d: int = 16, seed: int = 0) -> VisualInput:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(b, 3, gh * 4, gw * 4, generator=g)
    return VisualInput(features=torch.randn(b, gh, gw, d, generator=g), pixels=pixels)


@pytest.mark.parametrize("name", ["arrcoc", "arrcoc-propositional", "arrcoc-perspectival", "arrcoc-participatory"])
@pytest.mark.parametrize("budget", [1, 4, 7, 64])
def test_arrcoc_reducers_give_exactly_budget_tokens(name: str, budget: int) -> None:
    visual = _visual()
    out = create_reducer(name)(visual, budget)
    assert out.tokens.shape == (2, budget, 16)
    assert out.positions.shape == (2, budget, 4)
    assert (out.allocation.flatten(1).sum(1) == budget).all()
    if budget < 4:  # fewer tokens than the 2x2 regions: some regions are dropped
        assert (out.weights.sum(1) < 64).all()
    assert (out.weights > 0).all() and (out.weights.sum(1) <= 64).all()
    assert (out.positions[..., 2:] == 1).all() and (out.weights == 1).all()  # every token is one real patch
    for b in range(2):
        rows, cols = out.positions[b, :, 0], out.positions[b, :, 1]
        torch.testing.assert_close(out.tokens[b], visual.features[b, rows, cols])
        assert len(set(zip(rows.tolist(), cols.tolist()))) == budget  # no patch twice
    rows, cols = out.positions[..., 0], out.positions[..., 1]
    assert rows.min() >= 0 and rows.max() < 8 and cols.min() >= 0 and cols.max() < 8


def test_full_budget_keeps_every_patch() -> None:
    visual = _visual(b=1)
    out = create_reducer("arrcoc")(visual, 64)
    kept = out.tokens[0][out.weights[0] == 1]
    assert kept.shape[0] == 64
    patches = visual.features[0].reshape(64, -1)
    order = out.positions[0, :, 0] * 8 + out.positions[0, :, 1]
    torch.testing.assert_close(kept, patches[order])


def test_query_moves_tokens_towards_the_queried_patch() -> None:
    visual = _visual(b=1, d=32, seed=3)
    target = visual.features[0, 6, 1]  # a patch in region (1, 0)
    plain = create_reducer("arrcoc-participatory")(visual, 8)
    visual.query = target[None, None]
    queried = create_reducer("arrcoc-participatory")(visual, 8)
    assert queried.allocation[0, 1, 0] > plain.allocation[0, 1, 0]


@pytest.mark.parametrize("with_query", [False, True])
def test_matches_the_pipeline_on_its_own_features(tiny_pipe: arrcoc.Pipeline, with_query: bool) -> None:
    """Run on the encoder's own features, the reducer reproduces the pipeline's tokens exactly (with a query,
    which moves both the allocation and the patches each region shows)."""
    images = [torch.rand(3, 200, 150, generator=torch.Generator().manual_seed(1))]
    query = torch.randn(tiny_pipe.width, generator=torch.Generator().manual_seed(2)) if with_query else None
    out = tiny_pipe(images, query=query, budget=40)
    group = tiny_pipe.preprocessor(images)[0]
    features, _, _, patch_valid = tiny_pipe.encoder(group.bucket)(group.pixels, group.valid)
    visual = VisualInput(
        features=features,
        patch_valid=patch_valid,
        pixels=group.pixels,
        valid=group.valid,
        query=None if query is None else query[None, None],
    )
    reduced = ArrcocReducer(tiny_pipe.config)(visual, 40)
    assert torch.equal(
        reduced.allocation, out.allocation[:, : reduced.allocation.shape[1], : reduced.allocation.shape[2]]
    )
    torch.testing.assert_close(reduced.tokens, out.tokens[:, :40])
    assert torch.equal(reduced.positions, out.positions[:, :40])


@pytest.mark.parametrize("name", ["arrcoc-propositional", "arrcoc-perspectival"])
def test_ablations_without_the_participatory_scorer_read_no_query(name: str) -> None:
    reducer = create_reducer(name)
    assert reducer.config.query_detail == 0 and create_reducer("arrcoc").config.query_detail > 0
    visual = _visual(b=1, d=32, seed=3)
    plain = reducer(visual, 8)
    visual.query = visual.features[0, 6, 1][None, None]
    queried = reducer(visual, 8)
    assert torch.equal(plain.positions, queried.positions) and torch.equal(plain.allocation, queried.allocation)


@pytest.mark.parametrize("budget", [0, -1, 65, 2.5, True, "8"])
def test_bad_budget_is_a_budget_error(budget: object) -> None:
    with pytest.raises(arrcoc.BudgetError, match="budget"):
        create_reducer("arrcoc")(_visual(), budget)  # type: ignore[arg-type]


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(arrcoc.InvalidInputError, match="unknown reducer 'nope'"):
        create_reducer("nope")
    with pytest.raises(arrcoc.InvalidInputError, match="scorers"):
        ArrcocReducer(scorers=("salience",))
    assert {"arrcoc", "arrcoc-propositional", "arrcoc-perspectival", "arrcoc-participatory"} <= set(REDUCERS)


@pytest.mark.parametrize("name", ["arrcoc", "arrcoc-noquery", "divprune", "random"])
def test_a_budget_above_an_images_real_patches_is_refused_and_no_kept_patch_is_padding(name: str) -> None:
    from arrcoc.reducers import VisualInput, create_reducer

    features = torch.randn(2, 8, 8, 16)
    patch_valid = torch.ones(2, 8, 8)
    patch_valid[1, 5:] = 0  # image 1: 40 real patches, the rest letterbox padding
    reducer = create_reducer(name)
    visual = VisualInput(features, patch_valid=patch_valid)
    with pytest.raises(arrcoc.BudgetError, match="40 real patches of image 1"):
        reducer(visual, 41)
    for budget in (40, 17):
        kept = reducer(visual, budget).positions[1]  # (K, 4): every kept token's rows are image
        assert int(kept[:, 0].max()) < 5


def _picking(pick: str, **kw) -> ArrcocReducer:
    return ArrcocReducer(arrcoc.PipelineConfig(balance=arrcoc.BalanceConfig(pick=pick, **kw)), read_query=False)


@pytest.mark.parametrize(
    "kw",
    [
        {"pick": "novelty"},
        {"pick": "maxmin"},
        {"pick": "maxmin", "pick_salience": 0.5, "pick_colour": 0.5},
        {"pick": "maxmin", "pick_spatial": 0.5},
    ],
)
@pytest.mark.parametrize("budget", [1, 5, 16])
def test_query_free_picks_give_exact_budgets_independent_of_the_batch(kw: dict, budget: int) -> None:
    visual = _visual(b=3, gh=10, gw=9)
    out = _picking(**kw)(visual, budget)
    assert (out.allocation.flatten(1).sum(1) == budget).all() and out.tokens.shape == (3, budget, 16)
    for i in range(3):
        one = VisualInput(features=visual.features[i : i + 1], pixels=visual.pixels[i : i + 1])
        alone = _picking(**kw)(one, budget)
        assert torch.equal(alone.tokens, out.tokens[i : i + 1]) and torch.equal(
            alone.positions, out.positions[i : i + 1]
        )


def test_query_free_maxmin_pick_keeps_divprunes_patches() -> None:
    """Without colour the pick is DivPrune's set; the default's colour term then moves it (the test could fail)."""
    visual = _visual(b=2, gh=12, gw=12)
    ours, theirs = _picking("maxmin", pick_colour=0.0)(visual, 14), create_reducer("divprune")(visual, 14)
    for i in range(2):
        assert {tuple(p) for p in ours.positions[i, :, :2].tolist()} == {
            tuple(p) for p in theirs.positions[i, :, :2].tolist()
        }
    coloured = ArrcocReducer(read_query=False)(visual, 14)  # the shipped default: pick_colour 0.5
    assert any(not torch.equal(coloured.positions[i], ours.positions[i]) for i in range(2))


def test_the_grid_distance_spreads_the_pick_over_alike_patches() -> None:
    """Patches alike in features and colour (one object drawn twice, a plain field): with ``pick_spatial`` the
    greedy max-min keeps patches far apart on the grid; without it, the ties keep the first patches."""
    b, gh, gw = 1, 8, 8
    features = torch.ones(b, gh, gw, 16)
    valid, budget = torch.ones(b, gh, gw), torch.tensor([4])
    spread = pick_patches("maxmin", features, valid, budget, 4, spatial_share=0.5)
    plain = pick_patches("maxmin", features, valid, budget, 4)
    rows, cols = spread[0].nonzero().unbind(1)
    assert spread.sum() == plain.sum() == 4
    assert {(r, c) for r, c in zip(rows.tolist(), cols.tolist())} == {(0, 0), (0, 7), (7, 0), (7, 7)}  # the corners
    assert plain[0].nonzero()[:, 0].max() == 0  # the first row's patches: nothing tells the ties apart


def test_the_shipped_pick_is_maxmin_and_a_pick_changes_only_images_without_a_question() -> None:
    visual = _visual(b=2, gh=12, gw=12)
    shipped = create_reducer("arrcoc-noquery")(visual, 14)
    default = _picking("maxmin", pick_colour=0.5)(visual, 14)
    assert torch.equal(shipped.tokens, default.tokens) and torch.equal(shipped.relevance, default.relevance)
    assert not torch.equal(_picking("off")(visual, 14).positions, shipped.positions)
    query = torch.randn(1, 3, 16)
    asked = VisualInput(features=visual.features, pixels=visual.pixels, query=query)
    for pick in ("off", "novelty"):  # with a question the pick is not read
        config = arrcoc.PipelineConfig(balance=arrcoc.BalanceConfig(pick=pick, pick_salience=0.5))
        a, b = ArrcocReducer(config)(asked, 14), create_reducer("arrcoc")(asked, 14)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
