"""Where the GPU time goes: kernel tables (torch.profiler) of the Qwen-VL vision tower and the data-set job.

    python bench/profile_probe.py qwen --out DIR        the packed vision tower at batch 1 and 8, and prepare at 11%
    python bench/profile_probe.py dataset --out DIR     compress-dataset on the photo set and the benchmark set

Each part writes ``<part>-<case>.txt``: wall milliseconds, the summed kernel time, and the top kernels.
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
    text.append(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    (out / f"{name}.txt").write_text("\n".join(text))
    print(text[0], flush=True)


def qwen(out: Path) -> None:

    from arrcoc.integrations.vision_tower import pack_vision_tower
    from arrcoc.tools import bench_qwen as bq

    device = torch.device("cuda")
    model = bq.build_qwen("qwen2.5-vl-7b", device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    adapter = bq.qwen_adapter(model)
    images = adapter.image_processor
    pack_vision_tower(model)
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    for batch in (1, 8):
        inputs = images(images=bq._images(size, batch), return_tensors="pt")
        pixels = {
            "pixel_values": inputs["pixel_values"].to(device),
            "image_grid_thw": inputs["image_grid_thw"].to(device),
        }
        with torch.inference_mode():
            prompts = [bq.QUESTION] * batch
            reference = adapter.reference_inputs(pixels, prompts)
            calls = {
                "vision": lambda p=pixels: adapter.merged_features(p["pixel_values"], p["image_grid_thw"]),
                "prepare11": lambda p=pixels, q=prompts: adapter.prepare(p, q, 0.11),
                "full-ttft": lambda r=reference: model.generate(**r, max_new_tokens=1, do_sample=False),
            }
            for name, call in calls.items():
                _profiled(call, out, f"qwen-{name}-b{batch}")


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["qwen", "dataset"])
    parser.add_argument("--out", default="/tmp/probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    {"qwen": qwen, "dataset": dataset}[args.part](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
