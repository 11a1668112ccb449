"""The Triton kernel behind :func:`arrcoc.stages.regions.normalize_per_image` on CUDA: one launch for what torch
does in nine (two masked fills, a minimum, a maximum, two differences, a clamp, a division and a fill).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One program per
map: a first pass over the map's valid entries finds its minimum and maximum, a second writes
``(x - low) / max(high - low, 1e-12)`` there and 0 elsewhere. The same IEEE operations in the same order as the
torch form (the division rounded to nearest, as torch divides), so the bits are the same; a NaN on a valid entry
makes every valid entry NaN, as ``amin`` and ``amax`` propagate it there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch", "BLOCK_LIMIT", "running_range", "range_bounds", "normalized"]

#: The widest block a program reads at once; longer maps are read in blocks of this size.
BLOCK_LIMIT = 4096


@triton.jit
def running_range(x, keep, low, high, nan):
    """The running minimum, maximum and NaN flag of ``x`` over ``keep``, lane by lane (the other head kernels
    normalise with these too)."""
    low = tl.minimum(low, tl.where(keep, x, float("inf")))
    high = tl.maximum(high, tl.where(keep, x, float("-inf")))
    nan = tl.maximum(nan, (keep & (x != x)).to(tl.int32))
    return low, high, nan


@triton.jit
def range_bounds(low, high, nan):
    """``(lowest, span)`` of a :func:`running_range`: NaN lowest where a kept entry is NaN, as ``amin`` gives, and
    the span clamped to 1e-12, as ``normalize_per_image`` clamps it."""
    lowest = tl.where(tl.max(nan, 0) > 0, float("nan"), tl.min(low, 0))
    return lowest, tl.maximum(tl.max(high, 0) - lowest, 1e-12)


@triton.jit
def normalized(x, keep):
    """``normalize_per_image`` of one block held whole: min-max over ``keep``, 0 elsewhere."""
    low, high, nan = running_range(
        x, keep, tl.full(x.shape, float("inf"), tl.float32), tl.full(x.shape, float("-inf"), tl.float32),
        tl.zeros(x.shape, dtype=tl.int32),
    )  # fmt: skip
    lowest, span = range_bounds(low, high, nan)
    return tl.where(keep, tl.math.div_rn(x - lowest, span), 0.0)


@triton.jit
def normalize_kernel(
    score_ptr,  # (B, K, R) float32, contiguous
    valid_ptr,  # (B, R) uint8, contiguous
    out_ptr,  # (B, K, R) float32 out
    maps,  # K
    length,  # R
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one map: image row // maps, map row % maps
    offs = tl.arange(0, BLOCK)
    score_row = score_ptr + row * length
    valid_row = valid_ptr + (row // maps) * length
    low = tl.full([BLOCK], float("inf"), tl.float32)
    high = tl.full([BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, length, BLOCK):
        idx = start + offs
        inside = idx < length
        x = tl.load(score_row + idx, mask=inside, other=0.0)
        keep = tl.load(valid_row + idx, mask=inside, other=0) != 0
        low, high, nan = running_range(x, keep, low, high, nan)
    lowest, span = range_bounds(low, high, nan)
    for start in range(0, length, BLOCK):
        idx = start + offs
        inside = idx < length
        x = tl.load(score_row + idx, mask=inside, other=0.0)
        keep = tl.load(valid_row + idx, mask=inside, other=0) != 0
        tl.store(out_ptr + row * length + idx, tl.where(keep, tl.math.div_rn(x - lowest, span), 0.0), mask=inside)


def launch(flat: Tensor, mask: Tensor, block: int | None = None) -> Tensor:
    """``(B, K, R)`` float32 maps, ``(B, R)`` bool validity -> the maps min-max normalised over the valid entries.

    ``block``: the entries a program reads at once (default: the map's length up to :data:`BLOCK_LIMIT`, a power of
    two); a test passes a small one to exercise the blocked passes.
    """
    flat, valid = flat.contiguous(), mask.contiguous().view(torch.uint8)
    b, k, r = flat.shape
    out = torch.empty_like(flat)
    block = block or min(BLOCK_LIMIT, triton.next_power_of_2(max(r, 16)))
    if flat.numel():
        with launch_device(flat):
            normalize_kernel[(b * k,)](flat, valid, out, k, r, BLOCK=block, num_warps=4 if block >= 1024 else 1)
    return out
