"""compress: the Triton kernel against the torch form.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported). The ``cuda`` tests run the compiled kernel, on the head's own inputs and in a CUDA graph. The forms
agree bit for bit on these inputs; in general they may order two patches whose keys are within rounding of each
other differently (``_compress_triton``), which none of these inputs has.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import compression
from arrcoc.stages.compression import compress
from arrcoc.stages.regions import region_bounds

#: name -> (images, gh, gw, side, dim, priority, share): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, int, int, str, float | None]] = {
    "distinctness": (3, 5, 7, 4, 12, "none", 0.0),
    "question": (3, 6, 6, 4, 40, "coupling", 0.5),
    "pick-per-image": (4, 7, 9, 4, 8, "pick", None),
    "side-3-ties": (2, 7, 5, 3, 6, "ties", 0.3),
    "share-1": (2, 4, 4, 2, 5, "coupling", 1.0),
    "nan": (2, 4, 8, 4, 6, "nan", 0.5),
}


def _inputs(images: int, gh: int, gw: int, side: int, dim: int, kind: str, share: float | None, device: str = "cpu"):
    """``(features, patch_valid, allocation, capacity, side, priority, share)`` as the head passes them: letterbox
    padding, budgets from none to every image patch of a region, capacity above the largest total."""
    g = torch.Generator().manual_seed(images * 1000 + gh * 100 + gw * 10 + dim)
    features = torch.randn(images, gh, gw, dim, generator=g)
    valid = torch.ones(images, gh, gw)
    valid[0, :, gw - 2 :] = 0  # letterboxed
    valid[0, :, gw - 3] = 0.5
    if images > 1:
        valid[1, gh - 1 :] = 0
    if kind == "ties":
        features[:, : gh // 2] = features[:, :1, :1]  # identical patches: equal keys, ties to the lower slot
    if kind == "nan":
        features[0, 1, 1, 0] = torch.nan
    low, high = region_bounds(valid, side, 1, None)
    allocation = torch.minimum((torch.rand(high.shape, generator=g) * (high + 1)).floor().long(), high)
    allocation[:, 0, 0] = high[:, 0, 0]  # a full region
    capacity = int(allocation.flatten(1).sum(1).max()) + 3
    priority = None
    if kind in ("coupling", "ties", "nan"):
        priority = torch.rand(images, gh, gw, generator=g)
    if kind == "pick":
        priority = (torch.rand(images, gh, gw, generator=g) > 0.6).float()
        share = torch.tensor([1.0, 0.5, 1.0, 0.25])[:images]
    if kind == "none":
        priority = torch.rand(images, gh, gw, generator=g)  # ignored: share 0
    out = (features, valid, allocation, capacity, side, priority, share)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in out)


def _torch_form(*args):
    was, compression.USE_KERNEL = compression.USE_KERNEL, False
    try:
        return compress(*args)
    finally:
        compression.USE_KERNEL = was


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(
        x.dtype == y.dtype and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
        for x, y in zip(a, b, strict=True)
    )


def _interpret_all() -> dict[str, bool]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _compress_triton

    out = {}
    for name, case in CASES.items():
        features, valid, allocation, capacity, side, priority, share = _inputs(*case)
        uses = priority is not None and (isinstance(share, torch.Tensor) or share > 0)
        got = _compress_triton.launch(features, valid, allocation, capacity, side, priority if uses else None, share)
        out[name] = _same(got, _torch_form(features, valid, allocation, capacity, side, priority, share))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_torch_form(interpreted: dict[str, bool], name: str) -> None:
    assert interpreted[name]


def test_the_cases_keep_budgets_and_break_ties_by_slot() -> None:
    features, valid, allocation, capacity, side, priority, share = _inputs(*CASES["side-3-ties"])
    tokens, positions, mask, weights = _torch_form(features, valid, allocation, capacity, side, priority, share)
    assert (mask.sum(1) == allocation.flatten(1).sum(1)).all() and (mask.sum(1) < capacity).all()
    assert torch.equal(weights, mask.float())


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_form_on_cuda(name: str) -> None:
    args = _inputs(*CASES[name], device="cuda")
    assert _same(compress(*args), _torch_form(*args))


@pytest.mark.cuda
def test_kernel_on_the_heads_inputs_and_in_a_cuda_graph() -> None:
    """The shipped head's own features and allocations at 224 px, batch 64, with a question and without: every
    output the torch form's; the kernel replays in a CUDA graph."""
    from arrcoc import Pipeline
    from arrcoc.tools.bench_graphs import _case

    pipe = Pipeline.from_pretrained(device="cuda")
    stages, inputs, _ = _case(pipe, 224, 64)
    inputs["query_mask"][::2] = False  # half the images without a question: the pick's patches
    state = dict(inputs)
    calls = []
    real = compression.compress

    def record(*args):
        calls.append(args)
        return real(*args)

    compression.compress, was = record, compression.compress
    try:
        for _, step in stages:
            state.update(step(state))
    finally:
        compression.compress = was
    (args,) = calls
    assert _same(compress(*args), _torch_form(*args))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compress(*args)
    args[0].copy_(args[0].flip(1))
    graph.replay()
    assert _same(out, _torch_form(*args))


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
