"""How often the query-free pick, and the allocation, change when the features it reads move a little (CPU).

The compiled and plain pipelines agree on fewer images than they should (issue 22 item 4): tiny float differences
flip a greedy argmax, and one flip changes the later picks. This measures that sensitivity on generated scenes
with the shipped weights: the encoder's features are multiplied by ``1 + noise * N(0, 1)`` (or rounded to
bfloat16) inside the pick only, and the greedy scores compared as they are (grid 0) or rounded to a grid first, so
that near-ties resolve by index. Rounding is monotone, so rounding the loop's inputs rounds every score it compares.

    PYTHONPATH=$PWD python bench/pick_stability.py --images 128
"""

from __future__ import annotations

import argparse
import json

import torch

from arrcoc.config import DEFAULT_WEIGHTS_DIR, PipelineConfig
from arrcoc.pipeline import Pipeline
from arrcoc.stages import balance, head
from arrcoc.stages.greedy_pick import greedy_maxmin_reference
from arrcoc.tools.bench_graphs import _world_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--noise", nargs="+", default=["1e-6", "1e-4", "1e-3", "4e-3", "bf16"])
    parser.add_argument("--grids", nargs="+", type=float, default=[0.0, 1e-4, 1e-3, 1e-2])
    args = parser.parse_args()

    config = PipelineConfig.from_json((DEFAULT_WEIGHTS_DIR / "config.json").read_text()).replace(buckets=(args.size,))
    pipe = Pipeline(config, weights=str(DEFAULT_WEIGHTS_DIR / "encoder.safetensors"), device="cpu")
    state: dict = {"noise": None, "grid": 0.0, "picks": []}
    pick_patches = head.pick_patches

    def noisy_pick(method, features, *rest, **kw):
        if state["noise"] == "bf16":
            features = features.to(torch.bfloat16).float()
        elif state["noise"]:
            g = torch.Generator().manual_seed(12345)
            noise = torch.randn(features.shape, generator=g).to(features.dtype)
            features = features * (1 + float(state["noise"]) * noise)
        out = pick_patches(method, features, *rest, **kw)
        state["picks"].append(out.clone())
        return out

    def rounded_greedy(weighted, score, live):
        if state["grid"]:
            weighted = torch.round(weighted / state["grid"]) * state["grid"]
            score = torch.round(score / state["grid"]) * state["grid"]
        return greedy_maxmin_reference(weighted, score, live)

    head.pick_patches, balance.greedy_maxmin = noisy_pick, rounded_greedy
    grid = pipe.encoder(args.size).grid
    budget = grid[0] * grid[1] // 4  # as bench_graphs --agreement
    pixels = _world_images(args.size, range(900_000, 900_000 + args.images))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        state["picks"], allocations = [], []
        for start in range(0, args.images, 32):
            allocations.append(pipe(pixels[start : start + 32], budget=budget).allocation.clone())
        return torch.cat(state["picks"]), torch.cat(allocations)

    results = {}
    for g in args.grids:
        state["grid"], state["noise"] = g, None
        picks, allocation = run()
        row = {}
        for noise in args.noise:
            state["noise"] = noise
            moved_picks, moved_allocation = run()
            row[noise] = {
                "picks_same": (picks == moved_picks).flatten(1).all(1).float().mean().item(),
                "allocation_same": (allocation == moved_allocation).flatten(1).all(1).float().mean().item(),
            }
        results[str(g)] = row
        print(f"grid {g}: {json.dumps(row)}", flush=True)
    print(json.dumps({"images": args.images, "size": args.size, "budget": budget, "results": results}))


if __name__ == "__main__":
    main()
