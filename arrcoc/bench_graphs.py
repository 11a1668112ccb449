"""Benchmark of the CUDA-graph chain against eager stages and ``torch.compile(mode="reduce-overhead")``.

``python -m arrcoc.bench_graphs`` (or ``arrcoc bench --graphs``) writes ``bench/results/graphs-<device>.json``
and ``.md``. Per bucket size and batch: GPU time (CUDA events) and CPU issue time (``perf_counter`` around
the call, no sync inside) of the whole chain eager, graphed and compiled, GPU time of each stage eager and
graphed, capture time and pool bytes; and the time to warm up every size and batch bucket.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .bench import _images, _timer, write_report
from .config import PipelineConfig
from .pipeline import Pipeline, _fill_static, token_capacity

__all__ = ["main", "time_graphs"]


def _issue_us(fn: Callable[[], Any], reps: int) -> float:
    """Median microseconds the CPU spends issuing one call (no sync inside; the queue drains between)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _case(pipe: Pipeline, size: int, batch: int) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The stages and inputs of one benchmark case (the demo scene; budget = 25% of the patches)."""
    device = pipe.device
    (group,) = pipe.preprocessor(_images(size, batch), device=device)
    grid = pipe.encoder(group.bucket).grid
    budget = max(1, grid[0] * grid[1] // 4)
    capacity = token_capacity(budget)
    query = torch.randn(batch, 4, pipe.width, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"pixels": group.pixels, "valid": group.valid, "query": query,
              "query_mask": torch.ones(batch, 4, dtype=torch.bool, device=device),
              "budget": torch.full((batch,), budget, device=device)}
    info = {"size": size, "batch": batch, "budget": budget, "capacity": capacity}
    return pipe.stages(group.bucket, capacity), inputs, info


@torch.inference_mode()
def time_graphs(pipe: Pipeline, size: int, batch: int, *, reps: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Eager vs graphed timings for one bucket size and batch size."""
    stages, inputs, result = _case(pipe, size, batch)
    state = dict(inputs)

    def eager() -> dict[str, Any]:
        for _, fn in stages:
            state.update(fn(state))
        return state

    eager()
    timer = _timer(pipe.device)
    result["eager_ms"] = statistics.median(timer(eager, warmup, reps))
    result["eager_issue_us"] = _issue_us(eager, reps)
    result["eager_stage_ms"] = {name: statistics.median(timer(lambda fn=fn: state.update(fn(state)), warmup, reps))
                                for name, fn in stages}

    start = time.perf_counter()
    key = pipe._graph_key(size, batch, result["capacity"], 4)
    chain = pipe._chain(key)
    if chain is None:
        raise RuntimeError(f"capture failed for {size}px batch {batch}: {pipe._eager_only[key]}")
    torch.cuda.synchronize()
    result["capture_s"] = time.perf_counter() - start
    result["pool_bytes"] = chain.bytes
    _fill_static(chain.inputs, inputs, batch)
    result["graphed_ms"] = statistics.median(timer(chain.replay, warmup, reps))
    result["graphed_issue_us"] = _issue_us(chain.replay, reps)
    result["graphed_stage_ms"] = {name: statistics.median(timer(graph.replay, warmup, reps)) for name, graph in chain.graphs}
    result["speedup"] = result["eager_ms"] / result["graphed_ms"]
    result["stage_speedup"] = {n: result["eager_stage_ms"][n] / result["graphed_stage_ms"][n] for n in result["graphed_stage_ms"]}
    return result


@torch.inference_mode()
def time_compiled(pipe: Pipeline, result: dict[str, Any], *, reps: int = 50, warmup: int = 5) -> None:
    """Add ``torch.compile(mode="reduce-overhead")`` timings of the same eager chain to ``result``.

    reduce-overhead is inductor plus CUDA graph trees; where inductor fails on the chain, the "cudagraphs"
    backend (dynamo plus CUDA graph trees, no inductor) is timed instead and the failure recorded.
    """
    stages, inputs, _ = _case(pipe, result["size"], result["batch"])

    def whole(pixels: Tensor, valid: Tensor, query: Tensor, query_mask: Tensor, budget: Tensor) -> tuple[Tensor, ...]:
        s = {"pixels": pixels, "valid": valid, "query": query, "query_mask": query_mask, "budget": budget}
        for _, fn in stages:
            s.update(fn(s))
        return s["tokens"], s["mask"], s["allocation"]

    args = tuple(inputs[k] for k in ("pixels", "valid", "query", "query_mask", "budget"))
    for backend, options in (("inductor", {"mode": "reduce-overhead"}), ("cudagraphs", {})):
        torch._dynamo.reset()
        compiled = torch.compile(whole, backend=backend, **options)
        start = time.perf_counter()
        try:
            for _ in range(3):  # compile, record, then replay
                compiled(*args)
            torch.cuda.synchronize()
        except Exception as err:  # a compiler bug must not end the benchmark
            result.setdefault("compile_errors", {})[backend] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        result["compile_backend"] = backend
        result["compile_s"] = time.perf_counter() - start
        timer = _timer(pipe.device)
        result["compiled_ms"] = statistics.median(timer(lambda c=compiled: c(*args), warmup, reps))
        result["compiled_issue_us"] = _issue_us(lambda c=compiled: c(*args), reps)
        result["graphed_over_compiled"] = result["graphed_ms"] / result["compiled_ms"]
        return


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "—"


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# arrcoc CUDA graphs vs eager vs torch.compile — {report['device']}", "",
             f"torch {report['torch']}, encoder `{report['encoder']}` ({report['encoder_dtype']}), {report['date']}. "
             f"Median of {report['reps']} runs after warm-up; GPU ms from CUDA events, CPU issue µs from perf_counter "
             "around the call; budget = 25% of the patches.", "",
             f"Warm-up of sizes {report['warmup_sizes']} x batches {report['warmup_batches']} (compression and "
             f"relevance-only chains, {report['warmup']['captures']} captures, one pool): "
             f"**{report['warmup_seconds']:.2f} s**, {report['warmup']['bytes'] / 2**20:.0f} MiB of static outputs.", "",
             "| size | batch | eager ms | graphed ms | speed-up | compiled ms | graphed / compiled | eager issue µs | "
             "graphed issue µs | compiled issue µs | capture s | compile s | pool MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        note = "" if r.get("compile_backend", "inductor") == "inductor" else f" ({r['compile_backend']})"
        lines.append(f"| {r['size']} | {r['batch']} | {r['eager_ms']:.3f} | {r['graphed_ms']:.3f} | {r['speedup']:.1f}x | "
                     f"{_cell(r, 'compiled_ms', '{:.3f}')}{note} | {_cell(r, 'graphed_over_compiled', '{:.2f}')} | "
                     f"{r['eager_issue_us']:.0f} | {r['graphed_issue_us']:.1f} | {_cell(r, 'compiled_issue_us', '{:.1f}')} | "
                     f"{r['capture_s']:.2f} | {_cell(r, 'compile_s', '{:.1f}')} | {r['pool_bytes'] / 2**20:.1f} |")
    errors = {f"{r['size']}x{r['batch']}": r["compile_errors"] for r in report["results"] if "compile_errors" in r}
    if errors:
        lines += ["", "torch.compile failures (the cell then times the next backend that worked):", ""]
        lines += [f"- {case} {backend}: `{message}`" for case, d in errors.items() for backend, message in d.items()]
    lines += ["", "Per stage, speed-up of the graphed stage over the eager stage (GPU ms eager → graphed):", "",
              "| size | batch | encode | score | balance | allocate | compress |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        cells = [f"{r['eager_stage_ms'][n]:.3f} → {r['graphed_stage_ms'][n]:.3f} ({r['stage_speedup'][n]:.1f}x)"
                 for n in ("encode", "score", "balance", "allocate", "compress")]
        lines.append(f"| {r['size']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the graph benchmark (CUDA only); returns an exit code."""
    parser = argparse.ArgumentParser(prog="arrcoc bench --graphs", description="CUDA graphs vs eager vs torch.compile.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024], help="bucket sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--preset", default="default", help="pipeline preset")
    parser.add_argument("--encoder", default=None, help="override the preset's timm encoder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="encoder dtype")
    parser.add_argument("--compile", nargs="*", default=["224x1", "512x1", "224x64"],
                        help="SIZExBATCH cases also timed with torch.compile(mode='reduce-overhead')")
    parser.add_argument("--reps", type=int, default=50, help="timed runs")
    parser.add_argument("--out", default="bench/results", help="output folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the graph benchmark needs a CUDA GPU")
    overrides: dict[str, Any] = {"encoder_dtype": args.dtype}
    if args.encoder:
        overrides["encoder"] = args.encoder
    config = PipelineConfig.from_name(args.preset, **overrides)

    warm = Pipeline(config.replace(buckets=(224, 384, 512, 768, 1024)), device="cuda")
    for size in warm.config.buckets:
        warm.encoder(size)  # build the bucket models first: the warm-up measures captures
    torch.cuda.synchronize()
    start = time.perf_counter()
    warm_stats = warm.warmup(batch_sizes=(1, 8, 64))
    torch.cuda.synchronize()
    warm_seconds = time.perf_counter() - start
    del warm
    torch.cuda.empty_cache()

    pipe = Pipeline(config.replace(buckets=tuple(args.sizes)), device="cuda")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "encoder": config.encoder,
                              "encoder_dtype": args.dtype, "date": datetime.date.today().isoformat(), "reps": args.reps,
                              "warmup_sizes": [224, 384, 512, 768, 1024],
                              "warmup_batches": [1, 8, 64], "warmup_seconds": warm_seconds,
                              "warmup": {k: v for k, v in warm_stats.items() if k != "per_entry"}, "results": []}
    for size in tqdm(args.sizes, desc="graphs"):
        for batch in args.batches:
            report["results"].append(time_graphs(pipe, size, batch, reps=args.reps))
            pipe.graph_cache.clear()
            torch.cuda.empty_cache()
    for result in report["results"]:  # compiled last: its CUDA graph trees stay resident
        if f"{result['size']}x{result['batch']}" in args.compile:
            time_compiled(pipe, result, reps=args.reps)
    write_report(report, _markdown(report), args.out, f"graphs-{report['device']}", args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
