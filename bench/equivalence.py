"""Snapshot arrcoc's CPU outputs, to show a refactor changes nothing: the same tokens, allocation and relevance.

    python bench/equivalence.py save before.pt     # on the old code
    python bench/equivalence.py compare before.pt  # on the new code: every tensor bit-identical, or a list of what differs

Covers the shipped Pipeline (with and without a text query, score-only, mixed sizes), the reducers on its
features (arrcoc and every ablation, with and without a query) and training's random compression.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

import arrcoc
from arrcoc import reducers
from arrcoc.world import data, train


def _world(seeds: range, size: int) -> list:
    return [data.make_sample(s, size) for s in seeds]


def snapshot() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    pipe = arrcoc.Pipeline.from_pretrained()
    samples = _world(range(600_000, 600_012), 224) + _world(range(600_100, 600_104), 384)
    rng = np.random.default_rng(0)
    photos = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((191, 384), (300, 200), (224, 224))
    ]
    images = [s.image for s in samples] + photos
    questions = [s.question for s in samples] + ["what color is the circle"] * len(photos)

    def keep(prefix: str, result) -> None:
        for name in ("tokens", "positions", "mask", "weights", "allocation", "relevance"):
            value = getattr(result, name, None)
            if value is not None:
                out[f"{prefix}.{name}"] = value.detach().clone()
        scores = getattr(result, "scores", None)
        if isinstance(scores, dict):
            for k, v in scores.items():
                out[f"{prefix}.scores.{k}"] = v.detach().clone()

    for i, (image, question) in enumerate(zip(images, questions)):
        keep(f"pipe.q.{i}", pipe([image], question, budget=40))
        keep(f"pipe.noq.{i}", pipe([image], None, budget=24))
        keep(f"score.noq.{i}", pipe.score([image]))
    keep("pipe.mixed", pipe(images[10:16], None, budget=[30, 31, 32, 33, 34, 35]))
    grid = pipe.encoder(224)
    with torch.inference_mode():
        batch = (
            torch.stack(
                [torch.from_numpy(np.asarray(s.image.convert("RGB"))).permute(2, 0, 1) for s in samples[:8]]
            ).float()
            / 255
        )
        features, _ = grid.features(batch)
        query, qmask = pipe.prepare_query([s.question for s in samples[:8]], None, 8)
        for name in ("arrcoc", "arrcoc-propositional", "arrcoc-perspectival", "arrcoc-participatory"):
            reducer = reducers.create_reducer(name, config=pipe.config)
            for with_query in (True, False):
                visual = reducers.VisualInput(
                    features.float(),
                    pixels=batch,
                    query=query if with_query else None,
                    query_mask=qmask if with_query else None,
                )
                r = reducer(visual, 30)
                tag = f"reducer.{name}.{'q' if with_query else 'noq'}"
                out[f"{tag}.tokens"], out[f"{tag}.positions"] = r.tokens.clone(), r.positions.clone()
                out[f"{tag}.allocation"], out[f"{tag}.relevance"] = r.allocation.clone(), r.relevance.clone()
    g = torch.Generator().manual_seed(3)
    tokens, boxes = train.random_compression(features.float().flatten(1, 2), g, 0.2)
    out["train.tokens"], out["train.boxes"] = tokens, boxes
    return out


def main(argv: list[str]) -> int:
    verb, path = argv
    now = snapshot()
    if verb == "save":
        torch.save(now, path)
        print(f"saved {len(now)} tensors to {path}")
        return 0
    before = torch.load(path)
    differ = [
        k for k in before if k not in now or before[k].shape != now[k].shape or not torch.equal(before[k], now[k])
    ]
    missing = sorted(set(now) - set(before))
    print(
        f"{len(before)} tensors compared: {len(before) - len(differ)} bit-identical, {len(differ)} differ"
        + (f", {len(missing)} new" if missing else "")
    )
    for k in differ[:20]:
        print("  differs:", k)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
