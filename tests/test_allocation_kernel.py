"""Allocator: the Triton kernel against the torch form.

On CPU the kernel runs in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton
is imported). The ``cuda`` tests run the compiled kernel and in a CUDA graph. The forms agree on every case here;
in general a level may differ by a float64 rounding, which changes a token only where it crosses a whole number.
"""

from __future__ import annotations

import pytest
import torch

from arrcoc.stages import allocation
from arrcoc.stages.allocation import Allocator
from arrcoc.stages.regions import region_bounds

#: name -> (images, gh, gw, kind): each case's inputs come from :func:`_inputs`.
CASES: dict[str, tuple[int, int, int, str]] = {
    "random": (4, 14, 14, "random"),
    "letterboxed": (4, 14, 20, "letterbox"),
    "ties-zeros": (4, 12, 12, "ties"),
    "budget-extremes": (4, 14, 14, "extremes"),
    "counts": (4, 16, 16, "counts"),
    "wide": (2, 24, 32, "random"),
}


def _inputs(images: int, gh: int, gw: int, kind: str, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """``(relevance, budget, min_tokens, max_tokens)`` as the head passes them (bounds from patch validity)."""
    g = torch.Generator().manual_seed(images * 100 + gh + gw)
    valid = torch.ones(images, gh, gw)
    if kind == "letterbox":
        valid[:, :, gw - 7 :] = 0
        valid[1, gh - 5 :] = 0
    low, high = region_bounds(valid, 4, 1, 16)
    relevance = torch.rand(low.shape, generator=g) ** 3
    if kind == "ties":
        relevance = (relevance * 4).round() / 4  # equal relevance and zeros: ties broken by relevance, then index
    if kind == "counts":  # the query-free cover: picked patches per region over their count
        relevance = torch.randint(0, 5, low.shape, generator=g).float()
        relevance = relevance / relevance.flatten(1).sum(1).clamp_min(1)[:, None, None]
    relevance = relevance * (high > 0)
    most = high.flatten(1).sum(1)
    budget = torch.randint(1, 64, (images,), generator=g).minimum(most)
    if kind == "extremes":  # below the minima's sum (the minima drop), the minima's sum, every patch
        budget = torch.stack((torch.tensor(1), low[1].sum(), most[2], most[3] - 1))
    return tuple(t.to(device) for t in (relevance, budget, low, high))


def _torch_form(*args: torch.Tensor) -> torch.Tensor:
    was, allocation.USE_KERNEL = allocation.USE_KERNEL, False
    try:
        return Allocator()(*args)
    finally:
        allocation.USE_KERNEL = was


def _interpret_all() -> dict[str, bool]:
    """Every case through the interpreted kernel; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _allocation_triton

    out = {}
    for name, case in CASES.items():
        relevance, budget, low, high = _inputs(*case)
        b = len(relevance)
        got = _allocation_triton.launch(
            relevance.reshape(b, -1), budget, low.reshape(b, -1), high.reshape(b, -1), allocation._FLOOR, True
        ).view_as(relevance)
        out[name] = torch.equal(got, _torch_form(relevance, budget, low, high))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_equals_the_torch_form(interpreted: dict[str, bool], name: str) -> None:
    assert interpreted[name]


def test_the_cases_spend_their_budgets_within_bounds() -> None:
    for case in CASES.values():
        relevance, budget, low, high = _inputs(*case)
        tokens = _torch_form(relevance, budget, low, high)
        assert torch.equal(tokens.flatten(1).sum(1), budget) and (tokens <= high).all()


# --- the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_form_on_cuda(name: str) -> None:
    args = _inputs(*CASES[name], device="cuda")
    assert torch.equal(Allocator()(*args), _torch_form(*args))


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph() -> None:
    relevance, budget, low, high = _inputs(*CASES["random"], device="cuda")
    Allocator()(relevance, budget, low, high)  # Triton's first launch compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = Allocator()(relevance, budget, low, high)
    relevance.copy_(relevance.flip(-1))
    graph.replay()
    assert torch.equal(out, _torch_form(relevance, budget, low, high))


if __name__ == "__main__":
    import json

    print(json.dumps(_interpret_all()))
