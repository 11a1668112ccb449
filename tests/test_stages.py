"""The stages one by one: the encoder's patch projection, texture, regions, scorers, balance, compression."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from arrcoc.config import BalanceConfig, PipelineConfig
from arrcoc.stages import balance
from arrcoc.stages.balance import BALANCE_KEYS, Balance, novelty, pick_patches
from arrcoc.stages.compression import Compressor, compress, query_priority
from arrcoc.stages.encoders import PatchProjection
from arrcoc.stages.head import RelevanceHead
from arrcoc.stages.regions import (
    capacity_of,
    normalize_per_image,
    region_bounds,
    region_grid,
    to_patches,
    to_regions,
)
from arrcoc.stages.scorers import SCORERS, create_scorer, query_coupling
from arrcoc.stages.texture import TEXTURE_CHANNELS, patch_mean, rgb_to_lab, texture_features


def _inputs(b: int = 2, gh: int = 6, gw: int = 7, d: int = 8, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, gh, gw, d, generator=g)
    texture = torch.cat((torch.rand(b, gh, gw, 5, generator=g), torch.zeros(b, gh, gw, 1)), -1)  # nothing flat
    valid = torch.ones(b, gh, gw)
    valid[-1, :, 4:] = 0  # the last image is letterboxed on the right: from patch column 4 on
    query = torch.randn(b, 3, d, generator=g)
    mask = torch.tensor([[True, True, False]] * b)
    return [t.to(device) for t in (features, texture, valid, query, mask)]


def test_patch_projection_is_the_patch_convolution_as_a_matmul() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, img_size=(64, 96)
    ).eval()
    conv = model.patch_embed.proj
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    before = model.state_dict()
    with torch.no_grad():
        expected = model.forward_features(pixels)
        assert PatchProjection.fits(conv)
        model.patch_embed.proj = PatchProjection(conv)
        got = model.forward_features(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    after = model.state_dict()  # same names, same storage: saving and loading are unchanged
    assert after.keys() == before.keys() and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert not PatchProjection.fits(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    )  # overlapping windows stay convolutions


def test_encoder_uses_the_patch_projection(tiny_pipe) -> None:
    assert isinstance(tiny_pipe.encoder(224).model.patch_embed.proj, PatchProjection)


def test_patch_mean_is_average_pooling() -> None:
    values = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(patch_mean(values, (16, 8)), F.avg_pool2d(values, (16, 8)), rtol=1e-6, atol=1e-6)


def test_lab_of_known_colours() -> None:
    white = rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(white, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        red, torch.tensor([0.5324, 0.8009, 0.6720]), atol=2e-3, rtol=0
    )  # CIE L*a*b* of sRGB red / 100


def test_texture_sees_edges_not_padding_border() -> None:
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[..., :, 20:] = 1.0  # a vertical edge at x = 20, inside patch column 1 (16-px patches)
    valid = torch.zeros(1, 1, 64, 64)
    valid[..., :, :48] = 1  # image on the left 48 px; the border at 48 is padding, not an edge
    tex = texture_features(pixels, valid, (4, 4))
    edge = tex[0, :, :, 3]
    assert (edge[:, 1] > 0.05).all()
    assert edge[:, 2].abs().max() < 1e-6  # flat white, and the image/padding border is ignored
    assert (tex[0, :, 3] == 0).all()  # padding patches are zero


def test_to_regions_pads_and_orders() -> None:
    grid = torch.arange(6 * 7, dtype=torch.float).view(1, 6, 7, 1)
    regions = to_regions(grid, 4)
    assert regions.shape == (1, 2, 2, 16, 1)
    assert region_grid((6, 7), 4) == (2, 2)
    assert regions[0, 0, 1, :4, 0].tolist() == [4, 5, 6, 0]  # row 0, columns 4..6, then padding
    assert regions[0, 1, 0, 4, 0] == 5 * 7  # second row of the lower-left region is grid row 5


def test_normalize_is_per_image_and_ignores_invalid() -> None:
    score = torch.tensor([[1.0, 3.0, 100.0], [5.0, 5.0, 5.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    out = normalize_per_image(score, valid)
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_bounds_and_capacity() -> None:
    valid = torch.ones(1, 6, 7)
    valid[0, :, 4:] = 0  # the right column of regions is all padding: no token may go there
    low, high = region_bounds(valid, 4, 1, None)
    assert high.tolist() == [[[16, 0], [8, 0]]]
    assert low.tolist() == [[[1, 0], [1, 0]]]
    assert capacity_of((6, 7), 4, None) == 42 and capacity_of((6, 7), 4, 4) == 16


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_range_and_shape(name: str) -> None:
    features, texture, valid, query, mask = _inputs()
    score = create_scorer(name, 4)(features, texture, valid, query, mask)
    assert score.shape == (2, 2, 2) and score.dtype == torch.float32
    assert score.min() >= 0 and score.max() <= 1
    assert (score[-1, :, 1] == 0).all()  # a region of padding only scores 0


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_is_per_image(name: str) -> None:
    features, texture, valid, query, mask = _inputs(b=3)
    scorer = create_scorer(name, 4)
    together = scorer(features, texture, valid, query, mask)
    alone = scorer(features[1:2], texture[1:2], valid[1:2], query[1:2], mask[1:2])
    torch.testing.assert_close(together[1:2], alone)


def test_participatory_without_query_is_zero_and_ignores_padding() -> None:
    features, texture, valid, query, mask = _inputs()
    scorer = create_scorer("participatory", 4)
    none = scorer(features, texture, valid, query, torch.zeros_like(mask))
    assert (none == 0).all()
    padded = query.clone()
    padded[:, 2] = 1e6  # a huge padding token must not change anything
    torch.testing.assert_close(
        scorer(features, texture, valid, padded, mask), scorer(features, texture, valid, query, mask)
    )


def test_participatory_finds_the_patch_that_matches() -> None:
    features, texture, valid, _, _ = _inputs(b=1, gh=8, gw=8)
    query = features[:, 6, 1][:, None]  # the query is the feature of patch (6, 1), in region (1, 0)
    score = create_scorer("participatory", 4)(features, texture, valid, query, torch.ones(1, 1, dtype=torch.bool))
    assert score[0, 1, 0] == 1.0


def test_propositional_prefers_texture_over_flat() -> None:
    pixels = torch.full((1, 3, 128, 128), 0.5)
    pixels[..., 64:, 64:] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(1, 1, 128, 128)
    texture = texture_features(pixels, valid, (8, 8))
    features = torch.zeros(1, 8, 8, 4)
    score = create_scorer("propositional", 4)(
        features, texture, valid[:, 0, ::16, ::16], features[:, :1, 0], torch.zeros(1, 1, dtype=torch.bool)
    )
    assert score[0, 1, 1] == 1.0 and score[0, 0, 0] == 0.0


def test_balance_reports_every_tension_per_image() -> None:
    features, texture, valid, query, mask = _inputs(b=2)
    scores = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    mask[1] = False  # the second image has no query
    relevance, report = Balance(BalanceConfig(), 4)(scores, features, valid, mask)
    assert set(report) == set(BALANCE_KEYS)
    torch.testing.assert_close(relevance.flatten(1).sum(1), torch.ones(2))
    assert (relevance[1, :, 1] == 0).all()  # padding regions of image 1
    assert report["weights"][1, 2] == 0 and report["weights"][0, 2] > 0
    assert report["has_query"].tolist() == [True, False]
    for key in ("agreement", "exploit", "temperature", "evenness", "diversify", "particularize"):
        assert report[key].shape == (2,)


def test_balance_with_its_similarity_given_equals_balance_alone() -> None:
    """The pipeline computes the region similarity beside the scorers and passes it in."""
    features, _, valid, _, mask = _inputs(b=2)
    scores = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    balance = Balance(BalanceConfig(diversify=0.8), 4)
    similarity = balance.similarity(features, valid)
    assert similarity.shape == (2, 4, 4)
    torch.testing.assert_close(similarity.diagonal(dim1=1, dim2=2)[0], torch.ones(4))  # each region with itself
    alone, report = balance(scores, features, valid, mask)
    given, report_given = balance(scores, features, valid, mask, None, similarity)
    assert torch.equal(given, alone) and torch.equal(report_given["redundancy"], report["redundancy"])
    _, other = balance(scores, features, valid, mask, None, torch.zeros_like(similarity))
    assert not torch.equal(other["redundancy"], report["redundancy"])  # the given similarity is the one used


def test_balance_knobs_move_the_tensions() -> None:
    features, _, valid, _, mask = _inputs(b=1, gh=8, gw=8)
    valid = torch.ones_like(valid)
    scores = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    uniform, rep_u = Balance(BalanceConfig(particularize=0.0), 4)(scores, features, valid, mask)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 0.25))
    sharp, rep_s = Balance(BalanceConfig(exploit=1.0, particularize=1.0), 4)(scores, features, valid, mask)
    soft, rep_x = Balance(BalanceConfig(exploit=0.0, particularize=1.0), 4)(scores, features, valid, mask)
    assert sharp.max() > soft.max() and rep_s["evenness"] < rep_x["evenness"]
    assert rep_u["evenness"] > 0.999


def test_balance_exploits_more_the_scarcer_the_budget() -> None:
    features, _, valid, _, mask = _inputs(b=1, gh=8, gw=8)
    valid = torch.ones_like(valid)  # 64 patches: a budget of 8 is an eighth of them
    scores = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    balance = Balance(BalanceConfig(scarcity=0.2, particularize=1.0), 4)
    alone, rep_none = balance(scores, features, valid, mask)
    reports = {b: balance(scores, features, valid, mask, torch.tensor([b]))[1] for b in (2, 4, 8, 16)}
    torch.testing.assert_close(reports[8]["exploit"], rep_none["exploit"])  # an eighth of the patches: no move
    torch.testing.assert_close(reports[4]["exploit"] - reports[8]["exploit"], torch.tensor([0.2]))  # one halving
    torch.testing.assert_close(reports[8]["exploit"] - reports[16]["exploit"], torch.tensor([0.2]))
    assert reports[2]["evenness"] < reports[8]["evenness"] < reports[16]["evenness"]
    still = Balance(BalanceConfig(scarcity=0.0, particularize=1.0), 4)
    torch.testing.assert_close(
        still(scores, features, valid, mask, torch.tensor([2]))[0], still(scores, features, valid, mask)[0]
    )


def _scene(b: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8x8 grid of one-hot features: background everywhere, thing A at (1, 1) and again at (6, 6), thing B at
    (1, 6); the last column is padding."""
    features = torch.zeros(b, 8, 8, 8)
    features[..., 0] = 1.0  # background
    for row, col, channel in ((1, 1, 1), (6, 6, 1), (1, 6, 2)):
        features[:, row, col] = F.one_hot(torch.tensor(channel), 8).float()
    valid = torch.ones(b, 8, 8)
    valid[:, :, 7] = 0
    features[:, :, 7] = torch.randn(b, 8, 8)  # padding: whatever it holds never counts
    return features, valid


def test_novelty_counts_each_distinct_thing_once() -> None:
    features, valid = _scene()
    new = novelty(features, valid)
    assert new.shape == (1, 8, 8)
    torch.testing.assert_close(new.sum(), torch.tensor(3.0))  # A, B and the background, each once
    assert new[0, 1, 6] == 1.0 and (new[0, 1, 1] + new[0, 6, 6]) == 1.0  # one copy of A is new, its twin is not
    assert (new[0, :, 7] == 0).all()  # padding
    assert (new > 0).sum() == 3 and new[0, 0, 0] == 1.0  # the background: its first patch alone


def test_novelty_is_per_image() -> None:
    features, valid = _scene(2)
    features[1] = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(novelty(features, valid)[:1], novelty(features[:1], valid[:1]))


def test_cover_follows_novelty_only_without_a_question() -> None:
    features, valid = _scene(2)
    mask = torch.tensor([[True], [False]])  # image 0 has a question, image 1 none
    scores = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    covered, report = Balance(BalanceConfig(cover=1.0), 4)(scores, features, valid, mask, torch.tensor([4, 4]))
    plain, _ = Balance(BalanceConfig(cover=0.0), 4)(scores, features, valid, mask, torch.tensor([4, 4]))
    assert report["coverage"].tolist() == [0.0, 1.0]
    assert torch.equal(covered[0], plain[0])  # with a question: unchanged
    # without: each region's share of the distinct things (A and B top left and top right, the background's one
    # new patch top left, A's twin bottom right is not new)
    torch.testing.assert_close(covered[1], torch.tensor([[2.0, 1.0], [0.0, 0.0]]) / 3)
    half, _ = Balance(BalanceConfig(cover=0.5), 4)(scores, features, valid, mask, torch.tensor([4, 4]))
    torch.testing.assert_close(half[1], (covered[1] + plain[1]) / 2)


def test_query_cover_hedges_an_image_with_a_question_only() -> None:
    features, valid = _scene(2)
    mask = torch.tensor([[True], [False]])
    scores = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(9))
    budget = torch.tensor([4, 4])
    hedged, report = Balance(BalanceConfig(query_cover=0.25), 4)(scores, features, valid, mask, budget)
    plain, _ = Balance(BalanceConfig(), 4)(scores, features, valid, mask, budget)
    assert report["coverage"].tolist() == [0.25, 1.0]
    novel = torch.tensor([[2.0, 1.0], [0.0, 0.0]]) / 3
    torch.testing.assert_close(hedged[0], 0.75 * plain[0] + 0.25 * novel)
    assert torch.equal(hedged[1], plain[1])  # without a question: the cover, unchanged
    # a cover with a question alone still computes novelty
    only, report = Balance(BalanceConfig(cover=0.0, query_cover=1.0), 4)(scores, features, valid, mask, budget)
    torch.testing.assert_close(only[0], novel)
    assert report["coverage"].tolist() == [1.0, 0.0]


def test_by_default_an_image_without_a_question_is_covered_by_novelty() -> None:
    features, valid = _scene(2)
    mask = torch.tensor([[True], [False]])
    scores = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(8))
    relevance, report = Balance(BalanceConfig(), 4)(scores, features, valid, mask, torch.tensor([4, 4]))
    assert report["coverage"].tolist() == [0.0, 1.0]
    torch.testing.assert_close(relevance[1], torch.tensor([[2.0, 1.0], [0.0, 0.0]]) / 3)
    plain, _ = Balance(BalanceConfig(cover=0.0), 4)(scores, features, valid, mask, torch.tensor([4, 4]))
    assert torch.equal(relevance[0], plain[0])


def test_compress_shows_each_regions_most_distinctive_patches() -> None:
    features, _, valid, _, _ = _inputs(b=2, gh=6, gw=7, d=5)
    allocation = torch.tensor([[[1, 4], [8, 2]], [[3, 0], [5, 1]]])
    tokens, positions, mask, weights = compress(features, valid, allocation, 20, 4)
    assert tokens.shape == (2, 20, 5) and positions.shape == (2, 20, 4) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [15, 9]
    assert (tokens[~mask] == 0).all() and (weights[~mask] == 0).all() and (weights[mask] == 1).all()
    regions = to_regions(features, 4).flatten(1, 2)  # (B, R, P, D)
    inside = to_regions(valid[..., None], 4)[..., 0].flatten(1, 2) > 0
    exists = to_regions(torch.ones_like(valid)[..., None], 4)[..., 0].flatten(1, 2) > 0
    assert (~inside.any(-1) & (allocation.flatten(1) > 0)).any()  # a padding-only region is asked for a token
    for b in range(2):
        start = 0
        for r, k in enumerate(allocation[b].flatten().tolist()):
            tok, pos = tokens[b, start : start + k], positions[b, start : start + k]
            # real patches at their own place, inside the region, the farthest from the region's image mean
            assert (pos[:, 2:] == 1).all()
            torch.testing.assert_close(tok, features[b, pos[:, 0], pos[:, 1]])
            assert ((pos[:, 0] // 4) * 2 + pos[:, 1] // 4 == r).all()
            if inside[b, r].any():
                patches = regions[b, r][inside[b, r]]
                distance = (patches - patches.mean(0)).square().sum(-1)
                torch.testing.assert_close(
                    (tok - patches.mean(0)).square().sum(-1), distance.sort(descending=True).values[:k]
                )
                assert valid[b, pos[:, 0], pos[:, 1]].gt(0).all()
            else:  # a padding-only region shows padding patches of the grid
                assert k <= exists[b, r].sum()
            start += k


def test_compress_full_detail_is_every_patch() -> None:
    features, _, valid, _, _ = _inputs(b=1, gh=8, gw=8, d=4)
    allocation = torch.full((1, 2, 2), 16)
    tokens, positions, mask, weights = compress(features, valid, allocation, 64, 4)
    assert (weights == 1).all() and (positions[..., 2:] == 1).all()
    rebuilt = torch.zeros_like(features)
    rebuilt[0, positions[0, :, 0], positions[0, :, 1]] = tokens[0]
    torch.testing.assert_close(rebuilt, features)


def test_compress_one_token_is_the_regions_most_distinctive_image_patch() -> None:
    features, _, valid, _, _ = _inputs(b=2, gh=6, gw=7, d=4)
    tokens, positions, mask, weights = compress(features, valid, torch.ones(2, 2, 2, dtype=torch.long), 4, 4)
    assert (positions[..., 2:] == 1).all() and (weights == 1).all()
    assert [(r // 4, c // 4) for r, c in positions[0, :, :2].tolist()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    regions = to_regions(features, 4).flatten(1, 2)[0]  # (R, P, D)
    inside = to_regions(valid[..., None], 4)[..., 0].flatten(1, 2)[0] > 0
    for r in range(4):
        if inside[r].any():
            patches = regions[r][inside[r]]
            best = (patches - patches.mean(0)).square().sum(-1).argmax()
            torch.testing.assert_close(tokens[0, r], patches[best])
    rows, cols = positions[1, :, 0], positions[1, :, 1]
    assert valid[1, rows, cols].tolist() == [1, 0, 1, 0]  # all-padding regions asked for a token show padding


def test_query_priority_scales_the_coupling_per_image_and_is_zero_without_a_query() -> None:
    features, _, valid, query, mask = _inputs(b=2, gh=6, gw=7, d=8)
    priority = query_priority(features, valid, query, mask)
    coupling = query_coupling(features, query, mask)
    for b in range(2):
        image = valid[b] > 0
        assert priority[b][image].min() == 0 and priority[b][image].max() == 1
        assert (priority[b][~image] == 0).all()  # letterbox padding takes no part
        # the same order as the coupling itself, on image patches
        assert torch.equal(priority[b][image].argsort(stable=True), coupling[b][image].argsort(stable=True))
    assert (query_priority(features, valid, query, torch.zeros_like(mask)) == 0).all()


def _region_with_a_distinct_and_a_coupled_patch() -> tuple[torch.Tensor, ...]:
    """One 4x4 region of grey patches: patch 5 the most distinct from the region's mean, patch 10 the one the
    query points at (close to the mean, so distinctness alone would never show it first)."""
    d = 6
    features = torch.zeros(1, 4, 4, d)
    features[..., 0] = 1.0  # the grey background
    features[0, 1, 1] = torch.tensor([1.0, 9.0, 0, 0, 0, 0])  # patch 5: far from the mean
    features[0, 2, 2] = torch.tensor([1.0, 0, 0, 0, 0, 0.6])  # patch 10: near the mean, along the query
    query = torch.tensor([[[0, 0, 0, 0, 0, 1.0]]])
    return features, torch.ones(1, 4, 4), query, torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize("query_detail, shown", [(0.0, (1, 1)), (1.0, (2, 2)), (0.5, (2, 2))])
def test_the_query_picks_the_patches_a_region_shows_by_query_detail(query_detail: float, shown) -> None:
    features, valid, query, mask = _region_with_a_distinct_and_a_coupled_patch()
    one = torch.ones(1, 1, 1, dtype=torch.long)
    _, positions, _, _ = Compressor(4, query_detail)(features, valid, one, 1, query, mask)
    assert tuple(positions[0, 0, :2].tolist()) == shown
    # the key by hand: (1 - w) * distinctness / its region maximum + w * scaled coupling
    distinct = (features - features.mean((1, 2), keepdim=True)).square().sum(-1)
    key = (1 - query_detail) * distinct / distinct.max() + query_detail * query_priority(features, valid, query, mask)
    assert divmod(int(key.flatten().argmax()), 4) == shown


def test_without_a_query_the_compressor_ranks_by_distinctness_alone() -> None:
    features, _, valid, query, mask = _inputs(b=2, gh=6, gw=7, d=8)
    allocation = torch.tensor([[[1, 4], [8, 2]], [[3, 0], [5, 1]]])
    plain = compress(features, valid, allocation, 20, 4)
    for got in (
        Compressor(4, 0.5)(features, valid, allocation, 20, query, torch.zeros_like(mask)),  # all padding
        Compressor(4, 0.5)(features, valid, allocation, 20),  # no query given
        Compressor(4, 0.0)(features, valid, allocation, 20, query, mask),
    ):  # the query ignored
        for a, b in zip(got, plain):
            assert torch.equal(a, b)
    with_query = Compressor(4, 0.5)(features, valid, allocation, 20, query, mask)
    assert not torch.equal(with_query[1], plain[1])  # these random patches: the query moves some picks
    assert torch.equal(with_query[2], plain[2])  # the same counts per region either way


def test_stages_run_on_meta_tensors() -> None:
    """Static-shape contract: on the meta device any host read or data-dependent shape raises."""
    features, texture, valid, query, mask = _inputs(device="meta")
    scores = torch.stack(
        [create_scorer(n, 4).to("meta")(features, texture, valid, query, mask) for n in sorted(SCORERS)], 1
    )
    relevance, report = Balance(BalanceConfig(), 4).to("meta")(scores, features, valid, mask)
    assert relevance.shape == (2, 2, 2) and relevance.device.type == "meta"
    covered, _ = Balance(BalanceConfig(cover=1.0), 4).to("meta")(scores, features, valid, mask)
    assert covered.shape == (2, 2, 2)
    tokens, positions, out_mask, weights = compress(
        features, valid, torch.ones(2, 2, 2, dtype=torch.long, device="meta"), 9, 4
    )
    assert tokens.shape == (2, 9, 8) and positions.shape == (2, 9, 4)
    tex = texture_features(torch.empty(2, 3, 96, 112, device="meta"), torch.empty(2, 1, 96, 112, device="meta"), (6, 7))
    assert tex.shape == (2, 6, 7, len(TEXTURE_CHANNELS))


def test_novelty_detail_picks_the_novel_patch_for_images_without_a_question_only() -> None:
    """A region given one token shows its most novel patch when ``novelty_detail`` is 1 and the image has no
    question; an image with a question in the same batch is compressed exactly as with ``novelty_detail`` 0."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 4, 4, 8, generator=g)
    valid = torch.ones(2, 4, 4)
    allocation = torch.ones(2, 1, 1, dtype=torch.long)  # one region of 16 patches, one token
    patch_novelty = torch.zeros(2, 4, 4)
    patch_novelty[:, 2, 3] = 1.0  # the one new thing in each image
    query = torch.randn(2, 1, 8, generator=g)
    mask = torch.tensor([[True], [False]])  # image 0 has a question, image 1 none
    plain = Compressor(4, 0.5, 0.0)(features, valid, allocation, 1, query, mask, patch_novelty)
    novel = Compressor(4, 0.5, 1.0)(features, valid, allocation, 1, query, mask, patch_novelty)
    assert novel[1][1, 0, :2].tolist() == [2, 3]  # the novel patch, not the most distinctive one
    assert plain[1][1, 0, :2].tolist() != [2, 3]  # distinctness alone picks another patch here
    for a, b in zip(plain, novel):
        assert torch.equal(a[0], b[0])  # the image with a question is untouched


def test_novelty_detail_is_checked() -> None:
    from arrcoc import InvalidInputError, PipelineConfig

    with pytest.raises(InvalidInputError, match="novelty_detail"):
        PipelineConfig(novelty_detail=1.5)
    assert PipelineConfig.from_json(PipelineConfig(novelty_detail=0.25).to_json()).novelty_detail == 0.25


def _pick_grid(b: int = 2, gh: int = 6, gw: int = 7, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, gh, gw, d, generator=g)
    valid = torch.ones(b, gh, gw)
    valid[1, :, 5:] = 0  # a letterboxed image
    return features, valid


@pytest.mark.parametrize("method", ["novelty", "maxmin"])
def test_pick_keeps_exactly_the_budget_of_image_patches_per_image(method: str) -> None:
    features, valid = _pick_grid()
    salience = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(1))
    budget = torch.tensor([5, 9])
    pick = pick_patches(method, features, valid, budget, 12, salience, 0.5, torch.rand(2, 6, 7, 3), 0.5)
    assert pick.shape == (2, 6, 7)
    assert pick.flatten(1).sum(1).tolist() == [5, 9]
    assert (pick[valid == 0] == 0).all()  # never a padding patch
    alone = pick_patches(method, features[1:], valid[1:], budget[1:], 12, salience[1:], 0.5, None, 0.0)
    with_colour = pick_patches(
        method, features[1:], valid[1:], budget[1:], 12, salience[1:], 0.5, torch.zeros(1, 6, 7, 3), 0.5
    )
    assert torch.equal(alone, with_colour)  # one colour everywhere adds the same distance to every pair


@pytest.mark.parametrize("method", ["novelty", "maxmin"])
def test_pick_is_per_image(method: str) -> None:
    features, valid = _pick_grid()
    budget = torch.tensor([6, 4])
    both = pick_patches(method, features, valid, budget, 8)
    for i in range(2):
        one = pick_patches(method, features[i : i + 1], valid[i : i + 1], budget[i : i + 1], 8)
        assert torch.equal(both[i : i + 1], one)


def test_pick_by_novelty_is_the_top_budget_novel_patches() -> None:
    features, valid = _pick_grid()
    pick = pick_patches("novelty", features, valid, torch.tensor([4, 4]), 4)
    scores = novelty(features, valid).flatten(1)
    for i in range(2):
        top = torch.sort(scores[i], descending=True, stable=True).indices[:4]
        assert set(pick[i].flatten().nonzero().flatten().tolist()) == set(top.tolist())


def test_pick_maxmin_is_greedy_max_min_and_salience_moves_it() -> None:
    features, valid = _pick_grid()
    pick = pick_patches("maxmin", features, valid, torch.tensor([5, 5]), 5)
    unit = F.normalize(features[0].flatten(0, 1), dim=-1)
    distance = 1 - unit @ unit.T
    nearest = distance.masked_fill(torch.eye(len(unit), dtype=torch.bool), torch.inf).amin(-1)
    kept = [int(nearest.argmax())]
    for _ in range(4):
        running = distance[kept].amin(0)
        running[kept] = -torch.inf
        kept.append(int(running.argmax()))
    assert set(pick[0].flatten().nonzero().flatten().tolist()) == set(kept)
    salience = torch.zeros(2, 6, 7)
    salience[:, :3] = 1.0  # the top half is salient
    weighted = pick_patches("maxmin", features, valid, torch.tensor([5, 5]), 5, salience, 1.0)
    assert (weighted[:, 3:] == 0).all() and (weighted.flatten(1).sum(1) == 5).all()


def test_cover_counts_the_picked_patches_without_a_question() -> None:
    features, valid = _pick_grid(gh=8, gw=8)
    valid[1] = 1
    scores = torch.rand(2, 3, 2, 2)
    pick = pick_patches("maxmin", features, valid, torch.tensor([7, 7]), 7)
    no_query = torch.zeros(2, 1, dtype=torch.bool)
    relevance, _ = Balance(BalanceConfig(cover=1.0))(
        scores, features, valid, no_query, torch.tensor([7, 7]), None, None, pick
    )
    counts = to_regions(pick[..., None], 4).sum((-1, -2))  # (B, 2, 2)
    torch.testing.assert_close(relevance, counts / 7)
    with_query = torch.ones(2, 1, dtype=torch.bool)
    a, _ = Balance(BalanceConfig(cover=1.0))(
        scores, features, valid, with_query, torch.tensor([7, 7]), None, None, pick
    )
    b, _ = Balance(BalanceConfig(cover=1.0))(scores, features, valid, with_query, torch.tensor([7, 7]))
    assert torch.equal(a, b)  # with a question the pick changes nothing


def test_the_compressor_shows_the_picked_patches_only_without_a_question() -> None:
    features, valid = _pick_grid(gh=8, gw=8)
    valid[1] = 1
    pick = pick_patches("maxmin", features, valid, torch.tensor([6, 6]), 6)
    allocation = to_regions(pick[..., None], 4).sum((-1, -2)).long()  # (B, 2, 2)
    no_query = (torch.zeros(2, 1, 8), torch.zeros(2, 1, dtype=torch.bool))
    _, positions, mask, _ = Compressor(4, 0.5)(features, valid, allocation, 6, *no_query, None, pick)
    for i in range(2):
        shown = {(r, c) for r, c in positions[i, :, :2].tolist()}
        assert shown == {tuple(x) for x in pick[i].nonzero().tolist()}
    query = (torch.randn(2, 1, 8), torch.ones(2, 1, dtype=torch.bool))
    a = Compressor(4, 0.5)(features, valid, allocation, 6, *query, None, pick)
    b = Compressor(4, 0.5)(features, valid, allocation, 6, *query)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_to_patches_spreads_each_region_over_its_patches_and_cuts_to_the_grid() -> None:
    regions = torch.arange(6.0).view(1, 2, 3)
    patches = to_patches(regions, (3, 5), 2)  # a 3x5 grid in 2x2 regions: the last row and column are cut
    assert patches.shape == (1, 3, 5)
    assert patches[0].tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    assert torch.equal(to_regions(patches[..., None], 2)[..., 0, 0], regions)  # each region's first patch


def test_the_pick_is_only_read_without_a_question_and_needs_no_more_steps_than_the_budget() -> None:
    """``pick_steps``: 0 (every image asked) leaves askers' outputs bit-identical; steps down to the largest budget
    leave the query-free outputs bit-identical; fewer steps than a budget would change them (the test can fail)."""
    head = RelevanceHead()
    g = torch.Generator().manual_seed(3)
    b, gh, gw, d = 2, 8, 8, 16
    features, texture = torch.randn(b, gh, gw, d, generator=g), torch.rand(b, gh, gw, 5, generator=g)
    texture = torch.cat((texture, torch.zeros(b, gh, gw, 1)), -1)  # nothing flat: no border
    valid = torch.ones(b, gh, gw)
    query, budget = torch.randn(b, 3, d, generator=g), torch.tensor([5, 9])
    asked, free = torch.ones(b, 3, dtype=torch.bool), torch.zeros(b, 3, dtype=torch.bool)

    def run(mask: torch.Tensor, steps: int | None) -> dict:
        return head(features, texture, valid, query, mask, budget, 20, pick_steps=steps)

    def same(x: dict, y: dict) -> bool:
        return all(torch.equal(x[k], y[k]) for k in ("allocation", "tokens", "positions", "mask"))

    assert same(run(asked, 0), run(asked, None))
    assert same(run(free, 9), run(free, None)) and same(run(free, 16), run(free, None))
    assert not same(run(free, 4), run(free, None))


@pytest.mark.parametrize("salience", [0.0, 0.5])
def test_a_pick_no_scorer_weights_runs_beside_the_scorers(salience: float) -> None:
    """Unweighted, the greedy pick reads the image only and comes out of the score step (beside the scorers, off the
    critical path); weighted by the scorers' salience it comes out of the balance step. Either way it is the pick of
    :func:`pick_patches` on those inputs, and compression shows it."""
    config = PipelineConfig()
    head = RelevanceHead(config.replace(balance=dataclasses.replace(config.balance, pick_salience=salience)))
    features, texture, valid, query, _ = _inputs(gh=8, gw=8)
    texture[1, :, :2, 5], texture[1, :, :2, 1:3] = 1.0, 0.0  # flat, grey, on the second image's left edge: a border
    budget, free = torch.tensor([5, 9]), torch.zeros(2, 3, dtype=torch.bool)
    state = {"features": features, "texture": texture, "patch_valid": valid, "query": query, "query_mask": free,
             "budget": budget}  # fmt: skip
    state["min_tokens"], state["max_tokens"] = head.bounds(valid)
    outputs = {}
    for name, step in head.stages(12):
        outputs[name] = step(state)
        state.update(outputs[name])
    early = "score" if salience == 0 else "balance"
    assert [name for name in outputs if "pick" in outputs[name]] == [early]
    weight = None  # the query-free scorers' mean map, spread over each 4 x 4 region's patches
    if salience:
        weight = (state["scores"][:, :2].sum(1) / 2).repeat_interleave(4, 1).repeat_interleave(4, 2)
    frame = balance.frame_patches(texture[..., 5], valid, texture[..., :3])
    assert frame[1, :, 0].all()  # the border the pick keeps last is there
    want = pick_patches("maxmin", features, valid, budget, 12, weight, salience, texture[..., :3], 0.5, frame=frame)
    assert torch.equal(state["pick"], want)
    shown = state["positions"][:, :, :2]
    for i in range(2):  # no question: compression shows exactly the picked patches
        assert {tuple(x) for x in shown[i][state["mask"][i]].tolist()} == {tuple(x) for x in want[i].nonzero().tolist()}
