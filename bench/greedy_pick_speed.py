"""The query-free pick's greedy loop alone on the GPU: the Triton kernel against the torch loop, both captured as
one CUDA graph (as the chain runs them), and whether they agree bit for bit.

    PYTHONPATH=$PWD python bench/greedy_pick_speed.py            # prints one JSON line per case
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from arrcoc.stages.greedy_pick import greedy_maxmin, greedy_maxmin_reference
from arrcoc.tools.timing import device_times_ms


def _inputs(images: int, n: int, steps: int, seed: int = 0) -> tuple:
    """``(weighted, score, live)`` as ``pick_patches`` builds them from random unit features."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(images, n, 64, device="cuda", generator=g), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device="cuda")
    score = distance.masked_fill(eye, torch.inf).amin(-1)  # (B, N)
    weighted = distance.masked_fill(eye, -torch.inf)  # (B, N, N)
    budget = torch.full((images,), steps * 3 // 4, device="cuda")
    live = budget[:, None] > torch.arange(steps, device="cuda")  # (B, steps)
    return weighted, score, live


def _graphed(fn, args) -> tuple:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["64x196x64", "8x196x64", "64x576x144", "8x1024x256"])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    for case in args.cases:
        images, n, steps = (int(v) for v in case.split("x"))
        inputs = _inputs(images, n, steps)
        row = {"images": images, "patches": n, "steps": steps, "device": torch.cuda.get_device_name()}
        outs = {}
        for name, fn in (("kernel", greedy_maxmin), ("loop", greedy_maxmin_reference)):
            graph, outs[name] = _graphed(fn, inputs)
            row[f"{name}_ms"] = statistics.median(device_times_ms(graph.replay, torch.device("cuda"), 3, args.reps))
        row["speed_up"] = row["loop_ms"] / row["kernel_ms"]
        row["equal"] = torch.equal(outs["kernel"], outs["loop"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
