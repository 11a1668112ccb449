"""Benchmark: time every stage and the whole path, eager, per bucket size and batch size.

``python -m arrcoc.tools.bench`` (or ``arrcoc bench``) writes ``stages-<device>.json`` and ``.md`` into ``--out`` (``arrcoc-results/`` unless told; ``bench/results/`` holds the committed ones).
GPU time is measured with CUDA events around each stage (warm-up first, median of many); CPU time with
``perf_counter``. Inputs are the synthetic demo scene, so no data set is needed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import PipelineConfig
from ..pipeline import Pipeline
from ..runtime.device import device_name
from ..world.samples import demo_scene
from .timing import busy_ms as _busy_ms  # noqa: F401  (bench_dataset reads it here)
from .timing import device_times_ms, write_report

__all__ = ["main", "time_stages"]

logger = logging.getLogger(__name__)

POST_ENCODE = ("score", "balance", "allocate", "compress")


def _images(size: int, batch: int) -> torch.Tensor:
    """``(B, 3, size, size)`` uint8: the demo scene, rolled so the images of a batch differ."""
    scene = torch.from_numpy(np.array(demo_scene(size, size))).permute(2, 0, 1)
    return torch.stack([scene.roll(shifts=17 * i, dims=2) for i in range(batch)])


@torch.inference_mode()
def time_stages(
    pipe: Pipeline, size: int, batch: int, *, budget_share: float = 0.25, warmup: int = 3, reps: int = 20
) -> dict[str, Any]:
    """Median milliseconds of each stage and of the whole chain for one bucket size and batch size."""
    device = pipe.device
    (group,) = pipe.preprocessor(_images(size, batch), device=device)
    grid = pipe.encoder(group.bucket).grid
    budget = max(1, int(grid[0] * grid[1] * budget_share))
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 4, pipe.width, generator=generator).to(device)
    state: dict[str, Any] = {
        "pixels": group.pixels,
        "valid": group.valid,
        "query": query,
        "query_mask": torch.ones(batch, 4, dtype=torch.bool, device=device),
        "budget": torch.full((batch,), budget, device=device),
    }
    chain = pipe.stages(group.bucket, capacity=budget)
    for _, stage in chain:  # fill the state once
        state.update(stage(state))
    result: dict[str, Any] = {
        "size": size,
        "batch": batch,
        "budget": budget,
        "patches": grid[0] * grid[1],
        "stages": {},
    }
    for name, stage in chain:
        times = device_times_ms(lambda stage=stage: stage(state), device, warmup, reps)
        result["stages"][name] = statistics.median(times)
        if device.type == "cuda":
            result.setdefault("busy", {})[name] = _busy_ms(lambda stage=stage: stage(state), reps)

    def whole() -> None:
        for _, stage in chain:
            state.update(stage(state))

    result["chain"] = statistics.median(device_times_ms(whole, device, warmup, reps))
    result["post_encode"] = sum(result["stages"][n] for n in POST_ENCODE)
    result["post_encode_share"] = result["post_encode"] / result["stages"]["encode"]
    if "busy" in result:
        result["post_encode_busy_share"] = sum(result["busy"][n] for n in POST_ENCODE) / result["busy"]["encode"]
    return result


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# arrcoc stage timings, eager — {report['device']}",
        "",
        f"torch {report['torch']}, timm {report['timm']}, encoder `{report['encoder']}` ({report['encoder_dtype']}), "
        f"{report['date']}. Median ms of {report['reps']} runs after {report['warmup']} warm-ups"
        f"{' (CUDA events)' if report['cuda'] else ' (perf_counter)'}; budget = 25% of the patches.",
        "",
    ]
    if report["cuda"]:
        lines += [
            "Each cell: elapsed ms (CUDA events, includes the gaps while the CPU launches kernels) / busy ms "
            "(kernel time from the profiler). Eager small stages are launch-bound: elapsed >> busy.",
            "",
        ]
    lines += [
        "| size | batch | patches | budget | encode | score | balance | allocate | compress | chain | post-encode / encode |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        s, busy = r["stages"], r.get("busy")

        def cell(n: str, s: dict = s, busy: dict | None = busy) -> str:
            return f"{s[n]:.3f} / {busy[n]:.3f}" if busy else f"{s[n]:.3f}"

        share = f"{100 * r['post_encode_share']:.1f}%"
        if busy:
            share += f" / {100 * r['post_encode_busy_share']:.1f}%"
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['patches']} | {r['budget']} | {cell('encode')} | {cell('score')} | "
            f"{cell('balance')} | {cell('allocate')} | {cell('compress')} | {r['chain']:.3f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; returns an exit code. ``--graphs`` runs
    :mod:`arrcoc.tools.bench_graphs` instead, with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--graphs" in argv:
        from .bench_graphs import main as graphs_main

        return graphs_main([a for a in argv if a != "--graphs"])
    parser = argparse.ArgumentParser(
        prog="arrcoc bench",
        description="Time each stage of the pipeline, eager.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="run the CUDA graphs vs eager vs torch.compile benchmark instead, with its own options "
        "(arrcoc bench --graphs --help)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024], help="bucket sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--preset", default="default", help="pipeline preset (default, tiny)")
    parser.add_argument("--encoder", default=None, help="override the preset's timm encoder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="encoder dtype")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument(
        "--out",
        default="arrcoc-results",
        help="folder for the JSON and markdown results (pass bench/results to update the committed ones)",
    )
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    overrides: dict[str, Any] = {"encoder_dtype": args.dtype, "buckets": tuple(args.sizes)}
    if args.encoder:
        overrides["encoder"] = args.encoder
    config = PipelineConfig.from_name(args.preset, **overrides)
    pipe = Pipeline(config, device=device)
    import timm

    report: dict[str, Any] = {
        "device": device_name(device),
        "cuda": device.type == "cuda",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "encoder": config.encoder,
        "encoder_dtype": args.dtype,
        "date": datetime.date.today().isoformat(),
        "reps": args.reps,
        "warmup": args.warmup,
        "results": [],
    }
    cases = [(s, b) for s in args.sizes for b in args.batches]
    for size, batch in tqdm(cases, desc="bench", unit="case"):
        try:
            report["results"].append(time_stages(pipe, size, batch, warmup=args.warmup, reps=args.reps))
        except torch.cuda.OutOfMemoryError:
            logger.warning("size %d batch %d: out of GPU memory, skipped", size, batch)
            torch.cuda.empty_cache()
    write_report(
        report, _markdown(report), args.out, f"stages-{'cpu' if device.type == 'cpu' else report['device']}", args.tag
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
