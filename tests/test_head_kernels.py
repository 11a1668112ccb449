"""The head's Triton kernels together against its torch forms, on the shipped pipeline (``cuda`` only).

Each kernel has its own tests against its torch form (``test_*_kernel.py``); here the whole chain: the shipped
pipeline on generated scenes, half with a question, graphed, with every head kernel and with none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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


@pytest.mark.cuda
def test_the_head_with_its_kernels_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 generated scenes at 224 px (the test seeds), budget 24, half with a question: every head kernel runs, and
    at least 99% of the allocations are the torch forms' (the kernels' sums round in another order), both with a
    question and without; without one, an image given the same allocation gets the same tokens, bit for bit (its
    coupling is an exact -2, so the packing's order is the same)."""
    import importlib

    from arrcoc import Pipeline
    from arrcoc.world.data import make_sample

    scenes = [make_sample(seed=600_000 + i).image for i in range(256)]
    query = torch.randn(256, 4, 256, generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.zeros(256, 4, dtype=torch.bool, device="cuda")
    mask[::2] = True
    calls: dict[str, int] = {}

    def counting(fn: Callable[..., object], key: str) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            calls[key] = calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for module_name, functions in ENTRIES.items():
        module = importlib.import_module(f"arrcoc.stages.{module_name}")
        for function in functions:
            monkeypatch.setattr(module, function, counting(getattr(module, function), f"{module_name}.{function}"))

    def run() -> object:
        pipe = Pipeline.from_pretrained(device="cuda")
        assert pipe.width == query.shape[-1]
        return pipe(scenes, query=query, query_mask=mask, budget=24)

    fused = run()
    expected = {f"{m}.{f}" for m, functions in ENTRIES.items() for f in functions}
    assert set(calls) == expected, f"kernels that never ran: {sorted(expected - set(calls))}"
    for module, name in SWITCHES:
        monkeypatch.setattr(module, name, False)
    calls.clear()
    plain = run()
    assert not calls, f"kernels that ran with every switch off: {sorted(calls)}"
    asked = mask.any(-1).cpu()
    agreement = {}
    for group, label in ((asked, "with a question"), (~asked, "without")):
        rows = group.nonzero().flatten().tolist()
        same = [i for i in rows if torch.equal(fused.allocation[i], plain.allocation[i])]
        agreement[label] = f"{len(same)} of {len(rows)} allocations the same"
        assert len(same) >= 0.99 * len(rows), f"{label}: {agreement[label]}"
        if label == "without":
            for field in ("tokens", "positions", "mask"):
                got, want = getattr(fused, field), getattr(plain, field)
                assert all(torch.equal(got[i], want[i]) for i in same), field
    folder = os.environ.get("ARRCOC_RELIABILITY_OUT")  # bench/gpu.sh keeps the figures
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "head-kernels-agreement.json").write_text(json.dumps(agreement, indent=2))
