"""The Triton kernels behind the participatory scorer on CUDA: :func:`coupling`, one launch for what
:func:`arrcoc.stages.scorers.query_coupling` does in six when the unit patches are given (normalise the query tokens,
the einsum of the patches with them, the masked fill of padding tokens, the max over tokens), and :func:`peak`, one
launch for what :meth:`arrcoc.stages.scorers.ParticipatoryScorer.from_coupling` does in about twelve (the regions of
the coupling and of the patch validity, the peak per region over its valid patches, ``normalize_per_image`` over the
regions with a valid patch, the product with whether the image has a query).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton.

:func:`coupling`: one program per image and block of patches. For each block of query tokens it normalises the
tokens as ``F.normalize`` does (``x / max(||x||, 1e-12)``, the square root and the division rounded to nearest),
takes the dot products with the block's unit patches (``tl.dot`` in IEEE float32, loops over the width), puts -2 on
padding tokens and keeps the running max. The sums run in another order than torch's norm and cuBLAS's product, so
the cosines agree to float32 rounding (about 1e-7 at widths of tens, a few 1e-6 at 768), not bit for bit; -2 where
the image has no real token is exact, and so is the 0 of a token or patch of all zeros. A NaN cosine with a real
token gives NaN, as ``amax`` propagates it.

:func:`peak`: one program per image, over its regions in blocks (two passes: the first finds the lowest and highest
peak, the second writes). The same operations in the same order as the torch form: per region the max of the
coupling over its patches with ``patch_valid > 0``, -2 on its other patch slots (the grid's padding too), the
min-max normalisation over the regions whose ``patch_valid`` sums above 0 (a division rounded to nearest), times 1
or 0. So the bits are the same (for ``patch_valid >= 0``, where a region's sum is above 0 exactly where one of its
patches is, whatever the order of the sum), NaN included: a NaN coupling on a valid patch makes every valid region
of the image NaN, as ``amax`` and ``amin`` propagate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._normalize_triton import range_bounds, running_range
from .kernels import launch_device

__all__ = ["coupling", "peak", "BLOCK_LIMIT"]

#: The most floats a program holds in one tile (regions x patch slots, patches x width, tokens x width).
BLOCK_LIMIT = 4096
#: The most regions :func:`peak` takes at once: compiled for the GPU, wider blocks gave other peaks than the torch
#: form's while 16 and 64 gave its bits (why is not known: docs/decisions.md, "The head's stages as Triton kernels").
PEAK_REGIONS = 64


@triton.jit
def coupling_kernel(
    unit_ptr,  # (B, N, D) float32, contiguous: unit-length patch features
    query_ptr,  # (B, L, D) float32, contiguous
    mask_ptr,  # (B, L) uint8: real query tokens
    out_ptr,  # (B, N) float32 out
    patches,  # N
    tokens,  # L
    width,  # D
    N_BLOCK: tl.constexpr,
    L_BLOCK: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * N_BLOCK + tl.arange(0, N_BLOCK)
    n_in = n < patches
    t = tl.arange(0, L_BLOCK)
    d = tl.arange(0, D_BLOCK)
    unit_rows = unit_ptr + (image * patches + n[:, None]) * width
    best = tl.full([N_BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([N_BLOCK], dtype=tl.int32)
    for t0 in range(0, tokens, L_BLOCK):
        at = t0 + t
        t_in = at < tokens
        query_rows = query_ptr + (image * tokens + at[:, None]) * width
        # the tokens' lengths: F.normalize's x / max(||x||, 1e-12)
        squares = tl.zeros([L_BLOCK, D_BLOCK], dtype=tl.float32)
        for d0 in range(0, width, D_BLOCK):
            dd = d0 + d
            x = tl.load(query_rows + dd[None, :], mask=t_in[:, None] & (dd < width)[None, :], other=0.0)
            squares += x * x
        norm = tl.maximum(tl.sqrt_rn(tl.sum(squares, 1)), 1e-12)
        # the cosines of the block's patches with the block's tokens
        cosine = tl.zeros([N_BLOCK, L_BLOCK], dtype=tl.float32)
        for d0 in range(0, width, D_BLOCK):
            dd = d0 + d
            d_in = (dd < width)[None, :]
            u = tl.load(unit_rows + dd[None, :], mask=n_in[:, None] & d_in, other=0.0)
            x = tl.load(query_rows + dd[None, :], mask=t_in[:, None] & d_in, other=0.0)
            cosine = tl.dot(u, tl.trans(tl.math.div_rn(x, norm[:, None])), cosine, input_precision="ieee")
        real = (tl.load(mask_ptr + image * tokens + at, mask=t_in, other=0) != 0)[None, :]
        nan = tl.maximum(nan, tl.max((real & (cosine != cosine)).to(tl.int32), 1))
        cosine = tl.where(real, cosine, -2.0)  # padding tokens never win
        best = tl.maximum(best, tl.max(tl.where(t_in[None, :], cosine, float("-inf")), 1))
    tl.store(out_ptr + image * patches + n, tl.where(nan > 0, float("nan"), best), mask=n_in)


@triton.jit
def _region_peak(
    coupling_ptr,
    valid_ptr,
    image,
    r,  # (R_BLOCK,) region indices
    gh,
    gw,
    regions,
    region_cols,  # rw
    side,
    R_BLOCK: tl.constexpr,
    P_BLOCK: tl.constexpr,
):
    """Per region of ``r``: the peak coupling over its patches with ``patch_valid > 0`` (-2 on its other slots, NaN
    if one of those is NaN), and whether its ``patch_valid`` sums above 0."""
    r_in = r < regions
    top = (r // region_cols) * side
    left = (r % region_cols) * side
    slots = side * side
    p = tl.arange(0, P_BLOCK)
    best = tl.full([R_BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([R_BLOCK], dtype=tl.float32)
    nan = tl.zeros([R_BLOCK], dtype=tl.int32)
    for p0 in range(0, slots, P_BLOCK):
        slot = p0 + p
        row = top[:, None] + (slot // side)[None, :]
        col = left[:, None] + (slot % side)[None, :]
        exists = r_in[:, None] & (slot < slots)[None, :]  # a slot of a region (on the grid or its padding)
        on_grid = exists & (row < gh) & (col < gw)
        at = (image * gh + row) * gw + col
        weight = tl.load(valid_ptr + at, mask=on_grid, other=0.0)
        value = tl.load(coupling_ptr + at, mask=on_grid, other=0.0)
        keep = weight > 0
        value = tl.where(keep, value, tl.where(exists, -2.0, float("-inf")))
        best = tl.maximum(best, tl.max(value, 1))
        nan = tl.maximum(nan, tl.max((keep & (value != value)).to(tl.int32), 1))
        total += tl.sum(weight, 1)
    return tl.where(nan > 0, float("nan"), best), total > 0


@triton.jit
def peak_kernel(
    coupling_ptr,  # (B, gh, gw) float32, contiguous
    valid_ptr,  # (B, gh, gw) float32, contiguous: patch_valid
    mask_ptr,  # (B, L) uint8: real query tokens
    out_ptr,  # (B, rh, rw) float32 out
    gh,
    gw,
    region_cols,  # rw
    regions,  # rh * rw
    side,
    tokens,  # L
    R_BLOCK: tl.constexpr,
    P_BLOCK: tl.constexpr,
    L_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, R_BLOCK)
    t = tl.arange(0, L_BLOCK)
    asked = tl.zeros([L_BLOCK], dtype=tl.int32)
    for t0 in range(0, tokens, L_BLOCK):
        at = t0 + t
        asked = tl.maximum(asked, tl.load(mask_ptr + image * tokens + at, mask=at < tokens, other=0).to(tl.int32))
    has_query = (tl.max(asked, 0) > 0).to(tl.float32)
    # normalize_per_image over the regions with a valid patch: their lowest and highest peak
    low = tl.full([R_BLOCK], float("inf"), tl.float32)
    high = tl.full([R_BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([R_BLOCK], dtype=tl.int32)
    for r0 in range(0, regions, R_BLOCK):
        peak, keep = _region_peak(
            coupling_ptr, valid_ptr, image, r0 + lane, gh, gw, regions, region_cols, side, R_BLOCK, P_BLOCK
        )
        low, high, nan = running_range(peak, keep, low, high, nan)
    lowest, span = range_bounds(low, high, nan)
    for r0 in range(0, regions, R_BLOCK):
        r = r0 + lane
        peak, keep = _region_peak(
            coupling_ptr, valid_ptr, image, r, gh, gw, regions, region_cols, side, R_BLOCK, P_BLOCK
        )
        score = tl.where(keep, tl.math.div_rn(peak - lowest, span), 0.0)
        tl.store(out_ptr + image * regions + r, score * has_query, mask=r < regions)


def coupling(
    unit: Tensor,
    query: Tensor,
    query_mask: Tensor,
    n_block: int | None = None,
    l_block: int | None = None,
    d_block: int | None = None,
) -> Tensor:
    """Per patch the best cosine with any real query token: ``query_coupling(features, query, query_mask, unit)``
    flattened, to float32 rounding.

    Args:
        unit: ``(B, N, D)`` float32 unit-length patch features (:func:`arrcoc.stages.scorers.unit_patches`).
        query: ``(B, L, D)`` float32 query tokens, ``L >= 1``.
        query_mask: ``(B, L)`` bool, True on real tokens.
        n_block, l_block, d_block: patches, tokens and width a program takes at once (powers of two, at least 16;
            defaults 64, up to 64 and 32); a test passes small ones to exercise the blocked loops.

    Returns:
        ``(B, N)`` float32: -2 where the image has no real token.
    """
    unit, query = unit.contiguous(), query.contiguous()
    mask = query_mask.contiguous().view(torch.uint8)
    b, n, d = unit.shape
    tokens = query.shape[1]
    out = torch.empty(b, n, dtype=torch.float32, device=unit.device)
    n_block = n_block or 64
    l_block = l_block or min(64, triton.next_power_of_2(max(tokens, 16)))
    d_block = d_block or 32
    if out.numel():
        with launch_device(unit):
            coupling_kernel[(b, triton.cdiv(n, n_block))](
                unit, query, mask, out, n, tokens, d, N_BLOCK=n_block, L_BLOCK=l_block, D_BLOCK=d_block, num_warps=4
            )
    return out


def peak(
    coupling: Tensor,
    patch_valid: Tensor,
    query_mask: Tensor,
    side: int,
    r_block: int | None = None,
    p_block: int | None = None,
    l_block: int | None = None,
) -> Tensor:
    """The participatory map from each patch's coupling: ``ParticipatoryScorer(side).from_coupling(coupling,
    patch_valid, query_mask)``, bit for bit.

    Args:
        coupling: ``(B, gh, gw)`` float32 (or ``(B, gh * gw)``, what :func:`coupling` returns).
        patch_valid: ``(B, gh, gw)`` float32, each patch's share of image (``>= 0``).
        query_mask: ``(B, L)`` bool, True on real query tokens.
        side: region side in patches.
        r_block, p_block, l_block: regions, patch slots of a region and query tokens a program takes at once
            (powers of two; defaults: what fits :data:`BLOCK_LIMIT`); a test passes small ones to exercise the
            blocked loops.

    Returns:
        ``(B, rh, rw)`` float32 in [0, 1]: 0 on regions with no valid patch and on images with no query.
    """
    patch_valid = patch_valid.contiguous()
    b, gh, gw = patch_valid.shape
    coupling = coupling.reshape(b, gh, gw).contiguous()
    mask = query_mask.contiguous().view(torch.uint8)
    tokens = mask.shape[1]
    rh, rw = -(-gh // side), -(-gw // side)
    out = torch.empty(b, rh, rw, dtype=torch.float32, device=coupling.device)
    p_block = p_block or min(BLOCK_LIMIT, triton.next_power_of_2(side * side))
    r_block = r_block or min(PEAK_REGIONS, triton.next_power_of_2(rh * rw), max(1, BLOCK_LIMIT // p_block))
    l_block = l_block or min(1024, triton.next_power_of_2(max(tokens, 1)))
    if out.numel():
        with launch_device(coupling):
            peak_kernel[(b,)](
                coupling, patch_valid, mask, out, gh, gw, rw, rh * rw, side, tokens,
                R_BLOCK=r_block, P_BLOCK=p_block, L_BLOCK=l_block, num_warps=4 if r_block * p_block >= 1024 else 1,
                enable_fp_fusion=False,
            )  # fmt: skip
    return out
