"""The object-first pick (``BalanceConfig.pick="peaks"``): an objectness probe's peaks first, then max-min (a border's
patches last, ``frame``); the shipped probe and its encoder; refusal of any other encoder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import arrcoc
from arrcoc import MissingWeightsError, PipelineConfig
from arrcoc.config import DEFAULT_WEIGHTS_DIR, BalanceConfig
from arrcoc.reducers import VisualInput, create_reducer
from arrcoc.stages import greedy_pick
from arrcoc.stages.balance import objectness_peaks, pick_patches
from arrcoc.stages.head import RelevanceHead
from arrcoc.stages.objectness import OBJECTNESS_FILE, Objectness, encoder_fingerprint

PROBE = DEFAULT_WEIGHTS_DIR / OBJECTNESS_FILE
ENCODER = DEFAULT_WEIGHTS_DIR / "encoder.safetensors"


def _grid(b: int = 2, gh: int = 6, gw: int = 7, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Features, validity (image 1 letterboxed: its last two columns are padding) and an objectness map."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, gh, gw, d, generator=g)
    valid = torch.ones(b, gh, gw)
    valid[1, :, gw - 2 :] = 0
    objectness = torch.rand(b, gh, gw, generator=g)
    return features, valid, objectness


def _tiers_reference(features: torch.Tensor, valid: torch.Tensor, tier: torch.Tensor, budget: int) -> list[int]:
    """One image, in Python: the highest tier first by greedy max-min (cosine distance), then each lower tier by
    max-min from what is kept; the first pick is the candidate whose nearest other image patch is farthest."""
    unit = F.normalize(features.flatten(0, 1), dim=-1)
    distance = (1 - unit @ unit.T).tolist()
    cells = [i for i in range(len(distance)) if valid.flatten()[i] > 0]
    level = {i: int(tier.flatten()[i]) for i in cells}
    kept: list[int] = []
    while len(kept) < min(budget, len(cells)):
        top = max(level[i] for i in cells if i not in kept)
        pool = [i for i in cells if i not in kept and level[i] == top]
        if kept:
            scores = [min(distance[k][i] for k in kept) for i in pool]
        else:
            scores = [min(distance[i][j] for j in cells if j != i) for i in pool]
        kept.append(pool[max(range(len(pool)), key=lambda k: (scores[k], -pool[k]))])
    return kept


def test_peaks_are_local_maxima_above_the_threshold_and_never_padding() -> None:
    objectness = torch.zeros(1, 5, 5)
    objectness[0, 1, 1] = 0.9  # a peak
    objectness[0, 1, 2] = 0.8  # next to a higher one: not a peak
    objectness[0, 3, 3] = 0.25  # a local maximum below the threshold
    objectness[0, 4, 0] = 0.7  # beside padding that scores higher: still a peak
    objectness[0, 4, 1] = 0.99
    valid = torch.ones(1, 5, 5)
    valid[0, 4, 1] = 0
    peaks = objectness_peaks(objectness, valid, 0.3)
    assert peaks.nonzero().tolist() == [[0, 1, 1], [0, 4, 0]]
    assert not objectness_peaks(objectness, torch.zeros(1, 5, 5), 0.0).any()  # all padding: no peak


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_peaks_pick_keeps_exactly_the_budget_and_no_padding(threshold: float) -> None:
    features, valid, objectness = _grid()
    objectness = torch.where(valid > 0, objectness, 1.0)  # padding would be every peak if it counted
    for budget in ([0, 0], [1, 3], [12, 9], [42, 30]):
        pick = pick_patches(
            "peaks", features, valid, torch.tensor(budget), 42, objectness=objectness, peak_threshold=threshold
        )
        assert pick.flatten(1).sum(1).tolist() == budget
        assert (pick[valid == 0] == 0).all()


def test_peaks_are_picked_first_then_max_min_fills() -> None:
    features, valid, objectness = _grid(seed=3)
    peak = objectness_peaks(objectness, valid, 0.3)
    counts = peak.flatten(1).sum(1).tolist()
    assert min(counts) >= 3  # the case has peaks to order
    for budget in (2, counts[0], counts[0] + 6):
        pick = pick_patches("peaks", features, valid, torch.tensor([budget, budget]), 20, objectness=objectness)
        for i in range(2):
            want = torch.zeros(6 * 7)
            want[_tiers_reference(features[i], valid[i], peak[i], budget)] = 1
            assert torch.equal(pick[i].flatten(), want), (i, budget)
        if budget >= counts[0]:  # every peak is kept once the budget allows
            assert pick[0][peak[0]].all()
    # the order matters: with the budget below the peak count, only peaks are kept
    pick = pick_patches("peaks", features, valid, torch.tensor([2, 2]), 2, objectness=objectness)
    assert (pick.bool() <= peak).all()


def test_priority_tiers_are_kept_in_order() -> None:
    features, valid, _ = _grid(seed=4)
    tier = torch.randint(0, 3, (2, 6, 7), generator=torch.Generator().manual_seed(4))
    for budget in (3, 12, 25, 40):
        pick = pick_patches("maxmin", features, valid, torch.tensor([budget, budget]), 40, priority=tier)
        for i in range(2):
            want = torch.zeros(6 * 7)
            want[_tiers_reference(features[i], valid[i], tier[i], budget)] = 1
            assert torch.equal(pick[i].flatten(), want), (i, budget)


def test_a_border_is_a_tier_below_the_rest_with_peaks_above() -> None:
    features, valid, objectness = _grid(seed=6)
    peak = objectness_peaks(objectness, valid, 0.3)
    frame = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(6)) < 0.4
    tier = peak.long() - frame.long()  # a peak on the border is neither first nor last
    assert (tier == -1).any() and (tier == 1).any()
    for budget in (2, 15, 30, 40):
        pick = pick_patches(
            "peaks", features, valid, torch.tensor([budget, budget]), 40, objectness=objectness, frame=frame
        )
        for i in range(2):
            want = torch.zeros(6 * 7)
            want[_tiers_reference(features[i], valid[i], tier[i], budget)] = 1
            assert torch.equal(pick[i].flatten(), want), (i, budget)


def test_without_peaks_it_is_the_max_min_pick() -> None:
    features, valid, objectness = _grid()
    budget = torch.tensor([10, 7])
    kw = dict(colour=torch.rand(2, 6, 7, 3, generator=torch.Generator().manual_seed(5)), colour_share=0.5)
    plain = pick_patches("maxmin", features, valid, budget, 12, **kw)
    low = pick_patches("peaks", features, valid, budget, 12, objectness=objectness * 0.2, peak_threshold=0.3, **kw)
    assert torch.equal(plain, low)  # no objectness above the threshold: no peak, the plain max-min
    high = pick_patches("peaks", features, valid, budget, 12, objectness=objectness, peak_threshold=0.3, **kw)
    assert not torch.equal(plain, high)  # with peaks it differs, so the equality above means something


def test_peaks_pick_is_per_image() -> None:
    features, valid, objectness = _grid(b=3, seed=1)
    budget = torch.tensor([6, 4, 11])
    both = pick_patches("peaks", features, valid, budget, 12, objectness=objectness)
    for i in range(3):
        one = pick_patches(
            "peaks", features[i : i + 1], valid[i : i + 1], budget[i : i + 1], 12, objectness=objectness[i : i + 1]
        )
        assert torch.equal(both[i : i + 1], one)


def test_peaks_pick_traces_as_one_graph_without_host_syncs() -> None:
    """``torch.compile(fullgraph=True)`` fails on any ``.item()``, data-dependent shape or Python branch on a value."""
    features, valid, objectness = _grid()
    budget = torch.tensor([5, 8])

    def pick(features, valid, objectness, budget):
        return pick_patches("peaks", features, valid, budget, 8, objectness=objectness)

    torch._dynamo.reset()
    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(features, valid, objectness, budget), pick(features, valid, objectness, budget))


@pytest.mark.cuda
def test_peaks_pick_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(16, 14, 14, 32, generator=g).cuda()
    valid = torch.ones(16, 14, 14, device="cuda")
    valid[:4, :, 10:] = 0
    kw = dict(
        colour=torch.rand(16, 14, 14, 3, generator=g).cuda(),
        colour_share=0.5,
        objectness=torch.rand(16, 14, 14, generator=g).cuda(),
        peak_threshold=0.3,
    )
    budget = torch.randint(0, 64, (16,), generator=g).cuda()
    with_kernel = pick_patches("peaks", features, valid, budget, 64, **kw)
    monkeypatch.setattr(greedy_pick, "USE_KERNEL", False)
    assert torch.equal(with_kernel, pick_patches("peaks", features, valid, budget, 64, **kw))


@pytest.mark.cuda
def test_peaks_pick_replays_in_a_cuda_graph() -> None:
    def inputs(seed: int) -> list[torch.Tensor]:
        features, valid, objectness = _grid(b=4, gh=14, gw=14, d=32, seed=seed)
        budget = torch.randint(1, 40, (4,), generator=torch.Generator().manual_seed(seed))
        return [t.cuda() for t in (features, valid, objectness, budget)]

    def pick(features, valid, objectness, budget):
        return pick_patches("peaks", features, valid, budget, 40, objectness=objectness)

    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pick(*static)  # Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = pick(*static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (1, 2):
        new = inputs(seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, pick(*new))


# --- the probe and its encoder ---------------------------------------------------------------------------------
def _peaks_config(**balance: object) -> PipelineConfig:
    base = PipelineConfig.from_json((DEFAULT_WEIGHTS_DIR / "config.json").read_text())
    return base.replace(balance=dataclasses.replace(base.balance, pick="peaks", **balance))


def test_config_takes_peaks_and_checks_its_threshold() -> None:
    config = PipelineConfig(balance=BalanceConfig(pick="peaks", pick_peaks=0.5))
    assert PipelineConfig.from_json(config.to_json()).balance.pick_peaks == 0.5
    assert BalanceConfig().pick == "maxmin"  # not the default
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(arrcoc.InvalidInputError, match="pick_peaks"):
            BalanceConfig(pick="peaks", pick_peaks=bad)


def test_the_shipped_probe_matches_its_metadata_and_encoder() -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    probe = Objectness.load(PROBE)
    assert probe.width == 256 == int(probe.metadata["width"])
    assert probe.encoder == encoder_fingerprint(load_file(ENCODER))
    with safe_open(str(PROBE), framework="pt") as f:
        assert set(f.keys()) == {"weight", "bias"} and f.get_tensor("weight").shape == (256,)
    seeds = json.loads(probe.metadata["train_seeds"])
    assert set(seeds) == {"224", "384"}
    for first, count in seeds.values():  # training seeds only: never the test or validation ranges
        assert first >= 2_000_000 and count > 0
    fit = json.loads(probe.metadata["held_out_fit"])["joint"]
    assert all(0 <= fit[size]["recall@0.3"] <= 1 and fit[size]["bce"] > 0 for size in ("224", "384"))


def test_for_encoder_loads_the_shipped_probe_for_its_encoder_only() -> None:
    from safetensors.torch import load_file

    fingerprint = encoder_fingerprint(load_file(ENCODER))
    assert Objectness.for_encoder(None, 256, fingerprint).encoder == fingerprint
    with pytest.raises(MissingWeightsError, match="not the probe's encoder"):
        Objectness.for_encoder(None, 256, "0" * 64)
    with pytest.raises(MissingWeightsError, match="no trained weights"):
        Objectness.for_encoder(DEFAULT_WEIGHTS_DIR, 256, None)


def test_fingerprint_sees_a_changed_weight_not_a_float32_copy() -> None:
    state = {"a": torch.randn(4, 3).half(), "b": torch.randn(2).half()}
    same = encoder_fingerprint({k: v.float() for k, v in state.items()})
    assert same == encoder_fingerprint(state)
    moved = dict(state, b=state["b"] + 0.01)
    assert encoder_fingerprint(moved) != same
    assert encoder_fingerprint({"c": state["a"], "b": state["b"]}) != same  # names count


def test_the_head_refuses_peaks_without_a_probe() -> None:
    with pytest.raises(MissingWeightsError, match="objectness probe"):
        RelevanceHead(_peaks_config())
    assert RelevanceHead(_peaks_config(cover=0.0)).objectness is None  # no cover: the pick is never run


def test_pipeline_refuses_peaks_with_any_other_encoder(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with pytest.raises(MissingWeightsError, match="no trained weights"):
        arrcoc.Pipeline(_peaks_config(), objectness=PROBE)  # a random encoder
    with pytest.raises(MissingWeightsError, match="192 wide"):
        arrcoc.Pipeline(PipelineConfig.from_name("tiny", balance={"pick": "peaks"}), weights=None, objectness=PROBE)
    state = load_file(ENCODER)
    state["norm.weight"] = state["norm.weight"] * 1.5  # another encoder of the same shape
    save_file(state, tmp_path / "encoder.safetensors")
    with pytest.raises(MissingWeightsError, match="not the probe's encoder"):
        arrcoc.Pipeline(_peaks_config(), weights=tmp_path / "encoder.safetensors", objectness=PROBE)
    with pytest.raises(MissingWeightsError, match="no objectness probe"):  # no probe beside those weights
        arrcoc.Pipeline(_peaks_config(), weights=tmp_path / "encoder.safetensors")


def test_pretrained_pipeline_picks_peaks_and_round_trips(tmp_path: Path) -> None:
    from arrcoc.world.data import make_sample

    pipe = arrcoc.Pipeline.from_pretrained(balance=_peaks_config().balance)
    assert isinstance(pipe.head.objectness, Objectness)
    images = [make_sample(2_900_000 + i, 224).image for i in range(2)]
    out = pipe(images, budget=22)
    assert out.mask.sum(1).tolist() == [22, 22]
    pipe.save_pretrained(tmp_path)  # float32 encoder, the probe beside it
    again = arrcoc.Pipeline.from_pretrained(tmp_path)
    assert again.config.balance.pick == "peaks"
    assert torch.equal(again(images, budget=22).tokens, out.tokens)
    plain = arrcoc.Pipeline.from_pretrained()(images, budget=22)
    assert not torch.equal(plain.positions, out.positions)  # the peaks moved the pick


def test_reducer_loads_the_shipped_probe_and_refuses_another_width() -> None:
    reducer = create_reducer("arrcoc-noquery", config=_peaks_config())
    assert isinstance(reducer.head.objectness, Objectness)
    g = torch.Generator().manual_seed(0)
    visual = VisualInput(features=torch.randn(2, 14, 14, 256, generator=g), pixels=torch.rand(2, 3, 224, 224))
    out = reducer(visual, 20)
    assert out.tokens.shape == (2, 20, 256)
    with pytest.raises(MissingWeightsError, match="16 wide"):
        reducer(VisualInput(features=torch.randn(2, 6, 8, 16, generator=g)), 5)
