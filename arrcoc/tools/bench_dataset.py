"""Benchmark of ``compress-dataset``: images/s at batch 64 on one GPU, and how busy the GPU is.

``python -m arrcoc.tools.bench_dataset --out bench/results`` generates a folder of random JPEGs (PIL, in a process
pool), then per case (encoder dtype, CUDA graphs on/off) builds a pipeline, captures its graphs, and runs
:func:`arrcoc.datasets.compress_dataset.compress_dataset` twice over the folder: once plain (images/s, and where the
host's time went: waiting for the DataLoader, inside pipeline calls, writing shards), once under
``torch.profiler`` (GPU busy share = kernel and copy time / wall time). It also times decoding alone (the
DataLoader without the GPU). With ``--scaling`` on a machine of several GPUs it runs the command under
``torchrun`` on 1, 2, 4, ... GPUs and reports images/s and the speed-up. Results go to
``<out>/dataset-<device>[-tag].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import PipelineConfig
from ..datasets.compress_dataset import _TOKEN_DTYPES, DatasetStats, _Decode, compress_dataset, list_sources
from ..pipeline import BATCH_BUCKETS, Pipeline
from ..runtime.device import device_name
from .bench import _busy_ms, write_report

__all__ = ["main", "make_images"]

logger = logging.getLogger(__name__)


def _draw(job: tuple[str, int, int, float]) -> None:
    """One random JPEG: smooth colour fields plus noise (so it decodes like a photo, not like a flat image)."""
    folder, index, seed, small_share = job
    rng = np.random.default_rng([seed, index])
    long = int(rng.integers(160, 225) if rng.random() < small_share else rng.integers(300, 385))
    short = int(long * rng.uniform(0.6, 1.0))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(Path(folder) / f"{index:06d}.jpg", quality=90)


def make_images(folder: str | os.PathLike[str], count: int, *, seed: int = 0, small_share: float = 0.7,
                processes: int | None = None) -> Path:
    """Write ``count`` random JPEGs to ``folder``: ``small_share`` with a long side of 160-224 px (the 224 bucket),
    the rest 300-384 px (the 384 bucket). Returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(os.fspath(out), i, seed, small_share) for i in range(count)]
    with Pool(processes or max(1, (os.cpu_count() or 2) - 1)) as pool:
        for _ in tqdm(pool.imap_unordered(_draw, jobs, chunksize=64), total=count, desc="images", unit="img"):
            pass
    return out


def _shm_free_gib() -> float | None:
    """Free space of /dev/shm, where DataLoader workers hand decoded images over (None where there is none)."""
    try:
        info = os.statvfs("/dev/shm")
    except OSError:
        return None
    return info.f_bavail * info.f_frsize / 2**30


def _decode_rate(folder: Path, buckets: tuple[int, ...], workers: int, limit: int) -> float:
    """Images/s of the DataLoader alone (decode + resize to the bucket in ``workers`` processes)."""
    sources = list_sources(folder)[:limit]
    loader = torch.utils.data.DataLoader(_Decode(list(enumerate(sources)), buckets), batch_size=16,
                                         num_workers=workers, collate_fn=list)
    start = time.perf_counter()
    count = sum(len(chunk) for chunk in loader)
    return count / (time.perf_counter() - start)


def _case(images: Path, work: Path, args: argparse.Namespace, dtype: str, graphs: bool) -> dict[str, Any]:
    """Build, capture, then one plain and one profiled run over ``images``."""
    device = torch.device(args.device)
    config = PipelineConfig.from_name(args.preset, encoder_dtype=dtype)
    pipe = Pipeline(config, device=device, cuda_graphs=graphs)
    start = time.perf_counter()
    pipe.warmup(sizes=(224, 384), batch_sizes=[b for b in BATCH_BUCKETS if b <= args.batch_size], budget=args.budget)
    warmup_s = time.perf_counter() - start
    common = dict(batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                  token_dtype=_TOKEN_DTYPES[args.token_dtype], progress=False)

    def run(name: str) -> DatasetStats:
        dest = work / name
        shutil.rmtree(dest, ignore_errors=True)
        stats = compress_dataset(images, dest, pipe, args.budget, **common)
        shutil.rmtree(dest, ignore_errors=True)
        return stats

    run("warm")  # first batches: cuDNN/cuBLAS heuristics, allocator, page cache
    plain = run("plain")
    held: list[DatasetStats] = []
    profiler_error = None
    try:
        if device.type != "cuda":
            raise RuntimeError("no GPU (a smoke test of this script)")
        busy_ms = _busy_ms(lambda: held.append(run("profiled")), 1)
    except Exception as err:  # noqa: BLE001 - keep the plain run's figures when the profiler fails
        busy_ms, profiler_error = float("nan"), f"{type(err).__name__}: {err}"
        held[:] = [plain]
    profiled = held[0]
    wall = plain.seconds
    return {"encoder_dtype": dtype, "cuda_graphs": graphs, "warmup_s": warmup_s, "images": plain.images,
            "errors": plain.errors, "images_per_s": plain.images_per_second, "seconds": wall,
            "loader_wait_share": plain.wait_seconds / wall, "pipeline_share": plain.pipeline_seconds / wall,
            "write_share": plain.write_seconds / wall, "gpu_busy_ms": busy_ms,
            "gpu_busy_share": busy_ms / 1e3 / profiled.seconds, "profiled_images_per_s": profiled.images_per_second,
            "profiler_error": profiler_error, "graph_cache": {k: v for k, v in pipe.graph_cache.stats().items() if isinstance(v, (int, float))}}


def _scaling(images: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s under torchrun on 1, 2, 4, ... GPUs (total images / slowest rank's seconds)."""
    results = []
    counts = [k for k in (1, 2, 4, 8) if k <= torch.cuda.device_count()]
    if len(counts) < 2:
        logger.warning("--scaling: %d GPU visible; the scaling run needs 2 or more", torch.cuda.device_count())
    for k in counts:
        dest, stats_dir = work / f"scale-{k}", work / f"scale-{k}-stats"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(stats_dir, ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
                   "-m", "arrcoc.cli", "compress-dataset", os.fspath(images), os.fspath(dest), "--budget", str(args.budget),
                   "--preset", args.preset, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--shard-size", str(args.shard_size), "--quiet", "--stats-json", os.fspath(stats_dir / "{rank}.json")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"gpus": k, "error": done.stderr[-2000:]})
            continue
        ranks = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json"))]
        total, slowest = sum(r["images"] for r in ranks), max(r["seconds"] for r in ranks)
        results.append({"gpus": k, "images": total, "seconds": slowest, "images_per_s": total / slowest})
        shutil.rmtree(dest, ignore_errors=True)
    base = next((r["images_per_s"] for r in results if r.get("gpus") == 1 and "images_per_s" in r), None)
    for r in results:
        if base and "images_per_s" in r:
            r["speedup"] = r["images_per_s"] / base
    return results


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# arrcoc compress-dataset — {report['device']}", "",
             f"torch {report['torch']}, preset `{report['preset']}`, {report['date']}. {report['images']} random JPEGs "
             f"({100 * report['small_share']:.0f}% in the 224 px bucket, the rest 384 px), budget {report['budget']}, "
             f"batch {report['batch_size']}, {report['workers']} DataLoader workers, shards of {report['shard_size']}. "
             f"Decoding alone (DataLoader, no GPU): {report['decode_images_per_s']:.0f} images/s.", "",
             "GPU busy = kernel + copy time from torch.profiler / wall time of the profiled run; the shares of the "
             "host's wall time: waiting for decoded images, inside pipeline calls (results copied to the host "
             "included), writing shards.", "",
             "| encoder | CUDA graphs | images/s | GPU busy | waiting for loader | in pipeline | writing | capture s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['encoder_dtype']} | {c['cuda_graphs']} | failed: {c['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {c['encoder_dtype']} | {'on' if c['cuda_graphs'] else 'off'} | {c['images_per_s']:.0f} | "
                     f"{100 * c['gpu_busy_share']:.1f}% | {100 * c['loader_wait_share']:.1f}% | "
                     f"{100 * c['pipeline_share']:.1f}% | {100 * c['write_share']:.1f}% | {c['warmup_s']:.1f} |")
    if report.get("scaling"):
        lines += ["", "| GPUs (torchrun) | images/s | speed-up |", "|---:|---:|---:|"]
        for r in report["scaling"]:
            lines.append(f"| {r['gpus']} | {r.get('images_per_s', float('nan')):.0f} | {r.get('speedup', float('nan')):.2f}x |"
                         if "error" not in r else f"| {r['gpus']} | failed | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns an exit code."""
    parser = argparse.ArgumentParser(prog="python -m arrcoc.tools.bench_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and markdown results")
    parser.add_argument("--work", default=None, help="scratch folder for images and outputs (default: a temporary "
                                                     "folder, removed at the end)")
    parser.add_argument("--images", type=int, default=4000, help="random JPEGs to generate")
    parser.add_argument("--small-share", type=float, default=0.7, help="share of images in the 224 px bucket")
    parser.add_argument("--budget", type=int, default=64, help="tokens per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--token-dtype", default="float16", choices=sorted(_TOKEN_DTYPES))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="encoder dtypes to run")
    parser.add_argument("--eager", action="store_true", help="also run each dtype with CUDA graphs off")
    parser.add_argument("--scaling", action="store_true", help="also run under torchrun on 1, 2, 4, ... GPUs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("arrcoc bench_dataset: needs a CUDA GPU (--device cpu only smoke-tests this script)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="arrcoc-dataset-bench-"))
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    start = time.perf_counter()
    make_images(images, args.images, small_share=args.small_share)
    generate_s = time.perf_counter() - start
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "preset": args.preset, "images": args.images, "small_share": args.small_share, "budget": args.budget,
        "batch_size": args.batch_size, "workers": args.workers, "shard_size": args.shard_size,
        "token_dtype": args.token_dtype, "cpu_count": os.cpu_count(), "generate_s": generate_s,
        "shm_free_gib": _shm_free_gib(),
        "decode_images_per_s": _decode_rate(images, PipelineConfig.from_name(args.preset).buckets, args.workers,
                                            args.images),
        "cases": [],
    }
    cases = [(d, True) for d in args.dtypes] + ([(d, False) for d in args.dtypes] if args.eager else [])
    for dtype, graphs in cases:
        try:
            report["cases"].append(_case(images, work, args, dtype, graphs))
        except Exception as err:  # noqa: BLE001 - record the failure, keep the other cases
            logger.exception("case %s graphs=%s failed", dtype, graphs)
            report["cases"].append({"encoder_dtype": dtype, "cuda_graphs": graphs, "error": f"{type(err).__name__}: {err}"})
        torch.cuda.empty_cache()
    if args.scaling and device.type == "cuda":
        report["scaling"] = _scaling(images, work, args)
    write_report(report, _markdown(report), args.out, f"dataset-{report['device']}", args.tag)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
