"""Train the objectness probe of the object-first pick (``BalanceConfig.pick="peaks"``) on generated scenes.

The target is what a layout oracle keeps first: 1 on the patch each drawn shape covers most, 0 elsewhere (glyphs and
text frames are not targets). A logistic regression on the shipped encoder's patch features learns it from training
scenes only (seeds from :data:`TRAIN_SEED`, clear of the test seeds from 600,000 and the validation seeds 700,000 and
800,000), at 224 and 384 px together; held-out scenes from :data:`CHECK_SEED` measure its fit per size, beside a probe
trained on that size alone. The file is written as ``objectness.safetensors`` with the encoder's fingerprint.

    python -m arrcoc.world.objectness --out weights/        # CPU: a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stages.objectness import OBJECTNESS_FILE, Objectness, encoder_fingerprint
from .data import SHAPES, make_sample
from .vlm import DEFAULT_VLM_DIR, load_vlm, vision_features, vision_tower
from .vlm_adapter import rgb_values

__all__ = ["TRAIN_SEED", "CHECK_SEED", "best_patches", "scenes", "fit_probe", "peak_fit", "train_objectness", "main"]

logger = logging.getLogger(__name__)

#: First training scene; each size draws its own range (224 px from here, 384 px from here + 100,000).
TRAIN_SEED = 2_000_000
#: First held-out scene of the fit check.
CHECK_SEED = 2_500_000
_SIZE_OFFSET = {224: 0, 384: 100_000}


def best_patches(layout: Sequence[tuple[str, str, tuple[int, int, int, int]]], size: int, patch: int) -> Tensor:
    """``(gh * gw,)`` 1 on the patch each drawn shape covers most (ties: the lower index), 0 elsewhere."""
    grid = size // patch
    target = torch.zeros(grid * grid)
    for kind, _, (x0, y0, x1, y1) in layout:
        if kind not in SHAPES:
            continue
        inside = torch.zeros(size, size)
        inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1.0
        cover = F.avg_pool2d(inside[None, None], patch)[0, 0].flatten()  # (N,) share of each patch
        target[int(cover.argmax())] = 1.0
    return target


@torch.no_grad()
def scenes(model: Any, first: int, count: int, size: int, batch: int = 32) -> tuple[Tensor, Tensor]:
    """``(count, N, D)`` tower features and ``(count, N)`` targets (:func:`best_patches`) of scenes
    ``first .. first + count - 1`` at ``size`` px."""
    patch = vision_tower(model).patch_embed.patch_size[0]
    features, targets = [], []
    for start in range(first, first + count, batch):
        samples = [make_sample(seed, size) for seed in range(start, min(first + count, start + batch))]
        features.append(vision_features(model, rgb_values([s.image for s in samples])))
        targets += [best_patches(s.layout, size, patch) for s in samples]
    return torch.cat(features), torch.stack(targets)


def fit_probe(features: Tensor, targets: Tensor, steps: int = 400, lr: float = 0.05) -> tuple[Tensor, Tensor]:
    """Logistic regression of ``targets`` ``(M,)`` on ``features`` ``(M, D)``, full batch, Adam from zeros (as the
    experiment behind the default threshold, ``bench/oracle_noquery.py``): ``(D,)`` weight and a bias."""
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        F.binary_cross_entropy_with_logits(features @ weight + bias, targets).backward()
        optimiser.step()
    return weight.detach(), bias.detach()


def peak_fit(
    weight: Tensor, bias: Tensor, features: Tensor, targets: Tensor, thresholds: Sequence[float] = (0.3, 0.5)
) -> dict[str, float]:
    """Held-out fit of a probe on ``(S, N, D)`` features and ``(S, N)`` targets of square grids.

    Returns:
        ``bce`` (per patch), and per threshold ``T``: ``peaks@T`` (peaks per scene: 3x3 local maxima above ``T``),
        ``precision@T`` (the share of peaks on a target patch, or next to one) and ``recall@T`` (the share of target
        patches with a peak on them or next to them); ``targets`` (target patches per scene).
    """
    s, n, _ = features.shape
    side = int(round(n**0.5))
    logit = features @ weight + bias  # (S, N)
    out = {"bce": float(F.binary_cross_entropy_with_logits(logit, targets)), "targets": float(targets.sum() / s)}
    prob = torch.sigmoid(logit).view(s, 1, side, side)
    near_target = F.max_pool2d(targets.view(s, 1, side, side), 3, 1, 1) > 0  # within one patch of a target
    for t in thresholds:
        peak = (prob >= F.max_pool2d(prob, 3, 1, 1)) & (prob > t)  # (S, 1, side, side)
        near_peak = F.max_pool2d(peak.float(), 3, 1, 1) > 0
        out[f"peaks@{t:g}"] = float(peak.sum() / s)
        out[f"precision@{t:g}"] = float((peak & near_target).sum() / peak.sum().clamp_min(1))
        out[f"recall@{t:g}"] = float((near_peak.flatten() * targets.flatten()).sum() / targets.sum().clamp_min(1))
    return out


def train_objectness(
    model: Any, sizes: Sequence[int] = (224, 384), train: int = 1000, check: int = 200
) -> tuple[Objectness, dict[str, Any]]:
    """Train one probe on ``train`` scenes per size, and measure it on ``check`` held-out scenes per size beside a
    probe trained on that size alone.

    Returns:
        the probe, and its held-out fit: ``{"joint": {size: fit}, "per_size": {size: fit}}`` (:func:`peak_fit`).
    """
    data = {}
    for size in sizes:
        data[size] = scenes(model, TRAIN_SEED + _SIZE_OFFSET.get(size, size * 1000), train, size)
        logger.info("%d training scenes at %d px", train, size)
    width = data[sizes[0]][0].shape[-1]
    weight, bias = fit_probe(
        torch.cat([f.reshape(-1, width) for f, _ in data.values()]), torch.cat([t.flatten() for _, t in data.values()])
    )
    fit: dict[str, Any] = {"joint": {}, "per_size": {}}
    for size in sizes:
        held = scenes(model, CHECK_SEED + _SIZE_OFFSET.get(size, size * 1000), check, size)
        fit["joint"][size] = peak_fit(weight, bias, *held)
        alone = fit_probe(data[size][0].reshape(-1, width), data[size][1].flatten())
        fit["per_size"][size] = peak_fit(*alone, *held)
    encoder = encoder_fingerprint(vision_tower(model).state_dict())
    meta = {
        "target": "1 on the patch each drawn shape covers most (arrcoc.world.objectness.best_patches)",
        "train_seeds": json.dumps({s: [TRAIN_SEED + _SIZE_OFFSET.get(s, s * 1000), train] for s in sizes}),
        "check_seeds": json.dumps({s: [CHECK_SEED + _SIZE_OFFSET.get(s, s * 1000), check] for s in sizes}),
        "held_out_fit": json.dumps(fit),
    }
    return Objectness(weight, bias, encoder, meta), fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_VLM_DIR), help=f"folder for {OBJECTNESS_FILE}")
    parser.add_argument("--model", default=None, help="the VLM folder whose encoder the probe reads (default: shipped)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--train", type=int, default=1000, help="training scenes per size")
    parser.add_argument("--check", type=int, default=200, help="held-out scenes per size")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="objectness: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _ = load_vlm(args.model)
    probe, fit = train_objectness(model, args.sizes, args.train, args.check)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe.save(out / OBJECTNESS_FILE)
    print(json.dumps({"file": str(out / OBJECTNESS_FILE), "seconds": round(time.perf_counter() - start), **fit}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
