"""Issue 21's query-free ablations: each query-free scorer alone, and both without the cover, on the test seeds.

Each variant is a registered reducer with one change to the shipped config (``cover`` 0: the scorers' balance
decides, and no pick is built). Reporting only: defaults are chosen on validation seeds (``bench/sweep_noquery.py``).

    python bench/noquery_ablation.py --size 224 --samples-per-family 200 --out bench/results/validation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from arrcoc.config import PipelineConfig
from arrcoc.reducers import create_reducer
from arrcoc.reducers.registry import register_reducer
from arrcoc.stages.text_query import TextQueryEncoder
from arrcoc.tools.evaluation import EvalConfig, evaluate
from arrcoc.world.vlm import DEFAULT_VLM_DIR, load_vlm

#: name -> the registered reducer it is built from; each with ``cover`` 0.
VARIANTS = {
    "abl-propositional-alone": "arrcoc-propositional",
    "abl-perspectival-alone": "arrcoc-perspectival",
    "abl-cover-off": "arrcoc-noquery",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples-per-family", type=int, default=200)
    parser.add_argument("--seed", type=int, default=600_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/validation")
    args = parser.parse_args()
    base = PipelineConfig()
    config = base.replace(balance=dataclasses.replace(base.balance, cover=0.0))
    for name, source in VARIANTS.items():
        register_reducer(name)(lambda config_=None, _s=source, **_: create_reducer(_s, config=config))
    model, tokenizer = load_vlm()
    start = time.perf_counter()
    out = evaluate(
        model,
        tokenizer,
        EvalConfig(
            methods=tuple(VARIANTS),
            shares=(0.11, 0.055),
            sizes=(args.size,),
            samples_per_family=args.samples_per_family,
            batch_size=16,
            seed=args.seed,
        ),
        device=torch.device(args.device),
        progress=False,
        text_encoder=TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR),
        reducer_graphs="off",
    )
    results = [{k: r[k] for k in ("method", "tokens", "accuracy", "families")} for r in out["results"]]
    report = {
        "size": args.size,
        "samples_per_family": args.samples_per_family,
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    path = Path(args.out) / f"noquery-ablation-{args.device}-{args.size}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
