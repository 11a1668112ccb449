"""How many device launches the Qwen-VL adapter's ``prepare`` issues outside the vision tower and the reducer graph,
counted on the CPU (issue 23: at batch 1 those launches, not their work, set arrcoc's own time).

    python bench/launch_probe.py [--out bench/results]

The benchmark's tiny Qwen2.5-VL (``bench_qwen`` preset ``tiny``, tower packed) on 1,280 x 960 images at 11%, with
the question and without, after the tower and pruned after block 1, at batch 1 and 8. A dispatch mode follows
every tensor that would live on the GPU (the model's weights, the pixels, what the host sends) through each aten
op and counts the ops on them that make new memory or write in place (not views): what a CUDA run launches. The tower and the group's reducer
step (``ArrcocQwen._run``: one graph replay on a GPU) are not counted; the host's copies to the device are
counted apart. Also the host's own milliseconds (:func:`host_ms`). Writes ``qwen-prepare-launches-cpu.md`` (appending a section per run, headed by the commit).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from arrcoc.integrations import qwen as Q
from arrcoc.integrations.vision_tower import pack_vision_tower
from arrcoc.tools.bench_qwen import QUESTION, _images, build_qwen, qwen_adapter


def _mark(value: Any) -> Any:
    for t in tree_flatten(value)[0]:
        if isinstance(t, torch.Tensor):
            t._on_device = True
    return value


class _Launches(TorchDispatchMode):
    """Counts non-view ops reading a device tensor, outside the ``skipped`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0
        self.ops: Counter[str] = Counter()
        self.copies = 0
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(getattr(t, "_on_device", False) for t in tensors):
            _mark(out)
            name = func.overloadpacket.__name__
            # a view shares its input's memory and launches nothing; an in-place op shares it and launches
            memory = {t.untyped_storage().data_ptr() for t in tensors}
            made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            view = bool(made) and all(t.untyped_storage().data_ptr() in memory for t in made)
            if not self.skipped and (name.endswith("_") or not view):
                self.ops[name] += 1
        return out


def _skip(mode: _Launches, owner: Any, name: str) -> None:
    """``owner.name`` runs uncounted (the GPU runs it as a graph, or it is the tower); its outputs are device's."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def skipped(*args: Any, **kwargs: Any) -> Any:
        mode.skipped += 1
        try:
            return _mark(fn(*args, **kwargs))
        finally:
            mode.skipped -= 1

    setattr(owner, name, skipped)


def _sends(mode: _Launches, name: str) -> None:
    """Host-to-device copies: each call of the module's sending function (the GPU's one copy each) counts one."""
    fn = getattr(Q, name)

    def sent(*args: Any) -> Any:
        mode.copies += mode.counting and not mode.skipped
        return _mark(fn(*args))

    setattr(Q, name, sent)


def count(prune_after: str | None, batch: int, question: bool) -> tuple[int, int, Counter[str]]:
    """(launches, host-to-device copies, launches by op) of one ``prepare`` at 11%."""
    mode = _Launches()
    model = build_qwen("tiny", torch.device("cpu"), torch.float32)
    pack_vision_tower(model)
    adapter = qwen_adapter(model, "arrcoc", 8, prune_after=prune_after)
    _mark(list(model.parameters()) + list(model.buffers()) + list(adapter.buffers()))
    _mark(list(adapter.reducer.parameters()) + list(adapter.reducer.buffers()))
    _skip(mode, adapter, "_run")
    _skip(mode, adapter, "_image_features")
    for name in ("tower_head", "tower_merged", "tower_tail"):
        _skip(mode, Q, name)
    for name in ("_sent", "_sent_all"):  # the per-tensor sender before this probe's change, the packed one after
        if hasattr(Q, name):
            _sends(mode, name)
    inputs = adapter.image_processor(images=_images((960, 1280), batch), return_tensors="pt")
    pixels = {"pixel_values": _mark(inputs["pixel_values"]), "image_grid_thw": inputs["image_grid_thw"]}
    prompts = [QUESTION if question else ""] * batch
    with torch.inference_mode():
        adapter.prepare(pixels, prompts, 0.11)  # warm: plans and graph keys made
        with mode:
            mode.counting = True
            adapter.prepare(pixels, prompts, 0.11)
    return sum(mode.ops.values()), mode.copies, mode.ops


def host_ms(prune_after: int | None, calls: int = 300) -> float:
    """Median host milliseconds of one ``prepare`` outside the tower and the reducer step, at batch 1 on a
    170 x 150 image (little compute: the host's own work). On the CPU the host's copies to the device are free."""
    model = build_qwen("tiny", torch.device("cpu"), torch.float32)
    pack_vision_tower(model)
    adapter = qwen_adapter(model, "arrcoc", 8, prune_after=prune_after)
    spent = [0.0]

    def timed(owner: Any, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(adapter, "_run")
    timed(adapter, "_image_features")
    for name in ("tower_head", "tower_merged", "tower_tail"):
        timed(Q, name)
    inputs = adapter.image_processor(images=_images((150, 170), 1), return_tensors="pt")
    pixels = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    times = []
    with torch.inference_mode():
        for call in range(calls + 50):
            spent[0] = 0.0
            start = time.perf_counter()
            adapter.prepare(pixels, [QUESTION], 0.11)
            if call >= 50:  # after a warm-up
                times.append(time.perf_counter() - start - spent[0])
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "arrcoc"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"\n## {commit}{' + uncommitted changes in arrcoc/' if dirty else ''} (torch {torch.__version__})\n",
        "| path | batch | question | launches | host-to-device copies | most frequent |",
        "|---|---:|---|---:|---:|---|",
    ]
    for prune_after, path in ((None, "after the tower"), (1, "pruned after block 1")):
        for batch in (1, 8):
            for question in (True, False):
                launches, copies, ops = count(prune_after, batch, question)
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
                lines.append(f"| {path} | {batch} | {'yes' if question else 'no'} | {launches} | {copies} | {top} |")
                print(lines[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    hosts = [f"{host_ms(p):.2f}" for p in (None, 1)]
    lines.append(
        f"\nHost ms outside the tower and the reducer step, batch 1, 170 x 150 px (median of 300): {hosts[0]} "
        f"after the tower, {hosts[1]} pruned."
    )
    print(lines[-1], flush=True)
    out = Path(args.out) / "qwen-prepare-launches-cpu.md"
    if not out.exists():
        out.write_text(
            "# Qwen-VL prepare: device launches outside the tower and the reducer graph (CPU count)\n\n"
            "`python bench/launch_probe.py`: see its docstring. 11% of 34 x 46 merged tokens per 1,280 x 960 image.\n"
        )
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
