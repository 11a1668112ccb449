"""Folder-job reliability: ``arrcoc compress DIR`` over N images with a share broken, killed midway, resumed.

    python bench/reliability_folder.py [--images 1000] [--broken 0.05] [--kill-at 0.5] [--out bench/results]

Builds N small images (PNG, JPEG, BMP, TIFF, WEBP; 16..300 px per side), damages a share of them (truncated,
emptied, header zeroed, random bytes), then:

1. runs the whole job once: every good image must be written, every broken one listed with its reason,
   and the exit code must be 1;
2. runs it again into a fresh folder, kills it with SIGKILL once ``--kill-at`` of the reports exist, and
   restarts it with ``--resume``: the restart must process exactly the images not yet complete.

Writes ``reliability-folder-<device>.json`` with the counts and seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("tif", "TIFF"), ("webp", "WEBP"))


def make_folder(folder: Path, count: int, broken_share: float, seed: int = 0) -> list[str]:
    """Write ``count`` images; returns the names of the broken ones."""
    rng = np.random.default_rng(seed)
    broken = set(rng.choice(count, size=round(count * broken_share), replace=False).tolist())
    names = []
    for i in range(count):
        suffix, fmt = FORMATS[i % len(FORMATS)]
        h, w = rng.integers(16, 300, size=2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        path = folder / f"img{i:04d}.{suffix}"
        image.save(path, format=fmt)
        if i in broken:
            data = path.read_bytes()
            damage = i % 4
            path.write_bytes([data[: len(data) // 3], b"", bytes(32) + data[32:], rng.bytes(len(data))][damage])
            names.append(path.name)
    return names


def _summary(stdout: str) -> dict[str, int]:
    match = re.search(r"wrote (\d+) of (\d+) images .*\((\d+) already complete, (\d+) failed; (\d+) processed", stdout)
    if not match:
        raise SystemExit(f"no summary line in: {stdout!r}")
    return dict(zip(("written", "total", "skipped", "failed", "processed"), map(int, match.groups())))


def _command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "arrcoc",
        "compress",
        str(folder),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--budget",
        "16",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--broken", type=float, default=0.05)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of reports written before the kill")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="arrcoc-folder-"))
    folder = work / "images"
    folder.mkdir()
    broken = make_folder(folder, args.images, args.broken)
    good = args.images - len(broken)
    report: dict = {"images": args.images, "broken": len(broken), "good": good}

    # 1. One whole run.
    start = time.perf_counter()
    done = subprocess.run(_command(folder, work / "out1"), capture_output=True, text=True)
    report["full_run"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "exit_code": done.returncode,
        **_summary(done.stdout),
    }
    listed = [line for line in done.stderr.splitlines() if line.startswith("arrcoc: failed:")]
    report["full_run"]["broken_listed_with_reason"] = sum(any(name in line for line in listed) for name in broken)
    report["full_run"]["reports_written"] = len(list((work / "out1").glob("*.json")))
    report["full_run"]["pictures_written"] = len(list((work / "out1").glob("*.png")))

    # 2. Killed midway, then resumed.
    out = work / "out2"
    start = time.perf_counter()
    process = subprocess.Popen(_command(folder, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = int(good * args.kill_at)
    while process.poll() is None and (len(list(out.glob("*.json"))) if out.exists() else 0) < target:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    complete_at_kill = len(list(out.glob("*.json")))
    temporaries = len(list(out.glob(".*.tmp")))
    killed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    resumed = subprocess.run(_command(folder, out, "--resume"), capture_output=True, text=True)
    summary = _summary(resumed.stdout)
    report["killed_and_resumed"] = {
        "killed_after_seconds": round(killed_seconds, 1),
        "exit_signal": -process.returncode,
        "reports_complete_at_kill": complete_at_kill,
        "temporaries_left_by_kill": temporaries,
        "resume_seconds": round(time.perf_counter() - start, 1),
        "resume_exit_code": resumed.returncode,
        **summary,
        "reports_after_resume": len(list(out.glob("*.json"))),
        "temporaries_after_resume": len(list(out.glob(".*.tmp"))),
        "recomputed_complete_images": summary["processed"] - (good - summary["skipped"]),
    }
    report["ok"] = (
        report["full_run"]["reports_written"] == good
        and report["full_run"]["exit_code"] == 1
        and report["full_run"]["broken_listed_with_reason"] == len(broken)
        and report["killed_and_resumed"]["reports_after_resume"] == good
        and summary["processed"] == good - complete_at_kill
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reliability-folder-cpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(work)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
