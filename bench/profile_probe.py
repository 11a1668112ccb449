"""Where the GPU time goes: kernel tables (torch.profiler) of the Qwen-VL vision tower and the data-set job.

    python bench/profile_probe.py qwen --out DIR        the packed vision tower at batch 1 and 8, and prepare at 11%
    python bench/profile_probe.py dataset --out DIR     compress-dataset on the photo set and the benchmark set
    python bench/profile_probe.py syncs --out DIR       every host sync of the Qwen-VL adapter's generate at 11%
    python bench/profile_probe.py qwen-host --out DIR   prepare at 11%: each step's host ms (batch 1 and 8, after
        the tower and pruned), the call's host and wall ms, the tower alone's
    python bench/profile_probe.py qwen-pruned --out DIR  prepare at 11%, batch 8, pruning after block 7: each step
    python bench/profile_probe.py dataset-steps --out DIR   each step of the batched input path alone (decode,
        letterbox by kernel and by matrix products, the pipeline): host and device ms per batch, whether a step
        waits for a busy stream; the whole job with either letterbox; a chrome trace of the job
    python bench/profile_probe.py nvjpeg-hardware --out DIR  the JPEG engines against torchvision's decode on the SMs:
        which files they take, their pixels against torchvision's, host and device ms per batch of 64, images/s of
        decoding alone and of the whole job, each way twice, interleaved
    python bench/profile_probe.py chain --out DIR     the whole chain's CUDA graph at 224 px bf16, batch 1 and 64: each
        kernel of its replays (torch.profiler, time and count per replay), with the replay's GPU ms
    python bench/profile_probe.py dataset-readers --out DIR  the job with 1-12 reader threads, with a 0.5 ms
        interpreter switch interval, with two batches decoded ahead, and with pageable reads, each twice, interleaved

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


def _reporter(path: Path):
    """``say(text)``: print a line and rewrite ``path`` with every line so far (a probe cut short keeps them)."""
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)
        path.write_text("\n".join(lines))

    return say


def _job(source: Path, dest: Path, pipe, readers: int):
    """``compress_dataset`` as the benchmark runs it: budget 64, batch 64, shards of 1000, float16 tokens."""
    from arrcoc.datasets.compress_dataset import compress_dataset

    shutil.rmtree(dest, ignore_errors=True)
    return compress_dataset(
        source,
        dest,
        pipe,
        64,
        batch_size=64,
        workers=readers,
        shard_size=1000,
        token_dtype=torch.float16,
        progress=False,
    )


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
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    text = [f"{name}: wall {wall:.1f} ms, kernels {kernels:.1f} ms in {launches} device calls"]
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
    for name in ("_groups", "_image_features", "_rgb", "_reduce_all", "_run", "_text_positions"):
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

    for name in ("_groups", "_rgb", "_reduce_all", "_run", "_tower_tail", "_text_positions"):
        setattr(adapter, name, ranged(getattr(adapter, name), name))
    for name in ("tower_plan", "tower_head", "tower_merged"):
        setattr(qwen_module, name, ranged(getattr(qwen_module, name), name))
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    inputs = adapter.image_processor(images=bq._images(size, 8), return_tensors="pt")
    pixels = {"pixel_values": inputs["pixel_values"].to(device), "image_grid_thw": inputs["image_grid_thw"].to(device)}
    with torch.inference_mode():
        adapter.prepare(pixels, [bq.QUESTION] * 8, 0.11)  # compiles and captures outside the profile
        _profiled(lambda: adapter.prepare(pixels, [bq.QUESTION] * 8, 0.11), out, "qwen-pruned-prepare11-b8")


def qwen_host(out: Path) -> None:
    """Where the host's time goes in ``prepare`` at 11% (issue 23: at batch 1 the host's pace, not the device's
    work, sets arrcoc's own time). The benchmark's setting: Qwen2.5-VL-7B-shaped, bf16, 1,280 x 960, the tower
    packed and each block compiled, the reducer compiled; after the tower and pruned after block 7, batch 1 and 8.
    Each step's host milliseconds (``perf_counter`` around the call, no sync; nested steps are shown indented and
    are inside their parent's time), the call's host total (returned, nothing waited for) and its synchronised
    wall, and the tower alone's host and wall; medians of 30 calls. Writes ``qwen-host.md``."""
    import functools
    import statistics
    from collections import defaultdict

    import torch._dynamo as dynamo

    from arrcoc.integrations import qwen as qwen_module
    from arrcoc.integrations.vision_tower import pack_vision_tower
    from arrcoc.tools import bench_qwen as bq

    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    device = torch.device("cuda")
    model = bq.build_qwen("qwen2.5-vl-7b", device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    pack_vision_tower(model, compile=True, dynamic=False)
    spent: defaultdict[str, list[float]] = defaultdict(list)
    recording = [False]
    adapter_steps = (
        "_image_features",
        "_tokenize",
        "_text_positions",
        "_groups",
        "_rgb",
        "_reduce_all",
        "_group_inputs",
        "_capacity",
        "_run",
        "plan",
        "_tower_tail",
    )
    module_steps = ("_sent_all", "tower_head", "tower_merged")
    nested = {"_group_inputs", "_capacity", "_run"}

    def timed(fn, name):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if recording[0]:  # inside prepare, not the tower alone
                    spent[name][-1] += time.perf_counter() - start

        return call

    for name in module_steps:
        setattr(qwen_module, name, timed(getattr(qwen_module, name), name))
    size = bq.PRESETS["qwen2.5-vl-7b"][2]
    lines = [
        f"# Qwen-VL prepare at 11%: the host's time by step — {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__}; `python bench/profile_probe.py qwen-host`, see its docstring. Host ms: "
        "`perf_counter` around each call, nothing waited for; median of 30 calls.",
    ]
    adapters = {prune: bq.qwen_adapter(model, prune_after=prune, compile_reducer=True) for prune in ("auto", None)}
    for adapter in adapters.values():
        for name in adapter_steps:
            setattr(adapter, name, timed(getattr(adapter, name), name))
    for batch in (1, 8):  # batch 1 first, pruned first: issue 23's share is missed there
        for prune, adapter in adapters.items():
            inputs = adapter.image_processor(images=bq._images(size, batch), return_tensors="pt")
            pixels = {k: inputs[k].to(device) for k in ("pixel_values", "image_grid_thw")}
            prompts = [bq.QUESTION] * batch
            host, wall, tower_host, tower_wall = [], [], [], []
            with torch.inference_mode():
                for _call in range(40):  # the first ten compile, capture and warm
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    adapter.merged_features(pixels["pixel_values"], pixels["image_grid_thw"])
                    issued = time.perf_counter()
                    torch.cuda.synchronize()
                    tower_host.append(issued - start)
                    tower_wall.append(time.perf_counter() - start)
                    for name in (*adapter_steps, *module_steps):  # prepare's steps from here
                        spent[name].append(0.0)
                    recording[0] = True
                    start = time.perf_counter()
                    adapter.prepare(pixels, prompts, 0.11)
                    issued = time.perf_counter()
                    recording[0] = False
                    torch.cuda.synchronize()
                    host.append(issued - start)
                    wall.append(time.perf_counter() - start)
            ms = lambda v: f"{1e3 * statistics.median(v[10:]):.2f}"  # noqa: E731
            path = "after the tower" if prune is None else f"pruned after block {adapter.prune_after}"
            lines += [
                "",
                f"## {path}, batch {batch}",
                "",
                f"prepare: host {ms(host)} ms, wall {ms(wall)} ms; the tower alone (`merged_features`): host "
                f"{ms(tower_host)} ms, wall {ms(tower_wall)} ms",
                "",
                "| step | host ms |",
                "|---|---:|",
            ]
            for name in (*adapter_steps, *module_steps):
                values = spent[name][-40:][10:]
                if any(values):
                    label = f"&nbsp;&nbsp;{name} (in _reduce_all)" if name in nested else name
                    lines.append(f"| {label} | {1e3 * statistics.median(values):.2f} |")
            with torch.inference_mode():  # the kernels of one call, profiled apart from the timing above
                _profiled(
                    functools.partial(adapter.prepare, pixels, prompts, 0.11),
                    out,
                    f"qwen-host-{prune or 'post'}-b{batch}",
                )
            top = [
                sum(spent[n][-40:][i] for n in (*adapter_steps, *module_steps) if n not in nested) for i in range(40)
            ]
            rest = [h - t for h, t in zip(host, top)]
            lines.append(f"| the rest of prepare (embedding, slot and position writes, bookkeeping) | {ms(rest)} |")
            print("\n".join(lines[-14:]), flush=True)
            (out / "qwen-host.md").write_text("\n".join(lines) + "\n")  # after each case: a cut run keeps the rest


def dataset(out: Path) -> None:
    from arrcoc.config import PipelineConfig
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
            _job(folder, work / "out", pipe, 12)

        _profiled(run, out, f"dataset-{name}", rows=40)
    shutil.rmtree(work, ignore_errors=True)


def dataset_steps(out: Path) -> None:
    import statistics

    from arrcoc.tools.bench_dataset import make_images

    work = Path(tempfile.mkdtemp(prefix="probe-"))
    say = _reporter(out / "dataset-steps.txt")

    def device_ms(fn, *args, **kwargs) -> tuple[float, float, object]:
        """(host ms for ``fn(*args, **kwargs)`` to return, device ms between events around it, its result), from an
        idle device."""
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        begin.record()
        result = fn(*args, **kwargs)
        end.record()
        host = (time.perf_counter() - start) * 1e3
        end.synchronize()
        return host, begin.elapsed_time(end), result

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}"

    sets = {
        "photos": (make_images(work / "photos", 640, sides=(640, 1600), seed=1), (224, 384)),
        "benchmark": (make_images(work / "images", 1280, small_share=0.7), (224, 384)),
    }
    for name, (folder, buckets) in sets.items():
        try:
            _dataset_set(name, folder, buckets, out, work, say, device_ms, med)
        except Exception:  # a probe: report and go on to the next set
            import traceback

            say(traceback.format_exc())
    shutil.rmtree(work, ignore_errors=True)


def _dataset_set(name, folder, buckets, out, work, say, device_ms, med) -> None:
    import functools
    import gzip

    from arrcoc.config import PipelineConfig
    from arrcoc.pipeline import BATCH_BUCKETS, Pipeline
    from arrcoc.stages import gpu_input
    from arrcoc.stages.gpu_input import decode_jpegs, jpeg_file, letterbox, placement
    from arrcoc.stages.preprocess import PreprocessedBatch

    device = torch.device("cuda")
    config = PipelineConfig.from_name("default", encoder_dtype="bfloat16", buckets=buckets)
    pipe = Pipeline(config, device=device)
    pipe.warmup(sizes=buckets, batch_sizes=[b for b in BATCH_BUCKETS if b <= 64], budget=64)
    files = sorted(str(p) for p in folder.iterdir())
    grouped: dict[int, list] = {}
    for path in files:
        data, (h, w) = jpeg_file(path)
        bucket, scale, content = placement(h, w, buckets)
        grouped.setdefault(bucket, []).append((data, content, path))
    batches = [(b, items[i : i + 64]) for b, items in grouped.items() for i in range(0, len(items) - 63, 64)]
    say(f"== {name}: {len(batches)} full batches of 64 ({', '.join(f'{b}: {len(v)}' for b, v in grouped.items())})")
    decode_host, decode_dev, decoded = [], [], []
    for bucket, items in batches:
        host, dev, images = device_ms(decode_jpegs, [d for d, _, _ in items], device)
        decode_host.append(host)
        decode_dev.append(dev)
        decoded.append((bucket, images, [c for _, c, _ in items]))
    say(f"decode alone: host {med(decode_host)} ms, device {med(decode_dev)} ms per batch (median)")
    pinned_host = []
    for _, items in batches:  # the same files read into page-locked memory, as the job reads them on CUDA
        pinned = [jpeg_file(path, pinned=True)[0] for _, _, path in items]
        pinned_host.append(device_ms(decode_jpegs, pinned, device)[0])
    say(f"decode alone, the bytes in pinned memory: host {med(pinned_host)} ms per batch (median)")
    made = {}
    for kernel in (True, False):
        gpu_input.USE_KERNEL = kernel
        hosts, devs = [], []
        for _ in range(2):  # the first round compiles the kernels
            hosts, devs, made[kernel] = [], [], []
            for bucket, images, sizes in decoded:
                host, dev, result = device_ms(letterbox, images, sizes, bucket)
                hosts.append(host)
                devs.append(dev)
                made[kernel].append(result)
        say(f"letterbox {'kernel' if kernel else 'matmul'}: host {med(hosts)} ms, device {med(devs)} ms per batch")
    diff = max((a[0] - b[0]).abs().max().item() for a, b in zip(made[True], made[False]))
    say(f"kernel vs matmul pixels: largest difference {diff:.2e} (in [0, 1])")
    gpu_input.USE_KERNEL = True
    runs = []
    for (bucket, _images, sizes), (pixels, valid) in zip(decoded, made[True]):
        batch = PreprocessedBatch(
            pixels=pixels,
            valid=valid,
            scale=torch.ones(len(sizes)),
            source_size=torch.tensor(sizes),
            content_size=torch.tensor(sizes),
            indices=list(range(len(sizes))),
            names=[str(i) for i in range(len(sizes))],
            bucket=bucket,
        )
        runs.append(batch)
    hosts, devs = [], []
    for batch in runs * 2:
        host, dev, _ = device_ms(pipe, batch, budget=64, copy=False)
        hosts.append(host)
        devs.append(dev)
    say(f"pipeline alone: host {med(hosts)} ms, device {med(devs)} ms per batch")
    # does a step wait for work already queued? A 30 ms sleep kernel first, then the host time of the call
    bucket, images, sizes = decoded[0]
    for label, call in (
        ("letterbox kernel", functools.partial(letterbox, images, sizes, bucket)),
        ("pipeline", functools.partial(pipe, runs[0], budget=64, copy=False)),
        ("decode", functools.partial(decode_jpegs, [d for d, _, _ in batches[0][1]], device)),
    ):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(30e-3 * 1.98e9))  # about 30 ms at the H200's clock
        start = time.perf_counter()
        call()
        host = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        say(f"{label} behind a 30 ms kernel: returned after {host:.1f} ms")
    for kernel, workers in ((True, 12), (False, 12), (True, 4), (True, 12), (False, 12), (True, 4)):
        gpu_input.USE_KERNEL = kernel
        stats = _job(folder, work / "out", pipe, workers)
        shares = {
            k: f"{100 * getattr(stats, k) / stats.seconds:.0f}%"
            for k in (
                "wait_seconds",
                "decode_seconds",
                "resize_seconds",
                "pipeline_seconds",
                "copy_seconds",
                "drain_seconds",
                "decode_thread_seconds",
                "write_seconds",
            )
        }
        gpu = {k: round(v) for k, v in stats.gpu_ms.items()}
        say(
            f"job, letterbox {'kernel' if kernel else 'matmul'}, {workers} readers: {stats.images_per_second:.0f} "
            f"images/s; {shares}; gpu ms {gpu}"
        )
    gpu_input.USE_KERNEL = True
    listing = work / f"{name}.txt"  # a share of the set, so that the trace stays small
    listing.write_text("\n".join(files[:384]) + "\n")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _job(listing, work / "out", pipe, 12)
    trace = work / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(out / f"trace-{name}.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    say(f"trace: {(out / f'trace-{name}.json.gz').stat().st_size / 2**20:.1f} MiB")


def nvjpeg_hardware(out: Path) -> None:
    import statistics

    from arrcoc.config import PipelineConfig
    from arrcoc.pipeline import BATCH_BUCKETS, Pipeline
    from arrcoc.stages import _nvjpeg_hardware, gpu_input
    from arrcoc.stages.gpu_input import decode_jpegs, jpeg_file
    from arrcoc.tools.bench_dataset import make_images

    say = _reporter(out / "nvjpeg-hardware.txt")

    device = torch.device("cuda")
    engine = _nvjpeg_hardware.decoder(device)
    say(f"library {_nvjpeg_hardware._library_path()}; engines, cores: {engine and engine.engines}")
    if engine is None:
        return
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    sets = {
        "photos": make_images(work / "photos", 640, sides=(640, 1600), seed=1),
        "benchmark": make_images(work / "images", 1280, small_share=0.7),
    }
    for name, folder in sets.items():
        try:
            files = sorted(str(p) for p in folder.iterdir())
            data = [jpeg_file(path, pinned=True)[0] for path in files]
            taken = sum(engine.decodable(d) is not None for d in data)
            say(f"== {name}: {len(files)} files, {taken} decodable by the engines")
            batches = [data[i : i + 64] for i in range(0, len(data) - 63, 64)]
            default_min_bytes, gpu_input.ENGINE_MIN_BYTES = gpu_input.ENGINE_MIN_BYTES, 0  # every file to the engines
            for hardware in (True, False):  # warm-up: nvJPEG's buffers, torchvision's extension
                _nvjpeg_hardware.USE_HARDWARE = hardware
                decode_jpegs(batches[0], device)
            diffs, means = [], []
            for batch in batches[:4]:
                _nvjpeg_hardware.USE_HARDWARE = True
                hard = decode_jpegs(batch, device)
                _nvjpeg_hardware.USE_HARDWARE = False
                soft = decode_jpegs(batch, device)
                for a, b in zip(hard, soft):
                    d = (a.int() - b.int()).abs()
                    diffs.append(d.max().item())
                    means.append(d.float().mean().item())
            say(
                f"pixels, engines against SMs: largest difference {max(diffs)} levels, mean {statistics.mean(means):.3f}; "
                f"images with a largest difference > 8: {sum(d > 8 for d in diffs)} of {len(diffs)}"
            )
            for round_ in range(2):
                for hardware in (True, False):
                    _nvjpeg_hardware.USE_HARDWARE = hardware
                    hosts = []
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for batch in batches:
                        t0 = time.perf_counter()
                        decode_jpegs(batch, device)
                        hosts.append((time.perf_counter() - t0) * 1e3)
                    torch.cuda.synchronize()
                    rate = len(batches) * 64 / (time.perf_counter() - start)
                    say(
                        f"round {round_}, {'engines' if hardware else 'SMs'}: decoding alone {rate:.0f} images/s, host "
                        f"{statistics.median(hosts):.2f} ms per batch (median)"
                    )
            gpu_input.ENGINE_MIN_BYTES = default_min_bytes  # the job: the default split by file size
            config = PipelineConfig.from_name("default", encoder_dtype="bfloat16", buckets=(224, 384))
            pipe = Pipeline(config, device=device)
            pipe.warmup(sizes=(224, 384), batch_sizes=[b for b in BATCH_BUCKETS if b <= 64], budget=64)
            for round_ in range(2):
                for hardware in (True, False):
                    _nvjpeg_hardware.USE_HARDWARE = hardware
                    stats = _job(folder, work / "out", pipe, 1)
                    shares = {
                        k: f"{100 * getattr(stats, k) / stats.seconds:.0f}%"
                        for k in ("wait_seconds", "decode_seconds", "pipeline_seconds", "decode_thread_seconds")
                    }
                    say(
                        f"round {round_}, job, {'engines' if hardware else 'SMs'}: {stats.images_per_second:.0f} images/s; "
                        f"{shares}; gpu ms { ({k: round(v) for k, v in stats.gpu_ms.items()}) }"
                    )
        except Exception:  # a probe: report and go on to the next set
            import traceback

            say(traceback.format_exc())
    _nvjpeg_hardware.USE_HARDWARE = True
    shutil.rmtree(work, ignore_errors=True)


def dataset_readers(out: Path) -> None:
    import statistics
    import sys as system

    from arrcoc.config import PipelineConfig
    from arrcoc.datasets import compress_dataset as dataset_module
    from arrcoc.datasets.compress_dataset import _ShardWriter
    from arrcoc.pipeline import BATCH_BUCKETS, Pipeline
    from arrcoc.tools.bench_dataset import make_images

    work = Path(tempfile.mkdtemp(prefix="probe-"))
    lines: list[str] = []
    sets = {
        "photos": make_images(work / "photos", 640, sides=(640, 1600), seed=1),
        "benchmark": make_images(work / "images", 2000, small_share=0.7),
    }
    default_interval = system.getswitchinterval()
    plain: dict[str, dict[str, list[int]]] = {}
    for name, folder in sets.items():
        config = PipelineConfig.from_name("default", encoder_dtype="bfloat16", buckets=(224, 384))
        pipe = Pipeline(config, device=torch.device("cuda"))
        pipe.warmup(sizes=(224, 384), batch_sizes=[b for b in BATCH_BUCKETS if b <= 64], budget=64)
        rates: dict[str, list[int]] = {}
        plain[name] = rates
        cases = [(n, default_interval, 1, True) for n in (1, 2, 3, 4, 6, 8, 12)]
        cases += [
            (2, 5e-4, 1, True),
            (4, 5e-4, 1, True),
            (2, default_interval, 2, True),
            (4, default_interval, 2, True),
        ]
        cases += [(1, default_interval, 1, False), (4, default_interval, 1, False)]
        for _ in range(3):  # the first round warms the files' pages and the caches; the other two are kept
            for readers, interval, ahead, pinned in cases:
                _ShardWriter.decode_ahead = ahead
                dataset_module.PINNED_READS = pinned
                system.setswitchinterval(interval)
                stats = _job(folder, work / "out", pipe, readers)
                system.setswitchinterval(default_interval)
                key = f"{readers} readers" + ("" if interval == default_interval else f", switch {interval * 1e3:g} ms")
                key += "" if ahead == 1 else f", {ahead} batches decoded ahead"
                key += "" if pinned else ", pageable reads"
                _ShardWriter.decode_ahead = 1
                dataset_module.PINNED_READS = True
                rates.setdefault(key, []).append(round(stats.images_per_second))
        lines.append(f"== {name} (images/s: warm-up round, then two rounds)")
        lines += [f"{key}: {values}" for key, values in rates.items()]
        print("\n".join(lines[-len(rates) - 1 :]), flush=True)
        (out / "dataset-readers.txt").write_text("\n".join(lines))
    # the count that read fastest over both sets: each rate a share of its set's best, the kept rounds averaged
    share = {
        key: sum(statistics.mean(r[key][1:]) / max(statistics.mean(v[1:]) for v in r.values()) for r in plain.values())
        for key in plain["photos"]
        if key.endswith("readers")
    }
    lines.append(f"best: {max(share, key=share.get).split()[0]} readers")
    print(lines[-1], flush=True)
    (out / "dataset-readers.txt").write_text("\n".join(lines))
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


def chain(out: Path) -> None:
    from arrcoc import Pipeline
    from arrcoc.pipeline import graph_inputs
    from arrcoc.tools.bench_graphs import _case, _gpu_ms

    pipe = Pipeline.from_pretrained(Path("weights").resolve(), device="cuda", encoder_dtype="bfloat16")
    for batch in (1, 64):
        say = _reporter(out / f"chain-b{batch}.txt")
        with torch.inference_mode():
            _, inputs, info = _case(pipe, 224, batch)
            key = pipe._graph_key(224, batch, info["capacity"], 4)
            graph = pipe._chain(key)
            graph.inputs.write(graph_inputs(key, inputs))
            say(f"224 px bf16 batch {batch}: chain replay {_gpu_ms(graph.replay, 200):.3f} ms (median GPU ms)")
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    graph.replay()
                torch.cuda.synchronize()
        totals: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                totals.setdefault(e.name, []).append(e.time_range.elapsed_us() / 20)
        rows = sorted(totals.items(), key=lambda item: -sum(item[1]))
        say(f"kernels per replay {sum(len(v) for v in totals.values()) / 20:.0f}, summed kernel us per replay "
            f"{sum(sum(v) for v in totals.values()):.1f}")  # fmt: skip
        for name, times in rows:
            say(f"{sum(times):9.2f} us  x{len(times) / 20:5.1f}  {name[:110]}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "part",
        choices=[
            "qwen",
            "qwen-pruned",
            "qwen-host",
            "dataset",
            "dataset-steps",
            "nvjpeg-hardware",
            "dataset-readers",
            "syncs",
            "chain",
        ],
    )
    parser.add_argument("--out", default="/tmp/probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "qwen": qwen,
        "qwen-pruned": qwen_pruned,
        "qwen-host": qwen_host,
        "dataset": dataset,
        "dataset-steps": dataset_steps,
        "nvjpeg-hardware": nvjpeg_hardware,
        "dataset-readers": dataset_readers,
        "syncs": syncs,
        "chain": chain,
    }
    parts[args.part](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
