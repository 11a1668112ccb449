"""The head's Triton kernels together against its torch forms, on the shipped pipeline.

Each kernel has its own tests against its torch form (``test_*_kernel.py``); here the whole chain: the shipped
pipeline on generated scenes, half with a question, with every head kernel and with none. On the CPU the kernels
run in Triton's interpreter (a subprocess: ``TRITON_INTERPRET`` must be set before Triton is imported), their checks
opened to CPU tensors, on a few scenes: that the head calls each kernel with the right inputs. The ``cuda`` test
runs them compiled and graphed, on 256 scenes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from arrcoc.stages import allocation, balance, compression, regions, scorers

#: The head's kernel switches: module -> attribute.
SWITCHES = [(scorers, "USE_KERNEL"), (balance, "SIMILARITY_KERNEL"), (regions, "USE_KERNEL"),
            (balance, "PICK_SETUP_KERNEL"), (balance, "FRAME_KERNEL"), (balance, "BALANCE_KERNEL"),
            (allocation, "USE_KERNEL"), (compression, "USE_KERNEL")]  # fmt: skip


#: The head's kernel entry points: module of ``arrcoc.stages`` -> functions the head calls on CUDA.
ENTRIES = {
    "_region_stats_triton": ("propositional", "region_units"),
    "_perspectival_triton": ("launch",),
    "_participatory_triton": ("coupling", "peak"),
    "_normalize_triton": ("launch",),
    "_pick_setup_triton": ("launch",),
    "_frame_triton": ("launch",),
    "_balance_triton": ("launch",),
    "_allocation_triton": ("launch",),
    "_compress_triton": ("launch",),
}


@contextlib.contextmanager
def _counting_calls() -> Iterator[dict[str, int]]:
    """Counts each kernel entry point's calls while the block runs (the dict is cleared by the caller)."""
    calls: dict[str, int] = {}
    saved = []
    for module_name, functions in ENTRIES.items():
        module = importlib.import_module(f"arrcoc.stages.{module_name}")
        for function in functions:
            fn, key = getattr(module, function), f"{module_name}.{function}"

            def counted(*args: object, _fn: Callable[..., object] = fn, _key: str = key, **kwargs: object) -> object:
                calls[_key] = calls.get(_key, 0) + 1
                return _fn(*args, **kwargs)

            saved.append((module, function, fn))
            setattr(module, function, counted)
    try:
        yield calls
    finally:
        for module, function, fn in saved:
            setattr(module, function, fn)


def _with_and_without(device: str, images: int) -> dict[str, object]:
    """The shipped pipeline on ``images`` generated scenes (224 px, the test seeds, budget 24, every other one with a
    4-token question), with every head kernel and with every switch off: which kernels ran in each, and per group
    (with a question, without) how many allocations are the same and, without, whether the images with the same
    allocation got the same tokens, positions and mask."""
    from arrcoc import Pipeline
    from arrcoc.world.data import make_sample

    scenes = [make_sample(seed=600_000 + i).image for i in range(images)]
    query = torch.randn(images, 4, 256, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.zeros(images, 4, dtype=torch.bool, device=device)
    mask[::2] = True

    def run() -> object:
        pipe = Pipeline.from_pretrained(device=device)
        assert pipe.width == query.shape[-1]
        return pipe(scenes, query=query, query_mask=mask, budget=24)

    saved = [(module, name, getattr(module, name)) for module, name in SWITCHES]
    with _counting_calls() as calls:
        fused = run()
        ran = sorted(calls)
        calls.clear()
        try:
            for module, name in SWITCHES:
                setattr(module, name, False)
            plain = run()
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
        ran_plain = sorted(calls)
    asked = mask.any(-1).cpu()
    out: dict[str, object] = {"ran": ran, "ran without switches": ran_plain}
    out["largest map difference"] = {
        **{name: (fused.scores[name] - plain.scores[name]).abs().max().item() for name in plain.scores},
        "relevance": (fused.relevance - plain.relevance).abs().max().item(),
    }
    for group, label in ((asked, "with a question"), (~asked, "without")):
        rows = group.nonzero().flatten().tolist()
        same = [i for i in rows if torch.equal(fused.allocation[i], plain.allocation[i])]
        out[label] = [len(same), len(rows)]
        if label == "without":
            out["same tokens where the allocation is"] = all(
                torch.equal(getattr(fused, field)[i], getattr(plain, field)[i])
                for field in ("tokens", "positions", "mask")
                for i in same
            )
    return out


def _check(result: dict[str, object]) -> None:
    """Every kernel ran with the switches on and none with them off; at least 99% of the allocations the same with a
    question and without; without, the same tokens wherever the allocation is the same (an exact -2 coupling, so the
    packing orders a region's patches alike)."""
    expected = sorted(f"{m}.{f}" for m, functions in ENTRIES.items() for f in functions)
    assert result["ran"] == expected, f"kernels that never ran: {sorted(set(expected) - set(result['ran']))}"
    assert result["ran without switches"] == [], result["ran without switches"]
    for label in ("with a question", "without"):
        same, rows = result[label]
        assert same >= 0.99 * rows, f"{label}: {same} of {rows} allocations the same"
    assert result["same tokens where the allocation is"]


def _interpret_all() -> dict[str, object]:
    """Under Triton's interpreter: the head's kernel checks opened to CPU tensors, then :func:`_with_and_without` on
    eight scenes."""

    def on_any_device(tensor: torch.Tensor, enabled: bool) -> bool:  # ``kernels.runs_kernel`` without its CUDA check
        return enabled and tensor.dtype == torch.float32 and not (tensor.requires_grad and torch.is_grad_enabled())

    for module in (scorers, balance, regions, allocation, compression):
        module.runs_kernel = on_any_device
    return _with_and_without("cpu", 8)


def test_interpreted_head_calls_each_kernel_as_its_torch_form(interpreted: dict[str, object]) -> None:
    _check(interpreted)
    # the interpreter's maps agree with the torch forms' to float32 rounding (the kernels' own tests: 2e-6 a map)
    assert max(interpreted["largest map difference"].values()) <= 1e-5, interpreted["largest map difference"]


@pytest.mark.cuda
def test_the_head_with_its_kernels_and_without() -> None:
    """256 generated scenes, compiled kernels, graphed chain (:func:`_check`; the maps' largest differences are
    recorded in ``head-kernels-agreement.json``, not bounded: no GPU figure to set the bound from)."""
    result = _with_and_without("cuda", 256)
    folder = os.environ.get("ARRCOC_RELIABILITY_OUT")  # bench/gpu.sh keeps the figures
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "head-kernels-agreement.json").write_text(json.dumps(result, indent=2))
    _check(result)


if __name__ == "__main__":
    print(json.dumps(_interpret_all()))
