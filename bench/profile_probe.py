"""Where the GPU time goes: kernel tables (torch.profiler) of the Qwen-VL vision tower and the data-set job.

    python bench/profile_probe.py qwen --out DIR        the packed vision tower at batch 1 and 8, and prepare at 11%
    python bench/profile_probe.py dataset --out DIR     compress-dataset on the photo set and the benchmark set
    python bench/profile_probe.py syncs --out DIR       every host sync of the Qwen-VL adapter's generate at 11%
    python bench/profile_probe.py qwen-pruned --out DIR  prepare at 11%, batch 8, pruning after block 7: each step

Each part writes ``<part>-<case>.txt``: wall milliseconds, the summed kernel time, and the top kernels; ``syncs``
writes each distinct call stack that synchronised (``torch.cuda.set_sync_debug_mode("warn")``) and how often.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def _profiled(fn, out: Path, name: str, rows: int = 30) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    text = [f"{name}: wall {wall:.1f} ms, kernels {kernels:.1f} ms"]
    ranges = [e for e in events if e.key.startswith("arrcoc_")]  # the named steps (qwen): host and device ms
    text += [
        f"  {e.key}: host {e.cpu_time_total / 1e3:.2f} ms, device {e.device_time_total / 1e3:.2f} ms" for e in ranges
    ]
    text.append(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    (out / f"{name}.txt").write_text("\n".join(text))
    print(text[0], flush=True)


def qwen(out: Path) -> None:
    import functools

    from torch.profiler import record_function

    from arrcoc.integrations.vision_tower import pack_vision_tower
    from arrcoc.tools import bench_qwen as bq

    device = torch.device("cuda")
    model = bq.build_qwen("qwen2.5-vl-7b", device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    adapter = bq.qwen_adapter(model)
    images = adapter.image_processor
    pack_vision_tower(model)
    # each step of prepare as a named range, so that its device time shows as one row of the table
    for name in ("_groups", "_image_features", "_rgb", "_visual", "_reduce_budgets", "_positions"):
        method = getattr(adapter, name)

        def ranged(*args, _method=method, _name=name, **kwargs):
            with record_function(f"arrcoc{_name}"):
                return _method(*args, **kwargs)

        setattr(adapter, name, functools.wraps(method)(ranged))
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    for batch in (1, 8):
        inputs = images(images=bq._images(size, batch), return_tensors="pt")
        pixels = {
            "pixel_values": inputs["pixel_values"].to(device),
            "image_grid_thw": inputs["image_grid_thw"].to(device),
        }
        with torch.inference_mode():
            prompts = [bq.QUESTION] * batch
            calls = {
                "vision": lambda p=pixels: adapter.merged_features(p["pixel_values"], p["image_grid_thw"]),
                "prepare11": lambda p=pixels, q=prompts: adapter.prepare(p, q, 0.11),
            }
            for name, call in calls.items():
                _profiled(call, out, f"qwen-{name}-b{batch}")


def qwen_pruned(out: Path) -> None:
    """``prepare`` at 11%, batch 8, pruning inside the tower after block 7, the head at width 256: each step
    (the tower's first blocks, the merger at block 7, the colour grid, the padded batch and query, the head, the
    tail, positions) as a named range, so that arrcoc's own time beside the tower's shows step by step."""
    import functools

    from torch.profiler import record_function

    from arrcoc.integrations import qwen as qwen_module
    from arrcoc.integrations.vision_tower import pack_vision_tower
    from arrcoc.tools import bench_qwen as bq

    device = torch.device("cuda")
    model = bq.build_qwen("qwen2.5-vl-7b", device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    adapter = bq.qwen_adapter(model, prune_after="auto", score_width="auto", compile_reducer=True)
    pack_vision_tower(model, compile=True, dynamic=False)

    def ranged(fn, name):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with record_function(f"arrcoc_{name}"):
                return fn(*args, **kwargs)

        return call

    for name in ("_groups", "_rgb", "_visual", "_reduce_budgets", "_tower_tail", "_positions"):
        setattr(adapter, name, ranged(getattr(adapter, name), name))
    for name in ("tower_plan", "tower_head", "tower_merged"):
        setattr(qwen_module, name, ranged(getattr(qwen_module, name), name))
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    inputs = adapter.image_processor(images=bq._images(size, 8), return_tensors="pt")
    pixels = {"pixel_values": inputs["pixel_values"].to(device), "image_grid_thw": inputs["image_grid_thw"].to(device)}
    with torch.inference_mode():
        adapter.prepare(pixels, [bq.QUESTION] * 8, 0.11)  # compiles and captures outside the profile
        _profiled(lambda: adapter.prepare(pixels, [bq.QUESTION] * 8, 0.11), out, "qwen-pruned-prepare11-b8")


def dataset(out: Path) -> None:
    from arrcoc.config import PipelineConfig
    from arrcoc.datasets.compress_dataset import compress_dataset
    from arrcoc.pipeline import BATCH_BUCKETS, Pipeline
    from arrcoc.tools.bench_dataset import make_images

    work = Path(tempfile.mkdtemp(prefix="probe-"))
    sets = {
        "photos": (make_images(work / "photos", 640, sides=(640, 1600), seed=1), (224, 384)),
        "benchmark": (make_images(work / "images", 1280, small_share=0.7), None),
    }
    for name, (folder, buckets) in sets.items():
        overrides = {"encoder_dtype": "bfloat16", **({"buckets": buckets} if buckets else {})}
        config = PipelineConfig.from_name("default", **overrides)
        pipe = Pipeline(config, device=torch.device("cuda"))
        pipe.warmup(
            sizes=tuple(b for b in config.buckets if b <= 384),
            batch_sizes=[b for b in BATCH_BUCKETS if b <= 64],
            budget=64,
        )

        def run(folder: Path = folder, pipe: Pipeline = pipe) -> None:
            shutil.rmtree(work / "out", ignore_errors=True)
            compress_dataset(
                folder,
                work / "out",
                pipe,
                64,
                batch_size=64,
                workers=12,
                shard_size=1000,
                token_dtype=torch.float16,
                progress=False,
            )

        _profiled(run, out, f"dataset-{name}", rows=40)
    shutil.rmtree(work, ignore_errors=True)


def syncs(out: Path) -> None:
    import collections
    import traceback
    import warnings

    from arrcoc.integrations.vision_tower import pack_vision_tower
    from arrcoc.tools import bench_qwen as bq

    device = torch.device("cuda")
    model = bq.build_qwen("qwen2.5-vl-7b", device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    adapter = bq.qwen_adapter(model)
    pack_vision_tower(model, compile=True)
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    for batch in (1, 8):
        inputs = adapter.image_processor(images=bq._images(size, batch), return_tensors="pt")
        pixels = {k: inputs[k].to(device) for k in ("pixel_values", "image_grid_thw")}
        prompts = [bq.QUESTION] * batch
        with torch.inference_mode():
            for _ in range(3):  # compile, capture, warm
                adapter.generate(pixels, prompts, 0.11, max_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            prepared = adapter.prepare(pixels, prompts, 0.11)
            issued = time.perf_counter() - start
            torch.cuda.synchronize()
            done = time.perf_counter() - start
            del prepared
            stacks: collections.Counter = collections.Counter()

            def record(message, category, filename, lineno, file=None, line=None, stacks=stacks) -> None:
                frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
                keep = [f for f in frames if "site-packages/torch/" not in f.filename][-6:]
                stacks["\n".join(f"  {f.filename.split('/')[-1]}:{f.lineno} {f.name}: {f.line}" for f in keep)] += 1

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    adapter.generate(pixels, prompts, 0.11, max_new_tokens=1, do_sample=False)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        text = [
            f"batch {batch}: prepare returned after {issued * 1e3:.1f} ms, its device work ended at {done * 1e3:.1f} ms"
        ]
        text += [f"{n} x\n{stack}" for stack, n in stacks.most_common()]
        (out / f"syncs-b{batch}.txt").write_text("\n".join(text))
        print(text[0], f"({sum(stacks.values())} syncs in generate, {len(stacks)} call sites)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["qwen", "qwen-pruned", "dataset", "syncs"])
    parser.add_argument("--out", default="/tmp/probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    {"qwen": qwen, "qwen-pruned": qwen_pruned, "dataset": dataset, "syncs": syncs}[args.part](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
