"""The head's Triton kernels together against its torch forms, on the shipped pipeline (``cuda`` only).

Each kernel has its own tests against its torch form (``test_*_kernel.py``); here the whole chain: the shipped
pipeline on generated scenes, half with a question, graphed, with every head kernel and with none.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import allocation, balance, compression, regions

#: The head's kernel switches: module -> attribute.
SWITCHES = [(regions, "USE_KERNEL"), (balance, "FRAME_KERNEL"), (balance, "BALANCE_KERNEL"),
            (allocation, "USE_KERNEL"), (compression, "USE_KERNEL")]  # fmt: skip


@pytest.mark.cuda
def test_the_head_with_its_kernels_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 generated scenes at 224 px (the test seeds), budget 24: without a question every output is the torch
    forms' bits; with one, at least 99% of the allocations are the same (the kernels' sums round otherwise)."""
    from arrcoc import Pipeline
    from arrcoc.world.data import make_sample

    scenes = [make_sample(seed=600_000 + i).image for i in range(256)]
    query = torch.randn(256, 4, 256, generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.zeros(256, 4, dtype=torch.bool, device="cuda")
    mask[::2] = True

    def run() -> object:
        pipe = Pipeline.from_pretrained(device="cuda")
        assert pipe.width == query.shape[-1]
        return pipe(scenes, query=query, query_mask=mask, budget=24)

    fused = run()
    for module, name in SWITCHES:
        monkeypatch.setattr(module, name, False)
    plain = run()
    asked = mask.any(-1).cpu()
    for field in ("allocation", "tokens", "positions", "mask"):
        got, want = getattr(fused, field), getattr(plain, field)
        assert all(torch.equal(got[i], want[i]) for i in range(256) if not asked[i]), field
    same = sum(torch.equal(fused.allocation[i], plain.allocation[i]) for i in range(256))
    assert same >= 0.99 * 256, f"{same} of 256 allocations the same"
