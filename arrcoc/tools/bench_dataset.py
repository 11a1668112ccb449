"""Benchmark of ``compress-dataset``: images/s at batch 64 on one GPU, where the time goes, and how busy the GPU is.

``python -m arrcoc.tools.bench_dataset`` generates two folders of random JPEGs (PIL, in a process pool): the
benchmark set (70% with a long side of 160-224 px, the rest 300-384 px) and a photo-sized set (long side
640-1,600 px). Per set and encoder dtype it builds a pipeline, captures its graphs, and runs
:func:`arrcoc.datasets.compress_dataset.compress_dataset` over the folder: once to warm up, once plain (images/s,
and the shares of the host's wall time: starting the reader, waiting for it, waiting for the decode thread,
resize, pipeline, copy-out, the wait for the last shard; the decode and writer threads' shares, which overlap
them; device milliseconds per step from CUDA events), once under ``torch.profiler`` (GPU busy = kernel and copy
time / wall time), and once through the Pillow path (``batch_decode=False``, DataLoader worker processes) to
report its images/s and start-up, the share of images whose allocation is identical to the batched path's and
the largest differences. With ``--scaling`` on a machine of several GPUs it runs the benchmark set under
``torchrun`` on 1, 2, 4, ... GPUs, and with ``--share-gpu K`` each set under ``torchrun`` on one GPU with one
process and with ``K`` (each rank warmed up as the in-process case is). Results go to
``<out>/dataset-<device>[-tag].json`` and ``.md``; ``--out`` is a scratch folder unless ``--out bench/results`` is
given.
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
import torch.distributed as dist
from tqdm import tqdm

from ..config import PipelineConfig
from ..datasets.compress_dataset import (
    _TOKEN_DTYPES,
    COMPILE_CHOICES,
    COMPILE_DEFAULT,
    DatasetStats,
    _Decode,
    _launch,
    compile_options,
    compress_dataset,
    list_sources,
)
from ..datasets.shards import INDEX_NAME, SHARD_DIR
from ..pipeline import BATCH_BUCKETS, Pipeline
from ..runtime.device import device_name
from .bench import _busy_ms, write_report

__all__ = ["main", "make_images"]

logger = logging.getLogger(__name__)


def _draw(job: tuple[str, int, int, float, tuple[int, int] | None]) -> None:
    """One random JPEG: smooth colour fields plus noise (so it decodes like a photo, not like a flat image)."""
    folder, index, seed, small_share, sides = job
    rng = np.random.default_rng([seed, index])
    if sides is not None:
        long = int(rng.integers(sides[0], sides[1] + 1))
    else:
        long = int(rng.integers(160, 225) if rng.random() < small_share else rng.integers(300, 385))
    short = int(long * rng.uniform(0.6, 1.0))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(Path(folder) / f"{index:06d}.jpg", quality=90)


def make_images(
    folder: str | os.PathLike[str],
    count: int,
    *,
    seed: int = 0,
    small_share: float = 0.7,
    processes: int | None = None,
    sides: tuple[int, int] | None = None,
) -> Path:
    """Write ``count`` random JPEGs to ``folder``: ``small_share`` with a long side of 160-224 px (the 224 bucket),
    the rest 300-384 px (the 384 bucket); or, with ``sides=(low, high)``, a long side drawn from that range.
    Returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(os.fspath(out), i, seed, small_share, sides) for i in range(count)]
    with Pool(processes or max(1, (os.cpu_count() or 2) - 1)) as pool:
        for _ in tqdm(pool.imap_unordered(_draw, jobs, chunksize=16), total=count, desc="images", unit="img"):
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
    loader = torch.utils.data.DataLoader(
        _Decode(list(enumerate(sources)), buckets), batch_size=16, num_workers=workers, collate_fn=list
    )
    start = time.perf_counter()
    count = sum(len(chunk) for chunk in loader)
    return count / (time.perf_counter() - start)


def _agreement(batched: Path, pil: Path) -> dict[str, Any]:
    """The batched path's shards against the Pillow path's: identical allocations, largest differences."""
    from safetensors import safe_open

    index_a = (batched / INDEX_NAME).read_text().splitlines()
    index_b = (pil / INDEX_NAME).read_text().splitlines()
    status_a = [json.loads(line)["status"] for line in index_a]
    status_b = [json.loads(line)["status"] for line in index_b]
    images = same = 0
    most_tokens = most_value = 0.0
    for path in sorted((pil / SHARD_DIR).glob("*.safetensors")):
        with safe_open(os.fspath(path), "pt") as b, safe_open(os.fspath(batched / SHARD_DIR / path.name), "pt") as a:
            if "allocation" not in b.keys():
                continue
            alloc_a, alloc_b = a.get_tensor("allocation"), b.get_tensor("allocation")
            rows = alloc_b.shape[0]
            same += int((alloc_a == alloc_b).flatten(1).all(1).sum())
            images += rows
            most_tokens = max(most_tokens, float((alloc_a - alloc_b).abs().max()))
            tokens_a, tokens_b = a.get_tensor("tokens").float(), b.get_tensor("tokens").float()
            most_value = max(most_value, float((tokens_a - tokens_b).abs().max()))
    return {
        "images": images,
        "identical_allocation_share": same / images if images else float("nan"),
        "max_region_token_difference": most_tokens,
        "max_token_value_difference": most_value,
        "same_statuses": status_a == status_b,
    }


def _warm_up(pipe: Pipeline, options: dict[str, Any], batch_size: int, budget: int) -> None:
    """Capture the graphs of the set's buckets up to 384 px at the batch sizes the job meets."""
    pipe.warmup(
        sizes=tuple(b for b in pipe.config.buckets if b <= 384) or None,
        batch_sizes=[batch_size] if options["compile"] else [b for b in BATCH_BUCKETS if b <= batch_size],
        budget=budget,
    )


def _case(
    name: str,
    images: Path,
    work: Path,
    args: argparse.Namespace,
    dtype: str,
    graphs: bool,
    buckets: tuple[int, ...] | None,
) -> dict[str, Any]:
    """Build, capture, then a warm-up, a plain, a profiled and a Pillow-path run over ``images``."""
    device = torch.device(args.device)
    overrides: dict[str, Any] = {"encoder_dtype": dtype}
    if buckets:
        overrides["buckets"] = buckets
    config = PipelineConfig.from_name(args.preset, **overrides)
    options = compile_options(args.compile, args.batch_size, device)  # as compress-dataset's
    pipe = Pipeline(config, device=device, cuda_graphs=graphs, **options)
    start = time.perf_counter()
    _warm_up(pipe, options, args.batch_size, args.budget)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe.wait_for_compile()  # --compile background: the figures are the compiled graphs' that take over
    compile_wait_s = time.perf_counter() - start
    common = dict(
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        token_dtype=_TOKEN_DTYPES[args.token_dtype],
        progress=False,
    )

    def run(folder: str, keep: bool = False, **extra: Any) -> DatasetStats:
        dest = work / folder
        shutil.rmtree(dest, ignore_errors=True)
        workers = args.workers if extra.get("batch_decode") is False else args.readers
        stats = compress_dataset(images, dest, pipe, args.budget, workers=workers, **common, **extra)
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)
        return stats

    run("warm")  # first batches: cuDNN/cuBLAS heuristics, nvJPEG, allocator, page cache
    plain = run("plain", keep=True)
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
    agreement: dict[str, Any] = {}
    pil: DatasetStats | None = None
    if args.agreement:
        pil = run("pil", keep=True, batch_decode=False)
        agreement = _agreement(work / "plain", work / "pil")
        shutil.rmtree(work / "pil", ignore_errors=True)
    shutil.rmtree(work / "plain", ignore_errors=True)
    wall = plain.seconds
    shares = {
        "startup": plain.startup_seconds,  # the reader's thread pool
        "loader_wait": plain.wait_seconds,
        "decode": plain.decode_seconds,
        "resize": plain.resize_seconds,
        "pipeline": plain.pipeline_seconds,
        "copy_out": plain.copy_seconds,
        "drain": plain.drain_seconds,
    }
    shares = {key: value / wall for key, value in shares.items()}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    shares["decode_thread"] = plain.decode_thread_seconds / wall  # overlaps the others
    shares["write_thread"] = plain.write_seconds / wall  # overlaps the others
    running = wall - plain.startup_seconds - plain.drain_seconds  # what a long run's per-image cost approaches
    return {
        "set": name,
        "encoder_dtype": dtype,
        "cuda_graphs": graphs,
        "buckets": list(config.buckets),
        "warmup_s": warmup_s,
        "compile_wait_s": compile_wait_s,
        "images": plain.images,
        "readers": plain.readers,
        "errors": plain.errors,
        "device_decoded": plain.device_decoded,
        "host_decoded": plain.host_decoded,
        "images_per_s": plain.images_per_second,
        "seconds": wall,
        "host_shares": shares,
        "running_images_per_s": plain.images / running if running > 0 else float("nan"),
        "gpu_ms": plain.gpu_ms,
        "gpu_busy_ms": busy_ms,
        "gpu_busy_share": busy_ms / 1e3 / profiled.seconds,
        "profiled_images_per_s": profiled.images_per_second,
        "profiler_error": profiler_error,
        "pil_images_per_s": pil.images_per_second if pil else None,
        "pil_startup_s": pil.startup_seconds if pil else None,  # the DataLoader's worker processes
        "agreement": agreement,
        "graph_cache": {k: v for k, v in pipe.graph_cache.stats().items() if isinstance(v, (int, float))},
    }


def _rank_job(spec_path: Path) -> int:
    """One process of a torchrun case (``--rank-job``): join the group, build and warm up the case's pipeline on
    this rank's GPU, run the job over the set once to warm up and once measured, and write the measured stats."""
    spec = json.loads(spec_path.read_text())
    launch = _launch(spec["device"], 10)
    try:
        overrides: dict[str, Any] = {"encoder_dtype": spec["dtype"]}
        if spec["buckets"]:
            overrides["buckets"] = tuple(spec["buckets"])
        options = compile_options(spec["compile"], spec["batch_size"], launch.device)
        pipe = Pipeline(PipelineConfig.from_name(spec["preset"], **overrides), device=launch.device, **options)
        _warm_up(pipe, options, spec["batch_size"], spec["budget"])
        pipe.wait_for_compile()
        for run in ("warm", "measured"):
            stats = compress_dataset(
                spec["images"],
                spec_path.parent / run,
                pipe,
                spec["budget"],
                batch_size=spec["batch_size"],
                workers=spec["readers"],
                shard_size=spec["shard_size"],
                token_dtype=_TOKEN_DTYPES[spec["token_dtype"]],
                progress=False,
            )
        (spec_path.parent / f"stats-{launch.rank}.json").write_text(json.dumps(stats.to_dict()))
    finally:
        if launch.owns_group:
            dist.destroy_process_group()
    return 0


def _torchrun_case(
    name: str,
    images: Path,
    buckets: tuple[int, ...] | None,
    work: Path,
    args: argparse.Namespace,
    processes: int,
    gpus: int,
    shard_size: int | None = None,
) -> dict[str, Any]:
    """Images/s of ``processes`` ranks under torchrun on the first ``gpus`` GPUs (total images / slowest rank's
    seconds), each rank's run measured after a warm-up run as the in-process case's is; shards of ``shard_size``
    (default ``--shard-size``)."""
    case = work / f"torchrun-{name}-{processes}-on-{gpus}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    spec = {
        "images": os.fspath(images),
        "buckets": list(buckets) if buckets else None,
        "dtype": args.dtypes[0],
        "device": args.device,
        **{k: getattr(args, k) for k in ("preset", "compile", "batch_size", "budget", "readers", "token_dtype")},
        "shard_size": shard_size or args.shard_size,
    }
    (case / "spec.json").write_text(json.dumps(spec))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command += ["-m", "arrcoc.tools.bench_dataset", "--rank-job", os.fspath(case / "spec.json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(visible.split(",")[:gpus])}  # the first `gpus` GPUs
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result: dict[str, Any] = {"set": name, "processes": processes, "gpus": gpus, "encoder_dtype": spec["dtype"]}
    result["shard_size"] = spec["shard_size"]
    if done.returncode != 0:
        shutil.rmtree(case, ignore_errors=True)
        return {**result, "error": done.stderr[-2000:]}
    ranks = [json.loads(p.read_text()) for p in sorted(case.glob("stats-*.json"))]
    total, slowest = sum(r["images"] for r in ranks), max(r["seconds"] for r in ranks)
    shutil.rmtree(case, ignore_errors=True)
    return {
        **result,
        "images": total,
        "seconds": slowest,
        "images_per_s": total / slowest,
        "decode_thread_share": max(r["decode_thread_seconds"] / r["seconds"] for r in ranks),
    }


def _speedups(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result's images/s over its set's one-process result."""
    base = {r["set"]: r["images_per_s"] for r in results if r["processes"] == 1 and "images_per_s" in r}
    for r in results:
        if r["set"] in base and "images_per_s" in r:
            r["speedup"] = r["images_per_s"] / base[r["set"]]
    return results


def _scaling(images: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The benchmark set under torchrun on 1, 2, 4, ... GPUs, one process each."""
    counts = [k for k in (1, 2, 4, 8) if k <= torch.cuda.device_count()]
    if len(counts) < 2:
        logger.warning("--scaling: %d GPU visible; the scaling run needs 2 or more", torch.cuda.device_count())
    return _speedups([_torchrun_case("benchmark", images, None, work, args, k, k) for k in counts])


def _shared(
    sets: dict[str, tuple[Path, tuple[int, ...] | None]], work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each set under torchrun on one GPU: one process, then ``--share-gpu`` processes, in shards small enough that
    each of those processes gets two (a rank takes whole shards)."""
    results = []
    for name, (folder, buckets) in sets.items():
        shard_size = min(args.shard_size, -(-len(list_sources(folder)) // (2 * args.share_gpu)))
        for k in (1, args.share_gpu):
            results.append(_torchrun_case(name, folder, buckets, work, args, k, 1, shard_size))
    return _speedups(results)


def _jpeg_engines(device: torch.device) -> str:
    """Which decoder the batched path gives baseline JPEGs on ``device``."""
    from ..stages import _nvjpeg_hardware, gpu_input

    engine = _nvjpeg_hardware.decoder(device)
    if engine is None:
        return "torchvision's nvJPEG decode on the SMs" if device.type == "cuda" else "torchvision's, on the CPU"
    layout = f" ({engine.engines[0]} engines x {engine.engines[1]} cores)" if engine.engines else ""
    return (
        f"the GPU's JPEG engines{layout} for baseline colour files of {gpu_input.ENGINE_MIN_BYTES // 1024} KiB or more, "
        "torchvision's on the SMs for the rest"
    )


def _readers(report: dict[str, Any]) -> str:
    """The batched path's reader threads as run: compress-dataset's default unless ``--readers`` named a count."""
    used = sorted({c["readers"] for c in report["cases"] if "readers" in c})
    counts = "/".join(str(n) for n in used) or "?"
    if report["readers"] is None:
        return f"compress-dataset's default reader threads ({counts} here)"
    return f"{counts} reader threads"


def _compile_wait(report: dict[str, Any]) -> str:
    """With ``--compile background``: how long the compiled graphs took to take over, after the warm-up's captures
    (the measured runs start then)."""
    if report.get("compile") != "background":
        return ""
    waits = ", ".join(f"{r['compile_wait_s']:.1f} s" for r in report["cases"] if "compile_wait_s" in r)
    return f" (the compiled graphs took over after {waits or '?'} past the plain graphs' warm-up)"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# arrcoc compress-dataset — {report['device']}",
        "",
        f"torch {report['torch']}, torchvision {report['torchvision']}, preset `{report['preset']}`, "
        f"`--compile {report.get('compile', 'off')}`{_compile_wait(report)}, {report['date']}. Budget "
        f"{report['budget']}, batch {report['batch_size']}, {_readers(report)} on the "
        f"batched path, {report['workers']} DataLoader worker processes on the Pillow path, shards of "
        f"{report['shard_size']}, {report['token_dtype']} tokens. Sets: "
        + "; ".join(f"`{k}` {v}" for k, v in report["sets"].items())
        + f". JPEG decoding on the batched path: {report.get('jpeg_engines', '?')}. Pillow decoding alone (DataLoader, "
        f"no GPU, the benchmark set): {report['decode_images_per_s']:.0f} images/s.",
        "",
        "Reader threads read the files and their JPEG headers in this process (files that need Pillow are "
        "decoded there too); JPEGs are decoded by nvJPEG in one call per batch, in a decode thread that runs "
        "while the main thread gathers the next batch, and letterboxed on the GPU for the whole bucket (two "
        "Triton kernels reading each output pixel's filter taps); a writer thread puts each batch's rows in "
        "their places in the shard's file as its copies land, so that at a shard's end only its header is left to "
        "write. "
        "images/s: the whole run (the reader's start-up and the "
        "last shard's write included); running images/s: the same run without those two fixed costs, which "
        "a long job amortises (derived from the same run, not measured apart). GPU busy = kernel + copy time "
        "from torch.profiler / wall time of the profiled run. Host shares of the wall time (main thread): "
        "starting the reader (a thread pool; the Pillow path's DataLoader starts worker processes: "
        "Pillow start-up), waiting for the reader, waiting for the decode thread, resize (letterbox + batch "
        "assembly), pipeline calls, issuing the copies out, the wait for the last shard's write (drain), and "
        "the rest (per-image bookkeeping: sorting items into buckets, the progress bar); the decode and writer "
        "threads overlap them (the writer thread's share: waiting for each batch's copies, placing its rows, "
        "writing the files). GPU ms: the device timeline between CUDA events recorded around each step, "
        "summed over batches (gaps where the device waits for the host included; with the decode thread, "
        "steps of neighbouring batches can interleave, so they are approximate).",
        "",
        "| set | encoder | images/s | running images/s | GPU busy | start-up | loader wait | decode wait "
        "| resize | pipeline | copy-out | drain | other | decode thread | writer thread "
        "| GPU ms decode / resize / pipeline / copy | Pillow path images/s | Pillow start-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['set']} | {c['encoder_dtype']} | failed: {c['error'][:80]} |" + " |" * 15)
            continue
        h, g = c["host_shares"], c["gpu_ms"]
        pil = f"{c['pil_images_per_s']:.0f}" if c.get("pil_images_per_s") else "—"
        pil_startup = f"{c['pil_startup_s']:.2f} s" if c.get("pil_startup_s") is not None else "—"
        lines.append(
            f"| {c['set']} | {c['encoder_dtype']}{'' if c['cuda_graphs'] else ' eager'} | "
            f"{c['images_per_s']:.0f} | {c['running_images_per_s']:.0f} | {100 * c['gpu_busy_share']:.1f}% | "
            f"{100 * h['startup']:.1f}% | {100 * h['loader_wait']:.1f}% | "
            f"{100 * h['decode']:.1f}% | {100 * h['resize']:.1f}% | {100 * h['pipeline']:.1f}% | "
            f"{100 * h['copy_out']:.1f}% | {100 * h['drain']:.1f}% | {100 * h['other']:.1f}% | "
            f"{100 * h['decode_thread']:.1f}% | {100 * h['write_thread']:.1f}% | "
            f"{g['decode']:.0f} / {g['resize']:.0f} / {g['pipeline']:.0f} / {g['copy-out']:.0f} | {pil} | "
            f"{pil_startup} |"
        )
    agreed = [c for c in report["cases"] if c.get("agreement")]
    if agreed:
        lines += [
            "",
            "Same answers: the batched path (nvJPEG, GPU letterbox) against the Pillow path "
            "(Pillow decode, CPU letterbox in the workers), same pipeline, same batches.",
            "",
            "| set | encoder | images | identical allocation | largest region difference (tokens) "
            "| largest token value difference | same statuses |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for c in agreed:
            a = c["agreement"]
            lines.append(
                f"| {c['set']} | {c['encoder_dtype']} | {a['images']} | "
                f"{100 * a['identical_allocation_share']:.1f}% | {a['max_region_token_difference']:.0f} | "
                f"{a['max_token_value_difference']:.3g} | {a['same_statuses']} |"
            )
    torchrun = report.get("scaling", []) + report.get("shared", [])
    if torchrun:
        lines += [
            "",
            "Under torchrun, each rank's run after a warm-up run (images/s: all ranks' images / the slowest rank's "
            "seconds; decode thread: the busiest rank's share of its run):",
            "",
            "| set | encoder | processes | GPUs | shard size | images/s | speed-up | decode thread |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in torchrun:
            head = f"| {r['set']} | {r['encoder_dtype']} | {r['processes']} | {r['gpus']} | {r['shard_size']} |"
            lines.append(
                f"{head} failed: {r['error'][-80:]!r} | | |"
                if "error" in r
                else f"{head} {r['images_per_s']:.0f} | {r.get('speedup', float('nan')):.2f}x | "
                f"{100 * r['decode_thread_share']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns an exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m arrcoc.tools.bench_dataset",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="arrcoc-results",
        help="folder for the JSON and markdown results (pass bench/results to update the committed ones)",
    )
    parser.add_argument(
        "--work",
        default=None,
        help="scratch folder for images and outputs (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--images", type=int, default=2000, help="random JPEGs of the benchmark set")
    parser.add_argument("--small-share", type=float, default=0.7, help="share of images in the 224 px bucket")
    parser.add_argument("--photos", type=int, default=1000, help="photo-sized JPEGs (long side 640-1,600 px); 0: none")
    parser.add_argument(
        "--photo-buckets",
        type=int,
        nargs="+",
        default=[224, 384],
        help="the pipeline's buckets for the photo set (default 224 384: photos land in 384 px)",
    )
    parser.add_argument("--budget", type=int, default=64, help="tokens per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--readers",
        type=int,
        default=None,
        help="reader threads of the batched path (default: compress-dataset's, 1 for these all-JPEG sets)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(12, (os.cpu_count() or 2) - 2)),
        help="DataLoader worker processes of the Pillow path (default: the cores less two, at most 12)",
    )
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--token-dtype", default="float16", choices=sorted(_TOKEN_DTYPES))
    parser.add_argument("--preset", default="default")
    parser.add_argument(
        "--compile",
        default=COMPILE_DEFAULT,
        choices=sorted(COMPILE_CHOICES),
        help="as compress-dataset's --compile (auto: as the job would for these sets, which end before it decides)",
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="encoder dtypes to run")
    parser.add_argument("--eager", action="store_true", help="also run each dtype with CUDA graphs off")
    parser.add_argument(
        "--no-agreement",
        dest="agreement",
        action="store_false",
        help="skip the Pillow-path run and the comparison of allocations",
    )
    parser.add_argument("--scaling", action="store_true", help="also run under torchrun on 1, 2, 4, ... GPUs")
    parser.add_argument(
        "--share-gpu",
        type=int,
        default=0,
        metavar="K",
        help="also run each set under torchrun on one GPU with 1 and K processes (0: not)",
    )
    parser.add_argument("--rank-job", type=Path, default=None, help=argparse.SUPPRESS)  # a torchrun case's rank
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    if args.rank_job:
        return _rank_job(args.rank_job)
    if args.share_gpu == 1 or args.share_gpu < 0:
        parser.error(f"--share-gpu must be 0 (off) or 2 or more processes; got {args.share_gpu}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("arrcoc bench_dataset: needs a CUDA GPU (--device cpu only smoke-tests this script)", file=sys.stderr)
        return 2
    import torchvision

    work = Path(args.work or tempfile.mkdtemp(prefix="arrcoc-dataset-bench-"))
    sets: dict[str, tuple[Path, tuple[int, ...] | None]] = {"benchmark": (work / "images", None)}
    descriptions = {
        "benchmark": f"{args.images} JPEGs, {100 * args.small_share:.0f}% at 160-224 px, the rest 300-384 px"
    }
    start = time.perf_counter()
    shutil.rmtree(work / "images", ignore_errors=True)
    make_images(work / "images", args.images, small_share=args.small_share)
    if args.photos:
        shutil.rmtree(work / "photos", ignore_errors=True)
        make_images(work / "photos", args.photos, sides=(640, 1600), seed=1)
        sets["photos"] = (work / "photos", tuple(args.photo_buckets))
        descriptions["photos"] = (
            f"{args.photos} JPEGs, long side 640-1,600 px, buckets {', '.join(map(str, args.photo_buckets))}"
        )
    generate_s = time.perf_counter() - start
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": datetime.date.today().isoformat(),
        "preset": args.preset,
        "compile": args.compile,
        "sets": descriptions,
        "images": args.images,
        "photos": args.photos,
        "small_share": args.small_share,
        "budget": args.budget,
        "batch_size": args.batch_size,
        "readers": args.readers,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "token_dtype": args.token_dtype,
        "cpu_count": os.cpu_count(),
        "generate_s": generate_s,
        "shm_free_gib": _shm_free_gib(),
        "jpeg_engines": _jpeg_engines(device),
        "decode_images_per_s": _decode_rate(
            work / "images", PipelineConfig.from_name(args.preset).buckets, args.workers, args.images
        ),
        "cases": [],
    }
    cases = [(d, True) for d in args.dtypes] + ([(d, False) for d in args.dtypes] if args.eager else [])
    for name, (folder, buckets) in sets.items():
        for dtype, graphs in cases:
            try:
                report["cases"].append(_case(name, folder, work, args, dtype, graphs, buckets))
            except Exception as err:  # noqa: BLE001 - record the failure, keep the other cases
                logger.exception("case %s %s graphs=%s failed", name, dtype, graphs)
                report["cases"].append(
                    {
                        "set": name,
                        "encoder_dtype": dtype,
                        "cuda_graphs": graphs,
                        "error": f"{type(err).__name__}: {err}",
                    }
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.scaling and device.type == "cuda":
        report["scaling"] = _scaling(work / "images", work, args)
    if args.share_gpu:  # on the CPU: a smoke test of the launch
        report["shared"] = _shared(sets, work, args)
    write_report(report, _markdown(report), args.out, f"dataset-{report['device']}", args.tag)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
