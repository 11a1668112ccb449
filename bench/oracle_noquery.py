"""Issue 21 experiment: how far a query-free pick could go if it knew where the world's objects and glyphs are.

An oracle reducer (``arrcoc-noquery`` whose pick reads the generated scene's layout labels, never the question)
keeps, per image, first one patch for each drawn item in a tier order (shapes, glyphs), each at the patch it covers
most (items in raster order of that patch, so the question's target is not favoured), then fills the budget by
greedy max-min over the default pick's distance from what is kept. It bounds what an objectness-aware first pass
could add over DivPrune, on one validation seed only. ``peaks-*`` methods are the learned counterpart: a logistic
probe of shape coverage (``peaks-shapes-*``) or shape-and-glyph coverage (``peaks-all-*``) on the tower's features,
trained on ``--train`` scenes from seed 2,000,000; its 3x3 local maxima above the threshold are picked first (in
max-min order), then max-min. ``package-peaks-T`` is the package's own ``BalanceConfig(pick="peaks", pick_peaks=T)``
with the shipped probe (``weights/objectness.safetensors``, trained at 224 and 384 px), and ``package-peaks224-T`` the
same pick with this script's ``peaks-best`` probe: it should answer as ``peaks-best-T`` does. For text answers:
``tiers-T`` adds a second tier after the shape peaks, the peaks of a probe of the patch each glyph covers most
(``glyphs``, trained here), and ``capped-0.5-T`` keeps first only the half of the budget's worth of shape peaks of
highest objectness.

    python bench/oracle_noquery.py --out DIR          # CPU, a few minutes per variant at 100 per family
    cd bench && python oracle_noquery.py --stem peaks-noquery --methods peaks-shapes-0.3 peaks-shapes-0.5 peaks-all-0.5
    cd bench && python oracle_noquery.py --stem package-peaks --samples-per-family 50 \
        --methods divprune arrcoc-noquery peaks-best-0.3 package-peaks224-0.3 package-peaks-0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from arrcoc.config import PipelineConfig
from arrcoc.reducers import create_reducer
from arrcoc.reducers.registry import register_reducer
from arrcoc.tools import evaluation
from arrcoc.tools.evaluation import EvalConfig, answer_coverage, evaluate, to_markdown
from arrcoc.world.vlm import load_vlm

_LAYOUTS: dict[int, Any] = {}  # id(image) -> the sample's layout
_BATCH: list[Any] = []  # the layouts of the batch being evaluated

_samples = evaluation._samples
_pixel_values = evaluation.pixel_values


def _stash_samples(config: EvalConfig, size: int) -> list[Any]:
    samples = _samples(config, size)
    _LAYOUTS.update({id(s.image): s.layout for s in samples})
    return samples


def _stash_batch(model: Any, images: list[Any], device: Any) -> torch.Tensor:
    _BATCH[:] = [_LAYOUTS[id(im)] for im in images]
    return _pixel_values(model, images, device)


def _distance(features: torch.Tensor, colour: torch.Tensor, colour_share: float) -> torch.Tensor:
    unit = F.normalize(features.float().flatten(0, 1), dim=-1)
    lab = colour.float().flatten(0, 1)
    return 1 - unit @ unit.T + colour_share * torch.cdist(lab, lab)


def oracle_mask(
    layout: Any, features: torch.Tensor, colour: torch.Tensor, budget: int, tiers: tuple[str, ...], colour_share: float
) -> torch.Tensor:
    gh, gw, _ = features.shape
    size = gh * 16
    n = gh * gw
    chosen: list[int] = []
    for tier in tiers:
        kinds = {"shapes": lambda k: k not in ("text", "glyph"), "glyphs": lambda k: k == "glyph"}[tier]
        best = []
        for kind, _, box in layout:
            if kinds(kind):
                cover = answer_coverage([box], size, (gh, gw)).flatten()
                best.append(int(cover.argmax()))
        for p in sorted(set(best)):
            if len(chosen) < budget and p not in chosen:
                chosen.append(p)
    distance = _distance(features, colour, colour_share)
    if chosen:
        score = distance[chosen].amin(0)
    else:
        score = distance.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).amin(-1)
    return _greedy(score, distance, chosen, budget).view(gh, gw)


def _greedy(score: torch.Tensor, rows: torch.Tensor, chosen: list[int], budget: int) -> torch.Tensor:
    """Greedy max-min from ``chosen`` on: keep the best-scoring patch, lower every score to its row (the first
    pick of an empty start replaces them, as :func:`arrcoc.stages.balance.pick_patches` does), until ``budget``;
    ``(N,)`` 1 on what is kept."""
    score = score.clone()
    score[chosen] = -float("inf")
    first = not chosen  # as pick_patches: the first pick's row replaces the scores before it
    while len(chosen) < budget:
        p = int(score.argmax())
        chosen.append(p)
        score = rows[p].clone() if first else torch.minimum(score, rows[p])
        first = False
        score[chosen] = -float("inf")
    mask = torch.zeros(rows.shape[0])
    mask[chosen] = 1
    return mask


def peak_mask(
    objectness: torch.Tensor,
    features: torch.Tensor,
    colour: torch.Tensor,
    budget: int,
    colour_share: float,
    threshold: float,
) -> torch.Tensor:
    """Local maxima (3x3) of a learned objectness map above ``threshold`` first, in max-min order, then max-min."""
    gh, gw = objectness.shape
    n = gh * gw
    pooled = F.max_pool2d(objectness[None, None], 3, 1, 1)[0, 0]
    peak = ((objectness >= pooled) & (objectness > threshold)).flatten()
    distance = _distance(features, colour, colour_share)
    bonus = peak.float() * 10.0
    weighted = distance + bonus[None, :]
    score = distance.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).amin(-1) + bonus
    return _greedy(score, weighted, [], budget).view(gh, gw)


def _register(name: str, mask: Any) -> None:
    """Register ``name``: ``arrcoc-noquery`` whose pick is ``mask(i, features, colour, budget, colour_share)`` per
    image ``i`` of the batch (``(gh, gw)`` 1 on each kept patch)."""

    def build(config: Any = None, **_: Any) -> Any:
        reducer = create_reducer("arrcoc-noquery")
        head = reducer.head

        def _pick(self: Any, s: dict[str, Any], steps: int) -> torch.Tensor:
            feats, colour, budget = s["features"], s["texture"][..., :3], s["budget"]
            share = self.config.balance.pick_colour
            masks = [mask(i, feats, colour[i], int(budget[i]), share) for i in range(feats.shape[0])]
            return torch.stack(masks).to(feats.dtype)

        head._pick = types.MethodType(_pick, head)
        return reducer

    register_reducer(name)(build)


def register_peaks(name: str, weight: torch.Tensor, bias: torch.Tensor, threshold: float) -> None:
    def mask(i: int, feats: torch.Tensor, colour: torch.Tensor, budget: int, share: float) -> torch.Tensor:
        objectness = torch.sigmoid(feats[i].float() @ weight + bias)
        return peak_mask(objectness, feats[i], colour, budget, share, threshold)

    _register(name, mask)


def register_package(name: str, threshold: float, probe: Any = None) -> None:
    """``arrcoc-noquery`` with the package's ``pick="peaks"`` at ``threshold``; ``probe`` an ``Objectness`` (default:
    the shipped one)."""
    base = PipelineConfig()
    config = base.replace(balance=dataclasses.replace(base.balance, pick="peaks", pick_peaks=threshold))

    def build(config_: Any = None, **_: Any) -> Any:
        return create_reducer("arrcoc-noquery", config=config, objectness=probe)

    register_reducer(name)(build)


def register_tiers(
    name: str, threshold: float, glyphs: tuple[torch.Tensor, torch.Tensor] | None, cap: float | None
) -> None:
    """The package's ``pick="peaks"`` (shipped probe, ``threshold``) with text in mind: ``glyphs`` a glyph probe
    (weight, bias) whose peaks form a second tier after the shape peaks; ``cap`` keeps only the ``ceil(cap *
    budget)`` shape peaks of highest objectness first."""
    from arrcoc.stages.balance import objectness_peaks, pick_patches

    base = PipelineConfig()
    config = base.replace(balance=dataclasses.replace(base.balance, pick="peaks", pick_peaks=threshold))

    def build(config_: Any = None, **_: Any) -> Any:
        reducer = create_reducer("arrcoc-noquery", config=config)
        head = reducer.head

        def _pick(self: Any, s: dict[str, Any], steps: int) -> torch.Tensor:
            features, valid, budget = s["features"], s["patch_valid"], s["budget"]
            objectness = self.objectness(features, valid)
            shape = objectness_peaks(objectness, valid, threshold)  # (B, gh, gw)
            if cap is not None:
                key = torch.where(shape, objectness, -1.0).flatten(1)
                rank = torch.argsort(torch.sort(key, dim=-1, descending=True, stable=True).indices, -1)
                shape = shape & (rank < torch.ceil(cap * budget)[:, None]).view_as(shape)
            tier = shape.float()
            if glyphs is not None:
                glyph = torch.where(valid > 0, torch.sigmoid(features.float() @ glyphs[0] + glyphs[1]), 0.0)
                tier = 2 * tier + (objectness_peaks(glyph, valid, threshold) & ~shape).float()
            cfg = self.config.balance
            colour = s["texture"][..., :3]
            return pick_patches(
                "maxmin", features, valid, budget, steps, None, 0.0, colour, cfg.pick_colour, priority=tier
            )

        head._pick = types.MethodType(_pick, head)
        return reducer

    register_reducer(name)(build)


def train_shapes(model: Any, size: int, count: int, kinds: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic probe on tower features of shape coverage (``kinds`` "shapes"), shape-and-glyph coverage ("all"),
    or the oracle's choice, the patch each shape covers most ("best"), or each glyph ("glyphs")."""
    from objectness_probe import train_probe

    from arrcoc.world.data import make_sample
    from arrcoc.world.vlm import vision_features
    from arrcoc.world.vlm_adapter import rgb_values

    grid = (size // 16, size // 16)
    features, targets = [], []
    for start in range(0, count, 32):
        samples = [make_sample(2_000_000 + i, size) for i in range(start, min(count, start + 32))]
        with torch.no_grad():
            features.append(vision_features(model, rgb_values([s.image for s in samples])).flatten(0, 1))
        for s in samples:
            if kinds in ("best", "glyphs"):  # the oracle's own choice: 1 on the patch each shape (glyph) covers most
                target = torch.zeros(grid[0] * grid[1])
                for k, _, b in s.layout:
                    if (k not in ("text", "glyph")) if kinds == "best" else (k == "glyph"):
                        target[int(answer_coverage([b], size, grid).flatten().argmax())] = 1.0
                targets.append(target)
                continue
            boxes = [b for k, _, b in s.layout if (k not in ("text", "glyph")) or (kinds == "all" and k == "glyph")]
            targets.append(answer_coverage(boxes, size, grid).flatten())
    return train_probe(torch.cat(features), torch.cat(targets))


def register_oracle(name: str, tiers: tuple[str, ...]) -> None:
    def mask(i: int, feats: torch.Tensor, colour: torch.Tensor, budget: int, share: float) -> torch.Tensor:
        return oracle_mask(_BATCH[i], feats[i], colour, budget, tiers, share)

    _register(name, mask)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/validation")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples-per-family", type=int, default=100)
    parser.add_argument("--seed", type=int, default=700_000, choices=[700_000, 800_000], help="a validation seed")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.11, 0.055])
    parser.add_argument("--stem", default="oracle-noquery", help="report file name stem (size and seed appended)")
    parser.add_argument("--train", type=int, default=1000, help="scenes for the peaks' probe (seeds from 2,000,000)")
    parser.add_argument("--methods", nargs="+", default=["divprune", "arrcoc-noquery", "oracle-sg", "oracle-gs"])
    args = parser.parse_args()
    evaluation._samples = _stash_samples
    evaluation.pixel_values = _stash_batch
    register_oracle("oracle-sg", ("shapes", "glyphs"))
    register_oracle("oracle-gs", ("glyphs", "shapes"))
    register_oracle("oracle-s", ("shapes",))
    register_oracle("oracle-g", ("glyphs",))
    model, tokenizer = load_vlm()
    for kinds in ("shapes", "all", "best"):
        wanted = f"peaks-{kinds}", *((f"package-peaks{args.size}",) if kinds == "best" else ())
        if any(m.startswith(wanted) for m in args.methods):
            weight, bias = train_shapes(model, args.size, args.train, kinds)
            for threshold in (0.3, 0.5):
                register_peaks(f"peaks-{kinds}-{threshold:g}", weight, bias, threshold)
                if kinds == "best":
                    from arrcoc.stages.objectness import Objectness, encoder_fingerprint
                    from arrcoc.world.vlm import vision_tower

                    probe = Objectness(weight, bias, encoder_fingerprint(vision_tower(model).state_dict()))
                    register_package(f"package-peaks{args.size}-{threshold:g}", threshold, probe)
    for threshold in (0.3, 0.5):
        register_package(f"package-peaks-{threshold:g}", threshold)
        register_tiers(f"capped-0.5-{threshold:g}", threshold, None, 0.5)
    if any(m.startswith("tiers-") for m in args.methods):
        glyphs = train_shapes(model, args.size, args.train, "glyphs")
        for threshold in (0.3, 0.5):
            register_tiers(f"tiers-{threshold:g}", threshold, glyphs, None)
    config = EvalConfig(
        methods=tuple(args.methods),
        shares=tuple(args.shares),
        sizes=(args.size,),
        samples_per_family=args.samples_per_family,
        seed=args.seed,
        batch_size=50,
    )
    report = evaluate(model, tokenizer, config, device="cpu", progress=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.stem}-cpu-{args.size}-seed{args.seed}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = "# Issue 21 experiment: a layout oracle's query-free pick (validation)\n\n" + to_markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
