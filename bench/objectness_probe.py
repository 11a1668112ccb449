"""Issue 21 experiment: a learned query-free objectness map as the query-free pick's salience, validation seeds only.

A logistic probe on the shipped VLM tower's patch features is trained on the generated world's dense layout labels
(the share of each patch covered by a drawn shape or text frame) from training scenes (seeds from 2,000,000:
neither the validation seeds 700,000 / 800,000 nor the test seeds from 600,000), checked on other held-out scenes,
then used as ``pick_salience``'s map in ``arrcoc-noquery`` and evaluated beside ``divprune`` and the shipped
``arrcoc-noquery`` through :func:`arrcoc.tools.evaluation.evaluate` on one validation seed.

    python bench/objectness_probe.py --out DIR                  # CPU: about ten minutes at the defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from arrcoc.reducers import create_reducer
from arrcoc.reducers.registry import register_reducer
from arrcoc.stages.balance import pick_patches
from arrcoc.tools.evaluation import EvalConfig, answer_coverage, evaluate, to_markdown
from arrcoc.world.data import make_sample
from arrcoc.world.vlm import load_vlm, vision_features, vision_tower
from arrcoc.world.vlm_adapter import rgb_values

TRAIN_SEED = 2_000_000  # training scenes
CHECK_SEED = 2_500_000  # held-out scenes for the probe's own check


def _scenes(model: Any, first: int, count: int, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count * N, D)`` tower features and ``(count * N,)`` layout coverage of ``count`` scenes."""
    grid = (size // patch, size // patch)
    features, targets = [], []
    for start in range(0, count, 32):
        samples = [make_sample(first + i, size) for i in range(start, min(count, start + 32))]
        with torch.no_grad():
            features.append(vision_features(model, rgb_values([s.image for s in samples])).flatten(0, 1))
        targets += [answer_coverage([box for _, _, box in s.layout], size, grid).flatten() for s in samples]
    return torch.cat(features), torch.cat(targets)


def train_probe(features: torch.Tensor, targets: torch.Tensor, steps: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of coverage on features (full batch, Adam): ``(D,)`` weights and a bias."""
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ weight + bias, targets)
        loss.backward()
        optimiser.step()
    return weight.detach(), bias.detach()


def register_objectness(name: str, share: float, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """``arrcoc-noquery`` whose pick weighs each candidate by the probe's objectness (``pick_salience = share``)."""
    base = create_reducer("arrcoc-noquery").config

    def build(config: Any = None, **_: Any) -> Any:
        config = base.replace(balance=dataclasses.replace(base.balance, pick_salience=share))
        reducer = create_reducer("arrcoc-noquery", config=config)
        head = reducer.head

        def _pick(self: Any, s: dict[str, Any], steps: int) -> torch.Tensor:
            cfg = self.config.balance
            features = s["features"]
            objectness = torch.sigmoid(features.float() @ weight.to(features.device) + bias.to(features.device))
            return pick_patches(
                self.pick,
                features,
                s["patch_valid"],
                s["budget"],
                steps,
                objectness,
                cfg.pick_salience,
                s["texture"][..., :3],
                cfg.pick_colour,
                s.get("novelty"),
            )

        head._pick = types.MethodType(_pick, head)
        return reducer

    register_reducer(name)(build)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/validation")
    parser.add_argument("--train", type=int, default=1500, help="training scenes")
    parser.add_argument("--check", type=int, default=300, help="held-out scenes for the probe's check")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples-per-family", type=int, default=100)
    parser.add_argument("--seed", type=int, default=700_000, choices=[700_000, 800_000], help="a validation seed")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.11, 0.055])
    parser.add_argument("--salience", type=float, nargs="+", default=[0.5, 0.8], help="pick_salience values")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_vlm()
    patch = vision_tower(model).patch_embed.patch_size[0]
    features, targets = _scenes(model, TRAIN_SEED, args.train, args.size, patch)
    weight, bias = train_probe(features, targets)
    held_f, held_t = _scenes(model, CHECK_SEED, args.check, args.size, patch)
    predicted = torch.sigmoid(held_f @ weight + bias)
    on, off = held_t >= 0.5, held_t == 0
    check = {
        "patches": int(held_t.numel()),
        "mean_objectness_on_objects": float(predicted[on].mean()),
        "mean_objectness_on_background": float(predicted[off].mean()),
        "correlation": float(torch.corrcoef(torch.stack((predicted, held_t)))[0, 1]),
        "object_share": float(on.float().mean()),
    }
    print("probe check", json.dumps(check), flush=True)
    names = []
    for share in args.salience:
        name = f"nq-objectness-{share:g}"
        register_objectness(name, share, weight, bias)
        names.append(name)
    config = EvalConfig(
        methods=("divprune", "arrcoc-noquery", *names),
        shares=tuple(args.shares),
        sizes=(args.size,),
        samples_per_family=args.samples_per_family,
        seed=args.seed,
    )
    report = evaluate(model, tokenizer, config, device="cpu", progress=False)
    report["probe_check"] = check
    report["train_scenes"], report["train_seed"], report["seconds"] = (
        args.train,
        TRAIN_SEED,
        time.perf_counter() - start,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"objectness-probe-cpu-{args.size}-seed{args.seed}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(
        "# Issue 21 experiment: a learned objectness map as the query-free pick's salience (validation)\n\n"
        f"Probe: logistic regression on the tower's features, {args.train} training scenes (seeds from {TRAIN_SEED}), "
        f"checked on {args.check} others (seeds from {CHECK_SEED}): {json.dumps(check)}.\n\n" + to_markdown(report)
    )
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
