"""Issue 21: arrcoc without a question against DivPrune, on validation seeds, within a time limit.

Evaluates ``divprune``, the shipped ``arrcoc-noquery`` and the query-free candidates of :data:`VARIANTS` (each the
``arrcoc-noquery`` reducer with one config change) through :func:`arrcoc.tools.evaluation.evaluate` (the harness,
adapter and scoring of ``arrcoc eval``), on the validation seeds 700,000 and 800,000 only (never the test seeds
600,000), at 224 and 384 px. Work runs in chunks of one (budget, size, seed), the budgets issue 21 judges first
(11%, 5.5%), then 22%; after each chunk the JSON and markdown under ``--out`` are rewritten, and a chunk that would
not finish inside ``--time-limit`` (estimated from the chunks before it) is not started, so partial results
survive a time-out.

    python bench/sweep_noquery.py                                   # one GPU, defaults
    python bench/sweep_noquery.py --samples-per-family 2 --device cpu --time-limit 600   # smoke test
    python bench/sweep_noquery.py --variants nq-peaks-03,nq-peaks-05 --shares 0.11,0.055 --time-limit 560 \
        --tag peaks-h200                                            # the object-first pick (issue 21)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from arrcoc.config import PipelineConfig
from arrcoc.reducers import create_reducer, list_reducers
from arrcoc.reducers.registry import register_reducer
from arrcoc.runtime.device import device_name
from arrcoc.tools.evaluation import EvalConfig, evaluate

logger = logging.getLogger("sweep_noquery")

#: Validation seeds only: the test seeds start at 600,000 and are never evaluated here.
SEEDS: tuple[int, ...] = (700_000, 800_000)
SIZES: tuple[int, ...] = (224, 384)
#: Budget shares in the order they are run: the two issue 21 judges, then 22% if time allows.
SHARES: tuple[float, ...] = (0.11, 0.055, 0.22)

#: name -> (what it does, changes to the shipped config: PipelineConfig fields, ``balance`` a dict of its fields).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "nq-detail1": ("novelty_detail 1: a region shows its most novel patches", {"novelty_detail": 1.0}),
    "nq-pick-novelty": (
        "pick novelty: the image's top-budget patches by novelty, exactly",
        {"balance": {"pick": "novelty"}},
    ),
    "nq-maxmin": ("pick maxmin: greedy max-min (DivPrune's set) inside the head", {"balance": {"pick": "maxmin"}}),
    "nq-maxmin-s03": (
        "pick maxmin, each candidate's distance weighted by salience (share 0.3)",
        {"balance": {"pick": "maxmin", "pick_salience": 0.3}},
    ),
    "nq-maxmin-s06": (
        "pick maxmin, salience share 0.6",
        {"balance": {"pick": "maxmin", "pick_salience": 0.6}},
    ),
    "nq-maxmin-c05": (
        "pick maxmin on feature plus Lab colour distance (colour weight 0.5)",
        {"balance": {"pick": "maxmin", "pick_colour": 0.5}},
    ),
    "nq-maxmin-s045": (
        "pick maxmin, salience share 0.45",
        {"balance": {"pick": "maxmin", "pick_salience": 0.45}},
    ),
    "nq-maxmin-s06-c05": (
        "pick maxmin, salience share 0.6, colour weight 0.5",
        {"balance": {"pick": "maxmin", "pick_salience": 0.6, "pick_colour": 0.5}},
    ),
    "nq-maxmin-c025": (
        "pick maxmin, colour weight 0.25 (the default's 0.5 halved: text answers lean on feature distance)",
        {"balance": {"pick": "maxmin", "pick_colour": 0.25}},
    ),
    "nq-maxmin-c1": (
        "pick maxmin, colour weight 1 (the default's 0.5 doubled)",
        {"balance": {"pick": "maxmin", "pick_colour": 1.0}},
    ),
    "nq-maxmin-s015-c05": (
        "pick maxmin, salience share 0.15 beside the default's colour weight 0.5",
        {"balance": {"pick": "maxmin", "pick_salience": 0.15, "pick_colour": 0.5}},
    ),
    "nq-maxmin-c05-p025": (
        "pick maxmin, the default's colour weight 0.5, grid distance weight 0.25 (alike objects in two places)",
        {"balance": {"pick": "maxmin", "pick_colour": 0.5, "pick_spatial": 0.25}},
    ),
    "nq-maxmin-c05-p05": (
        "pick maxmin, the default's colour weight 0.5, grid distance weight 0.5",
        {"balance": {"pick": "maxmin", "pick_colour": 0.5, "pick_spatial": 0.5}},
    ),
    "nq-maxmin-c05-p1": (
        "pick maxmin, the default's colour weight 0.5, grid distance weight 1",
        {"balance": {"pick": "maxmin", "pick_colour": 0.5, "pick_spatial": 1.0}},
    ),
    "nq-peaks-03": (
        "pick peaks: the shipped objectness probe's 3x3 local maxima above 0.3 first (max-min order), then max-min",
        {"balance": {"pick": "peaks", "pick_peaks": 0.3}},
    ),
    "nq-peaks-05": (
        "pick peaks, objectness threshold 0.5",
        {"balance": {"pick": "peaks", "pick_peaks": 0.5}},
    ),
    # with a question (issue 21 item 3): the full ``arrcoc`` reducer, judged against its best single scorer
    "q-cover-015": (
        "with a question: a share 0.15 of the relevance follows novelty",
        {"balance": {"query_cover": 0.15}},
    ),
    "q-cover-03": ("with a question: a share 0.3 of the relevance follows novelty", {"balance": {"query_cover": 0.3}}),
}
BASELINES: tuple[str, ...] = ("divprune", "arrcoc-noquery")
#: The references of the variants with a question: the balanced mix as shipped and its best single scorer.
QUERY_BASELINES: tuple[str, ...] = ("arrcoc", "arrcoc-participatory")


def _base(name: str) -> str:
    """The registered reducer a variant is built from: ``arrcoc`` for the ``q-`` variants, else ``arrcoc-noquery``."""
    return "arrcoc" if name.startswith("q-") else "arrcoc-noquery"


def variant_config(changes: dict[str, Any]) -> PipelineConfig:
    """The shipped default config with ``changes`` (``balance``: a dict of BalanceConfig fields)."""
    base = PipelineConfig()
    changes = dict(changes)
    balance = changes.pop("balance", None)
    if balance:
        changes["balance"] = dataclasses.replace(base.balance, **balance)
    return base.replace(**changes)


def register_variants(names: list[str]) -> None:
    """Register each named variant as a reducer: ``arrcoc-noquery`` built with its config."""
    for name in names:
        if name in list_reducers():
            continue
        config = variant_config(VARIANTS[name][1])

        def build(config_: Any = None, _config: PipelineConfig = config, _from: str = _base(name), **_: Any) -> Any:
            return create_reducer(_from, config=_config)

        register_reducer(name)(build)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/validation/sweep-noquery", help="folder for JSON and markdown")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds for the whole run, model load included")
    p.add_argument("--samples-per-family", type=int, default=200)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--shares", default=",".join(map(str, SHARES)))
    p.add_argument("--families", default=None, help="comma-separated question families (default: all the world's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 16 on CPU")
    p.add_argument("--eager-reducers", action="store_true", help="no CUDA graphs for the reducers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--tag", default="", help="suffix of the output files")
    return p


def _table(results: list[dict[str, Any]], methods: list[str], families: list[str], chunks: list[dict]) -> str:
    """Markdown: per size and seed, accuracy per method and budget, the gap to DivPrune, then per family."""
    lines = []
    cells = sorted({(r["size"], r["seed"]) for r in results})
    for size, seed in cells:
        rows = [r for r in results if r["size"] == size and r["seed"] == seed]
        budgets = sorted({(r["tokens"], r["share"]) for r in rows}, reverse=True)
        n = rows[0]["samples"]
        lines += [
            f"## {size} px, seed {seed:,} ({n} questions per cell)",
            "",
            "| accuracy % | " + " | ".join(f"{t} tok ({100 * s:g}%)" for t, s in budgets) + " | minus divprune |",
            "|---|" + "---:|" * (len(budgets) + 1),
        ]
        acc = {(r["method"], r["tokens"]): r["accuracy"] for r in rows}
        for m in methods:
            vals = [acc.get((m, t)) for t, _ in budgets]
            gaps = [
                f"{100 * (v - acc[('divprune', t)]):+.1f}" if v is not None and ("divprune", t) in acc else "–"
                for v, (t, _) in zip(vals, budgets)
            ]
            shown = ["–" if v is None else f"{100 * v:.1f}" for v in vals]
            lines.append(f"| {m} | " + " | ".join(shown) + f" | {' / '.join(gaps)} |")
        lines += ["", f"Per family ({' / '.join(families)}):", ""]
        for t, _ in budgets:
            for r in rows:
                if r["tokens"] == t and r.get("families"):
                    fam = " / ".join(
                        "–" if r["families"][f] is None else f"{100 * r['families'][f]:.0f}" for f in families
                    )
                    lines.append(f"- {t} tok, {r['method']}: {fam}")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, stem: str, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    head = [
        "# arrcoc without a question against DivPrune: validation sweep (issue 21)",
        "",
        f"{report['device']}, torch {report['torch']}, {report['date']}; shipped VLM `weights/`, greedy answers, "
        f"exact match, accuracy in %; validation seeds only ({', '.join(f'{s:,}' for s in report['seeds'])}), "
        f"{report['samples_per_family']} questions per family x {len(report['families'])} families per cell. "
        f"{len(report['chunks'])} chunks done in {report['seconds']:.0f} s"
        + (f"; not run (time limit): {', '.join(report['not_run'])}" if report["not_run"] else "")
        + ".",
        "",
        "Variants (each `arrcoc-noquery`, or for `q-` ones `arrcoc` with the question, with one change to the "
        "shipped config):",
        "",
    ]
    head += [f"- `{name}`: {VARIANTS[name][0]}" for name in report["variants"]]
    head.append("")
    text = "\n".join(head) + "\n" + _table(report["results"], report["methods"], report["families"], report["chunks"])
    (out / f"{stem}.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="sweep_noquery: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(600_000 <= s < 700_000 for s in seeds):
        print("seeds 600,000-699,999 are the test seeds: not used for choosing defaults", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    shares = [float(s) for s in args.shares.split(",")]
    register_variants(variants)
    methods = list(BASELINES) + [v for v in variants if _base(v) != "arrcoc"]
    if any(_base(v) == "arrcoc" for v in variants):
        methods += list(QUERY_BASELINES) + [v for v in variants if _base(v) == "arrcoc"]

    from arrcoc.stages.text_query import TextQueryEncoder
    from arrcoc.world.vlm import DEFAULT_VLM_DIR, load_vlm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_vlm()
    text_encoder = TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR)  # read by no query-free method; as arrcoc eval
    batch = args.batch_size or (64 if device.type == "cuda" else 16)
    out, stem = Path(args.out), "sweep-noquery" + (f"-{args.tag}" if args.tag else "")
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "samples_per_family": args.samples_per_family,
        "seeds": seeds,
        "sizes": sizes,
        "shares": shares,
        "methods": methods,
        "variants": variants,
        "configs": {v: VARIANTS[v][1] for v in variants},
        "families": [],
        "results": [],
        "reference": {},
        "chunks": [],
        "not_run": [],
        "seconds": 0.0,
    }
    chunks = [(share, size, seed) for share in shares for size in sizes for seed in seeds]
    took: dict[int, float] = {}  # size -> seconds of its last chunk
    for share, size, seed in chunks:
        elapsed = time.perf_counter() - start
        guess = took.get(size, took[min(took)] * (size / min(took)) ** 2 if took else 0.0)
        if elapsed + guess > args.time_limit:
            report["not_run"].append(f"{100 * share:g}% {size} px seed {seed}")
            logger.info("skipped %g%% %d px seed %d: %.0f s left, about %.0f s needed", 100 * share, size, seed,
                        args.time_limit - elapsed, guess)  # fmt: skip
            continue
        t0 = time.perf_counter()
        config = EvalConfig(
            methods=tuple(methods),
            shares=(share,),
            sizes=(size,),
            samples_per_family=args.samples_per_family,
            batch_size=batch,
            seed=seed,
            **({"families": tuple(args.families.split(","))} if args.families else {}),
        )
        part = evaluate(
            model,
            tokenizer,
            config,
            device=device,
            progress=False,
            text_encoder=text_encoder,
            reducer_graphs="off" if args.eager_reducers else "auto",
        )
        took[size] = time.perf_counter() - t0
        report["families"] = part["families"]
        report["results"] += [{**r, "seed": seed} for r in part["results"]]
        report["reference"][f"{size}/{seed}"] = part["reference"].get(str(size))
        if part["skipped"]:
            report.setdefault("skipped", {})[f"{100 * share:g}% {size} px seed {seed}"] = part["skipped"]
        report["chunks"].append({"share": share, "size": size, "seed": seed, "seconds": round(took[size], 1)})
        report["seconds"] = round(time.perf_counter() - start, 1)
        write(out, stem, report)
        logger.info("%g%% %d px seed %d: %.1f s", 100 * share, size, seed, took[size])
    report["seconds"] = round(time.perf_counter() - start, 1)
    write(out, stem, report)
    print(f"sweep_noquery: wrote {out / stem}.json and .md ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
