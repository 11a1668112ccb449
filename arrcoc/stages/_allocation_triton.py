"""The Triton kernel behind :class:`arrcoc.stages.allocation.Allocator` on CUDA: one image's water-filling and
rounding in one program, where torch takes about 60 launches (the pairwise order's path).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One lane per region,
in float64 as the torch form: the level at every breakpoint (each one's sum over the regions), the last breakpoint
within the budget, the level, its floor, and one more token for the regions first in the order of larger fraction,
larger relevance, lower index (each region's place counted against every other). The sums run in another order than
torch's, so a level can differ from the torch form's by a float64 rounding; the integer allocation differs only where
that rounding crosses a whole number of tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch"]


@triton.jit
def _at(values, lane, index):
    """``values[index]`` of a lane vector (a sum over the lanes, so every thread gets it)."""
    return tl.sum(tl.where(lane == index, values, 0.0), 0)


@triton.jit
def allocation_kernel(
    relevance_ptr,  # (B, R) float32
    budget_ptr,  # (B,) int64
    low_ptr,  # (B, R) int64
    high_ptr,  # (B, R) int64
    out_ptr,  # (B, R) int64
    regions,
    R_BLOCK: tl.constexpr,
    FLOOR: tl.constexpr,  # _FLOOR
    LOW_IF_MET: tl.constexpr,  # Allocator: a budget below the minima's sum drops the minima
):
    image = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, R_BLOCK)
    inside = lane < regions
    row = image * regions + lane
    relevance = tl.maximum(tl.load(relevance_ptr + row, mask=inside, other=0.0).to(tl.float64), 0.0)
    low_int = tl.load(low_ptr + row, mask=inside, other=0)
    high_int = tl.load(high_ptr + row, mask=inside, other=0)
    budget_int = tl.load(budget_ptr + image)
    if LOW_IF_MET:
        low_int = tl.where(budget_int < tl.sum(low_int, 0), 0, low_int)
    low, high, total = low_int.to(tl.float64), high_int.to(tl.float64), budget_int.to(tl.float64)
    weight = relevance + tl.full([], FLOOR, tl.float64) * (tl.max(tl.where(inside, relevance, 0.0), 0) + 1)
    starts, stops = low / weight, high / weight

    # the last breakpoint whose sum is within the budget (the first if rounding lifts even that one above it)
    best = tl.full([], float("-inf"), tl.float64)
    first = tl.full([], float("inf"), tl.float64)
    for event in range(0, 2 * regions):
        value = tl.where(event < regions, _at(starts, lane, event), _at(stops, lane, event - regions))
        level = tl.minimum(tl.maximum(value * weight, low), high)
        level_sum = tl.sum(tl.where(inside, level, 0.0), 0)
        best = tl.where((level_sum <= total) & (value > best), value, best)
        first = tl.minimum(first, value)
    lam0 = tl.where(best > float("-inf"), best, first)
    s0 = tl.sum(tl.where(inside, tl.minimum(tl.maximum(lam0 * weight, low), high), 0.0), 0)
    k0 = tl.sum(tl.where(inside & (starts <= lam0) & (lam0 < stops), weight, 0.0), 0)
    lam = lam0 + tl.maximum(total - s0, 0.0) / tl.maximum(k0, tl.full([], 1e-300, tl.float64))
    level = tl.minimum(tl.maximum(lam * weight, low), high)

    # the floor, then one more token for the first `missing` regions with room
    base = tl.minimum(tl.maximum(tl.floor(level), low), high)
    missing = total - tl.sum(tl.where(inside, base, 0.0), 0)
    fraction = tl.where(base < high, level - base, -1.0)
    place = tl.zeros([R_BLOCK], dtype=tl.int32)
    for other in range(0, regions):
        f_other = _at(fraction, lane, other)
        r_other = _at(relevance, lane, other)
        ahead = (f_other > fraction) | (
            (f_other == fraction) & ((r_other > relevance) | ((r_other == relevance) & (other < lane)))
        )
        place += ahead.to(tl.int32)
    extra = (place.to(tl.float64) < missing) & (base < high)
    tl.store(out_ptr + row, base.to(tl.int64) + extra.to(tl.int64), mask=inside)


def launch(relevance: Tensor, budget: Tensor, low: Tensor, high: Tensor, floor_share: float, drop_low: bool) -> Tensor:
    """``(B, R)`` relevance, ``(B,)`` budget, ``(B, R)`` int64 bounds -> ``(B, R)`` int64 allocation, as
    ``allocation._allocate`` (after ``Allocator``'s dropping of the minima where ``drop_low``)."""
    b, r = relevance.shape
    out = torch.empty(b, r, dtype=torch.long, device=relevance.device)
    if b and r:
        with launch_device(relevance):
            allocation_kernel[(b,)](
                relevance.float().contiguous(), budget.long().contiguous(), low.long().contiguous(),
                high.long().contiguous(), out, r,
                R_BLOCK=triton.next_power_of_2(r), FLOOR=floor_share, LOW_IF_MET=drop_low, num_warps=1 if r <= 128 else 4,
                enable_fp_fusion=False,
            )  # fmt: skip
    return out
