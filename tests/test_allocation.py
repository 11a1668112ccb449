"""Budgeted allocation: property tests (hypothesis) and clear errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arrcoc.errors import BudgetError, InvalidInputError, InvalidTypeError
from arrcoc.stages import allocation
from arrcoc.stages.allocation import Allocator, allocate


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random relevance (ties, zeros, huge range), per-region bounds and a feasible budget per image."""
    b = draw(st.integers(1, 4))
    r = draw(st.integers(1, 64))
    palette = draw(
        st.lists(
            st.sampled_from([0.0, 1e-12, 1e-6, 0.5, 1.0, 3.0, 1e3, 1e6]) | st.floats(0, 1e6), min_size=1, max_size=8
        )
    )
    values = draw(st.lists(st.sampled_from(palette), min_size=b * r, max_size=b * r))
    relevance = torch.tensor(values, dtype=torch.float32).view(b, r)
    low = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=b * r, max_size=b * r))).view(b, r)
    high = low + torch.tensor(draw(st.lists(st.integers(0, 16), min_size=b * r, max_size=b * r))).view(b, r)
    edge = draw(st.sampled_from(["low", "high", "any"]))
    budgets = []
    for lo, hi in zip(low.sum(1).tolist(), high.sum(1).tolist()):
        budgets.append(lo if edge == "low" else hi if edge == "high" else draw(st.integers(lo, hi)))
    return relevance, torch.tensor(budgets), low, high


@settings(max_examples=300, deadline=None)
@given(problems())
def test_exact_bounded_monotone_deterministic(problem) -> None:
    relevance, budget, low, high = problem
    out = allocate(relevance, budget, low, high)
    assert out.dtype == torch.int64 and out.shape == relevance.shape
    assert torch.equal(out.sum(1), budget)
    assert (out >= low).all() and (out <= high).all()
    same_bounds = (low[:, :, None] == low[:, None, :]) & (high[:, :, None] == high[:, None, :])
    more_relevant = relevance[:, :, None] > relevance[:, None, :]
    fewer_tokens = out[:, :, None] < out[:, None, :]
    assert not (same_bounds & more_relevant & fewer_tokens).any()
    assert torch.equal(allocate(relevance, budget, low, high), out)
    for i in range(relevance.shape[0]):  # an image alone gets what it gets in the batch
        alone = allocate(relevance[i : i + 1], budget[i : i + 1], low[i : i + 1], high[i : i + 1])
        assert torch.equal(alone[0], out[i])


def sorted_orders() -> mock._patch:
    """Force the sort-based orders (the path of large problems) on any problem size."""
    return mock.patch.object(allocation, "PAIRWISE_PAIRS", 0)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_sorted_and_pairwise_orders_allocate_alike(problem) -> None:
    relevance, budget, low, high = problem
    pairwise = allocate(relevance, budget, low, high)
    with sorted_orders():
        assert torch.equal(allocate(relevance, budget, low, high), pairwise)


def test_sorted_orders_keep_the_guarantees() -> None:
    with sorted_orders():
        test_exact_bounded_monotone_deterministic()
        test_proportional()


@settings(max_examples=100, deadline=None)
@given(problems())
def test_allocator_stage_equals_checked_function(problem) -> None:
    relevance, budget, low, high = problem
    assert torch.equal(Allocator()(relevance, budget, low, high), allocate(relevance, budget, low, high))


def test_proportional() -> None:
    assert allocate(torch.tensor([[3.0, 1.0]]), 8, 0, 16).tolist() == [[6, 2]]
    assert allocate(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 6, 0, 16).tolist() == [[2, 2, 1, 1]]  # ties: lower index
    assert allocate(torch.tensor([[0.0, 0.0, 0.0]]), 5, 0, 16).tolist() == [[2, 2, 1]]  # all zero: uniform
    assert allocate(torch.tensor([[10.0, 1.0, 0.0]]), 20, 0, 8).tolist() == [[8, 8, 4]]  # saturation spills over


def test_shapes_and_int_budget() -> None:
    relevance = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    out = allocate(relevance, 20)
    assert out.shape == (2, 3, 4) and out.flatten(1).sum(1).tolist() == [20, 20]


@pytest.mark.parametrize(
    "relevance, match",
    [
        (torch.tensor([[1.0, float("nan")]]), "1 NaN or infinite"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
        (torch.tensor([[1.0, -0.5]]), "non-negative"),
    ],
)
def test_bad_relevance(relevance: torch.Tensor, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        allocate(relevance, 2, 0, 4)


def test_bad_types() -> None:
    with pytest.raises(InvalidTypeError, match="floating-point"):
        allocate(torch.tensor([[1, 2]]), 2)
    with pytest.raises(InvalidInputError, match="shape"):
        allocate(torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(InvalidTypeError, match="min_tokens"):
        allocate(torch.rand(1, 2), 2, min_tokens=0.5)


@pytest.mark.parametrize(
    "budget, match",
    [(True, "whole number"), (3.5, "whole number"), (torch.tensor([2.0]), "integer"), (torch.tensor([1, 2]), "shape")],
)
def test_bad_budget_types(budget, match: str) -> None:
    with pytest.raises(BudgetError, match=match):
        allocate(torch.rand(1, 4), budget, 0, 4)


def test_budget_outside_range_names_image_and_range() -> None:
    relevance = torch.rand(2, 4)
    with pytest.raises(BudgetError, match=r"budget 3 for image 1 cannot be met: it must be between 4 .* and 64"):
        allocate(relevance, torch.tensor([10, 3]), 1, 16)
    with pytest.raises(BudgetError, match=r"budget 65 for image 0"):
        allocate(relevance, 65, 1, 16)
    with pytest.raises(InvalidInputError, match="min_tokens must be"):
        allocate(relevance, 8, torch.tensor([3, 1, 1, 1]), 2)


def test_allocator_drops_minimums_when_budget_is_small() -> None:
    relevance = torch.tensor([[0.1, 5.0, 0.2, 3.0]])
    out = Allocator()(relevance, torch.tensor([2]), torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 16))
    assert out.tolist() == [[0, 1, 0, 1]]


def test_unchecked_path_is_shape_static() -> None:
    """On the meta device any host read or data-dependent shape raises: the stage has neither."""
    relevance = torch.empty(3, 5, 6, device="meta")
    bounds = torch.empty(3, 5, 6, dtype=torch.long, device="meta")
    out = Allocator()(relevance, torch.empty(3, dtype=torch.long, device="meta"), bounds, bounds)
    assert out.shape == (3, 5, 6) and out.dtype == torch.int64


@pytest.mark.cuda
def test_cuda_matches_cpu_without_syncs() -> None:
    g = torch.Generator().manual_seed(0)
    relevance = torch.rand(8, 16, 16, generator=g).round(decimals=2)
    low = torch.ones(8, 16, 16, dtype=torch.long)
    high = torch.full((8, 16, 16), 16)
    budget = torch.randint(256, 4096, (8,), generator=g)
    expected = Allocator()(relevance, budget, low, high)
    args = [t.cuda() for t in (relevance, budget, low, high)]
    Allocator()(*args)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = Allocator()(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out.cpu(), expected)
    with sorted_orders():  # the other path, on the device too
        assert torch.equal(Allocator()(*args).cpu(), expected)
