"""What a background compile costs a data-set job while it runs and gives back once it is done, the figures behind
``compress_dataset.COMPILE_WORTH_SECONDS``. One process, one pipeline as ``--compile auto`` builds it (the default
preset, bf16, batch 64, the compile deferred): its plain graphs captured, then passes of the job over one folder of
generated photos, plain, then while the head compiles beside them (started by hand at once), then compiled. From the
rates: the job's images left, in seconds of plain work, above which starting the compile shortens it (its
break-even). Run it twice with one ``TORCHINDUCTOR_CACHE_DIR``: the first compile is cold, the second reads the cache.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_timeline.py --out timeline-cold.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from arrcoc import Pipeline, PipelineConfig
from arrcoc.datasets.compress_dataset import compile_options, compress_dataset
from arrcoc.tools.bench_dataset import _warm_up, make_images


def break_even(plain: float, during: float, compiled: float, compile_s: float) -> float:
    """Seconds of plain work left at the start of a compile above which starting it shortens the job: the compile's
    ``compile_s`` at the ``during`` rate, the rest at the ``compiled`` one, against all at the ``plain`` one."""
    gain = 1 / plain - 1 / compiled  # seconds per image saved once compiled
    if gain <= 0:
        return float("inf")
    images = compile_s * (1 - during / compiled) / gain
    return images / plain


def derived(report: dict) -> dict:
    """Each phase's rate, its images over its seconds (passes hold equal images: the harmonic mean, which a pass
    starved by the compile weighs into as it weighs into the job), and the break-even these give."""
    during = [r for _, r in report["during_images_per_s"]]
    if not (report["compile_done"] and during and report["compiled_images_per_s"]):
        return {}
    phases = (report["plain_images_per_s"], during, report["compiled_images_per_s"])
    rates = [statistics.harmonic_mean(p) for p in phases]
    return {
        "rates": dict(zip(("plain", "during", "compiled"), rates)),
        "break_even_s": break_even(*rates, report["compile_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=4, help="plain and compiled passes")
    parser.add_argument("--limit", type=float, default=240.0, help="most seconds to wait for the compile")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="arrcoc-timeline-"))
    make_images(work / "photos", args.photos, sides=(640, 1600), seed=1)
    device = torch.device("cuda")
    options = compile_options("auto", 64, device)
    config = PipelineConfig.from_name("default", encoder_dtype="bfloat16", buckets=(224, 384))
    pipe = Pipeline(config, device=device, **options)
    _warm_up(pipe, options, 64, 64)

    def one_pass() -> float:
        dest = work / "out"
        shutil.rmtree(dest, ignore_errors=True)
        stats = compress_dataset(
            work / "photos", dest, pipe, 64, batch_size=64, token_dtype=torch.float16, progress=False
        )
        return stats.images_per_second

    one_pass()  # first batches: heuristics, nvJPEG, page cache
    plain = [one_pass() for _ in range(args.passes)]
    start = time.perf_counter()
    pipe.start_compile()
    during: list[tuple[float, float]] = []
    while not pipe.wait_for_compile(0) and time.perf_counter() - start < args.limit:
        during.append((time.perf_counter() - start, one_pass()))
    compile_s = time.perf_counter() - start
    done = pipe.wait_for_compile(0)
    compiled = [one_pass() for _ in range(args.passes)] if done else []
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "photos": args.photos,
        "compile_done": done,
        "compile_s": compile_s,
        "compile_failures": {str(k): v for k, v in pipe.compiled_chains.failures.items()},
        "compiled_hits": pipe.compiled_chains.cache.stats()["hits"],
        "plain_images_per_s": plain,
        "during_images_per_s": during,
        "compiled_images_per_s": compiled,
    }
    report.update(derived(report))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "during_images_per_s"}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
