"""The Triton kernels behind :meth:`arrcoc.stages.scorers.PerspectivalScorer.forward` on CUDA: three launches for
what torch does in about 44 (the surround means, the two colour contrasts, the image's mean feature and the cosines
with it, ``normalize_per_image`` of the three terms, their mix, the regions' peaks and weighted means, and
``normalize_per_image`` of the regions).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton.

- :func:`sums_kernel`, one program per image and block of feature channels: the image's feature sum weighted by
  ``patch_valid`` (the mean feature's direction) over its block of channels, and (the first block's program) the
  image's ``patch_valid``-weighted Lab sum and the weights' sum.
- :func:`terms_kernel`, one program per image and block of patches: each patch's three raw terms, into a scratch
  ``(B, 3, N)``. The local contrast's surround mean sums the window's on-grid cells in raster order, as
  ``avg_pool2d`` sums them, and divides as ``_surround_mean`` does; the two colour norms are
  ``sqrt(fma(d2, d2, fma(d1, d1, d0 * d0)))``, as torch's norm rounds them. The distinctness is
  ``1 - sum((f / max(|f|, 1e-8)) * (m / max(|m|, 1e-8)))`` as ``F.cosine_similarity`` forms it.
- :func:`regions_kernel`, one program per image: the terms' ranges over the valid patches (a first pass over the
  patches in blocks), then over the regions in blocks twice (the first finds the lowest and highest region score,
  the second writes): each patch's normalised terms mixed with ``term_weights`` (read from memory), per region half
  its peak (over all its slots, zero past the grid) plus half its ``patch_valid``-weighted mean, normalised over
  the regions whose ``patch_valid`` sums above 0.

How close: the surround means are torch's bits; the local contrast is too where the hardware fuses the norm's
multiply-adds as torch's CPU kernel does (Triton's interpreter does not fuse them: within an ulp there). The image's
Lab and feature sums, the feature norms, the cosine's sum and each region's weighted mean run in another order than
torch's reductions, so those agree to float32 rounding (about 1e-7 of each value); every other step (the
normalisations, the mix, the peak, the halves) is the torch form's operations in its order, without other fused
multiply-adds. The maps agree to about 1e-6. Zeros are exact where the torch form's are: regions with no valid
patch, images with no valid patch, constant terms (an image whose valid patches are all alike). A NaN on a valid
patch makes every valid region of its image NaN, as ``amin`` and ``amax`` propagate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._normalize_triton import range_bounds, running_range
from .kernels import launch_device

__all__ = ["launch", "BLOCK_LIMIT"]

#: The most floats a program holds in one tile (patches x channels, regions x patch slots, patches).
BLOCK_LIMIT = 4096


@triton.jit
def sums_kernel(
    features_ptr,  # (B, N, D) float32, contiguous
    texture_ptr,  # (B, N, C) float32, contiguous: Lab in channels 0-2
    valid_ptr,  # (B, N) float32 patch_valid
    feature_sum_ptr,  # (B, D) float32 out: sum over patches of features * patch_valid
    lab_sum_ptr,  # (B, 4) float32 out: sum of Lab * patch_valid (3), sum of patch_valid
    patches,
    width,
    channels,
    P_BLOCK: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    p = tl.arange(0, P_BLOCK)
    d = block * D_BLOCK + tl.arange(0, D_BLOCK)
    d_in = d < width
    acc = tl.zeros([P_BLOCK, D_BLOCK], dtype=tl.float32)
    for start in range(0, patches, P_BLOCK):
        n = start + p
        n_in = n < patches
        w = tl.load(valid_ptr + image * patches + n, mask=n_in, other=0.0)
        at = (image * patches + n)[:, None] * width + d[None, :]
        f = tl.load(features_ptr + at, mask=n_in[:, None] & d_in[None, :], other=0.0)
        acc += f * w[:, None]
    tl.store(feature_sum_ptr + image * width + d, tl.sum(acc, 0), mask=d_in)
    if block == 0:
        s0 = tl.zeros([P_BLOCK], dtype=tl.float32)
        s1 = tl.zeros([P_BLOCK], dtype=tl.float32)
        s2 = tl.zeros([P_BLOCK], dtype=tl.float32)
        sw = tl.zeros([P_BLOCK], dtype=tl.float32)
        for start in range(0, patches, P_BLOCK):
            n = start + p
            n_in = n < patches
            w = tl.load(valid_ptr + image * patches + n, mask=n_in, other=0.0)
            lab = texture_ptr + (image * patches + n) * channels
            s0 += tl.load(lab + 0, mask=n_in, other=0.0) * w
            s1 += tl.load(lab + 1, mask=n_in, other=0.0) * w
            s2 += tl.load(lab + 2, mask=n_in, other=0.0) * w
            sw += w
        tl.store(lab_sum_ptr + image * 4 + 0, tl.sum(s0, 0))
        tl.store(lab_sum_ptr + image * 4 + 1, tl.sum(s1, 0))
        tl.store(lab_sum_ptr + image * 4 + 2, tl.sum(s2, 0))
        tl.store(lab_sum_ptr + image * 4 + 3, tl.sum(sw, 0))


@triton.jit
def _norm3(d0, d1, d2):
    """``torch.linalg.vector_norm`` over three channels, as torch's kernel rounds it (fused multiply-adds)."""
    return tl.sqrt_rn(tl.fma(d2, d2, tl.fma(d1, d1, d0 * d0)))


@triton.jit
def terms_kernel(
    features_ptr,  # (B, N, D) float32, contiguous
    texture_ptr,  # (B, N, C) float32, contiguous: Lab in channels 0-2
    valid_ptr,  # (B, N) float32 patch_valid
    feature_sum_ptr,  # (B, D) float32 (sums_kernel)
    lab_sum_ptr,  # (B, 4) float32 (sums_kernel)
    terms_ptr,  # (B, 3, N) float32 out: local contrast, global contrast, distinctness
    rows,  # gh
    cols,  # gw
    width,  # D
    channels,  # C
    SURROUND: tl.constexpr,
    P_BLOCK: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    patches = rows * cols
    n = tl.program_id(1) * P_BLOCK + tl.arange(0, P_BLOCK)
    n_in = n < patches
    y, x = n // cols, n % cols
    lab = texture_ptr + (image * patches + n) * channels
    l0 = tl.load(lab + 0, mask=n_in, other=0.0)
    l1 = tl.load(lab + 1, mask=n_in, other=0.0)
    l2 = tl.load(lab + 2, mask=n_in, other=0.0)

    # local contrast: the window's weighted Lab sums and weight sum over its cells on the grid, in raster order
    s0 = tl.zeros([P_BLOCK], dtype=tl.float32)
    s1 = tl.zeros([P_BLOCK], dtype=tl.float32)
    s2 = tl.zeros([P_BLOCK], dtype=tl.float32)
    sw = tl.zeros([P_BLOCK], dtype=tl.float32)
    inside = tl.zeros([P_BLOCK], dtype=tl.float32)
    for dy in tl.static_range(SURROUND):
        for dx in tl.static_range(SURROUND):
            yy = y + (dy - SURROUND // 2)
            xx = x + (dx - SURROUND // 2)
            on = n_in & (yy >= 0) & (yy < rows) & (xx >= 0) & (xx < cols)
            at = image * patches + yy * cols + xx
            w = tl.load(valid_ptr + at, mask=on, other=0.0)
            s0 += tl.load(texture_ptr + at * channels + 0, mask=on, other=0.0) * w
            s1 += tl.load(texture_ptr + at * channels + 1, mask=on, other=0.0) * w
            s2 += tl.load(texture_ptr + at * channels + 2, mask=on, other=0.0) * w
            sw += w
            inside += on.to(tl.float32)
    inside = tl.maximum(inside, 1.0)  # lanes past the grid only
    weight = tl.maximum(tl.math.div_rn(sw, inside), 1e-6)
    local = _norm3(
        l0 - tl.math.div_rn(tl.math.div_rn(s0, inside), weight),
        l1 - tl.math.div_rn(tl.math.div_rn(s1, inside), weight),
        l2 - tl.math.div_rn(tl.math.div_rn(s2, inside), weight),
    )

    # global contrast: against the image's weighted mean Lab
    total = tl.maximum(tl.load(lab_sum_ptr + image * 4 + 3), 1e-6)
    global_ = _norm3(
        l0 - tl.math.div_rn(tl.load(lab_sum_ptr + image * 4 + 0), total),
        l1 - tl.math.div_rn(tl.load(lab_sum_ptr + image * 4 + 1), total),
        l2 - tl.math.div_rn(tl.load(lab_sum_ptr + image * 4 + 2), total),
    )

    # distinctness: 1 - the cosine with the mean feature, each side divided by its clamped norm first
    dd = tl.arange(0, D_BLOCK)
    mm = tl.zeros([D_BLOCK], dtype=tl.float32)
    ff = tl.zeros([P_BLOCK, D_BLOCK], dtype=tl.float32)
    row = (image * patches + n)[:, None] * width
    for start in range(0, width, D_BLOCK):
        d = start + dd
        d_in = d < width
        m = tl.load(feature_sum_ptr + image * width + d, mask=d_in, other=0.0)
        mm += m * m
        f = tl.load(features_ptr + row + d[None, :], mask=n_in[:, None] & d_in[None, :], other=0.0)
        ff += f * f
    m_norm = tl.maximum(tl.sqrt_rn(tl.sum(mm, 0)), 1e-8)
    f_norm = tl.maximum(tl.sqrt_rn(tl.sum(ff, 1)), 1e-8)
    dot = tl.zeros([P_BLOCK, D_BLOCK], dtype=tl.float32)
    for start in range(0, width, D_BLOCK):
        d = start + dd
        d_in = d < width
        m = tl.math.div_rn(tl.load(feature_sum_ptr + image * width + d, mask=d_in, other=0.0), m_norm)
        f = tl.load(features_ptr + row + d[None, :], mask=n_in[:, None] & d_in[None, :], other=0.0)
        dot += tl.math.div_rn(f, f_norm[:, None]) * m[None, :]
    distinct = 1 - tl.sum(dot, 1)

    out = terms_ptr + image * 3 * patches + n
    tl.store(out, local, mask=n_in)
    tl.store(out + patches, global_, mask=n_in)
    tl.store(out + 2 * patches, distinct, mask=n_in)


@triton.jit
def _region_scores(
    terms_ptr,
    valid_ptr,
    image,
    start,
    rows,
    cols,
    side,
    region_cols,
    regions,
    low0,
    span0,
    low1,
    span1,
    low2,
    span2,
    tw0,
    tw1,
    tw2,
    R_BLOCK: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    """A block of regions' scores (half the peak plus half the weighted mean of their patches' mixed terms), which
    of them have a valid patch, and which are regions."""
    patches = rows * cols
    r = start + tl.arange(0, R_BLOCK)
    r_in = r < regions
    s = tl.arange(0, S_BLOCK)
    slot_in = s < side * side
    y = (r // region_cols)[:, None] * side + (s // side)[None, :]
    x = (r % region_cols)[:, None] * side + (s % side)[None, :]
    on = r_in[:, None] & slot_in[None, :] & (y < rows) & (x < cols)
    at = y * cols + x
    w = tl.load(valid_ptr + image * patches + at, mask=on, other=0.0)
    keep = on & (w > 0)
    term = terms_ptr + image * 3 * patches + at
    t0 = tl.load(term, mask=on, other=0.0)
    t1 = tl.load(term + patches, mask=on, other=0.0)
    t2 = tl.load(term + 2 * patches, mask=on, other=0.0)
    t0 = tl.where(keep, tl.math.div_rn(t0 - low0, span0), 0.0)
    t1 = tl.where(keep, tl.math.div_rn(t1 - low1, span1), 0.0)
    t2 = tl.where(keep, tl.math.div_rn(t2 - low2, span2), 0.0)
    patch = t0 * tw0 + t1 * tw1 + t2 * tw2  # 0 on invalid patches and past the grid
    peak = tl.max(tl.where(slot_in[None, :], patch, float("-inf")), 1)
    peak = tl.where(tl.max((patch != patch).to(tl.int32), 1) > 0, float("nan"), peak)  # amax propagates NaN
    weight = tl.sum(w, 1)
    mean = tl.math.div_rn(tl.sum(patch * w, 1), tl.maximum(weight, 1e-12))
    return 0.5 * peak + 0.5 * mean, r_in & (weight > 0), r_in


@triton.jit
def regions_kernel(
    terms_ptr,  # (B, 3, N) float32 (terms_kernel)
    valid_ptr,  # (B, N) float32 patch_valid
    weights_ptr,  # (3,) float32 term_weights
    out_ptr,  # (B, rh, rw) float32 out
    rows,
    cols,
    side,
    region_cols,  # rw
    regions,  # rh * rw
    N_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    patches = rows * cols

    # the terms' ranges over the image's valid patches
    p = tl.arange(0, N_BLOCK)
    low0 = tl.full([N_BLOCK], float("inf"), tl.float32)
    high0 = tl.full([N_BLOCK], float("-inf"), tl.float32)
    nan0 = tl.zeros([N_BLOCK], dtype=tl.int32)
    low1, high1, nan1 = low0, high0, nan0
    low2, high2, nan2 = low0, high0, nan0
    for start in range(0, patches, N_BLOCK):
        n = start + p
        n_in = n < patches
        keep = n_in & (tl.load(valid_ptr + image * patches + n, mask=n_in, other=0.0) > 0)
        term = terms_ptr + image * 3 * patches + n
        low0, high0, nan0 = running_range(tl.load(term, mask=n_in, other=0.0), keep, low0, high0, nan0)
        low1, high1, nan1 = running_range(tl.load(term + patches, mask=n_in, other=0.0), keep, low1, high1, nan1)
        low2, high2, nan2 = running_range(tl.load(term + 2 * patches, mask=n_in, other=0.0), keep, low2, high2, nan2)
    low0, span0 = range_bounds(low0, high0, nan0)
    low1, span1 = range_bounds(low1, high1, nan1)
    low2, span2 = range_bounds(low2, high2, nan2)
    tw0 = tl.load(weights_ptr + 0)
    tw1 = tl.load(weights_ptr + 1)
    tw2 = tl.load(weights_ptr + 2)

    # the region scores' range over the regions with a valid patch, then the scores normalised by it
    low = tl.full([R_BLOCK], float("inf"), tl.float32)
    high = tl.full([R_BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([R_BLOCK], dtype=tl.int32)
    for start in range(0, regions, R_BLOCK):
        score, keep, _ = _region_scores(
            terms_ptr, valid_ptr, image, start, rows, cols, side, region_cols, regions,
            low0, span0, low1, span1, low2, span2, tw0, tw1, tw2, R_BLOCK, S_BLOCK,
        )  # fmt: skip
        low, high, nan = running_range(score, keep, low, high, nan)
    lowest, span = range_bounds(low, high, nan)
    r = tl.arange(0, R_BLOCK)
    for start in range(0, regions, R_BLOCK):
        score, keep, r_in = _region_scores(
            terms_ptr, valid_ptr, image, start, rows, cols, side, region_cols, regions,
            low0, span0, low1, span1, low2, span2, tw0, tw1, tw2, R_BLOCK, S_BLOCK,
        )  # fmt: skip
        scaled = tl.where(keep, tl.math.div_rn(score - lowest, span), 0.0)
        tl.store(out_ptr + image * regions + start + r, scaled, mask=r_in)


def launch(
    texture: Tensor,
    features: Tensor,
    patch_valid: Tensor,
    side: int,
    surround: int,
    term_weights: Tensor,
    *,
    patch_block: int | None = None,
    width_block: int | None = None,
    region_block: int | None = None,
) -> Tensor:
    """The perspectival map: ``PerspectivalScorer(side, surround, term_weights)(features, texture, patch_valid, ...)``
    to float32 rounding (see the module's docstring), in three launches and no host sync.

    Args:
        texture: ``(B, gh, gw, C)`` float32, ``C >= 3``, L*a*b* in the first three channels (read in place).
        features: ``(B, gh, gw, D)`` float32 patch features.
        patch_valid: ``(B, gh, gw)`` float32, each patch's share of image in [0, 1].
        side: region side in patches.
        surround: the local contrast's window side (odd; the scorer's default is 5).
        term_weights: the scorer's ``term_weights`` buffer, 3 float32 values on the device (any shape, contiguous),
            read by the kernel (never by the host: no sync, so the call can be captured in a CUDA graph).
        patch_block, width_block, region_block: the patches, feature channels and regions a program takes at once
            (powers of two; defaults: what fits :data:`BLOCK_LIMIT`); a test passes small ones to exercise the
            blocked loops.

    Returns:
        ``(B, rh, rw)`` float32 in [0, 1]: 0 on regions with no valid patch.
    """
    if surround % 2 != 1:
        raise ValueError(f"surround must be odd, got {surround}")
    texture, features, patch_valid = texture.contiguous(), features.contiguous(), patch_valid.contiguous()
    b, gh, gw, c = texture.shape
    d = features.shape[-1]
    n = gh * gw
    device = texture.device
    weights = term_weights.reshape(3).contiguous()
    rh, rw = -(-gh // side), -(-gw // side)
    out = torch.empty(b, rh, rw, dtype=torch.float32, device=device)
    if not out.numel():
        return out
    full = triton.next_power_of_2(max(n, 16))  # no block narrower than 16 lanes by default
    width_block = width_block or min(128, triton.next_power_of_2(max(d, 16)))
    sums_width = min(width_block, 64)  # narrower for the sums: more programs per image
    sums_block = patch_block or min(full, BLOCK_LIMIT // sums_width)
    range_block = patch_block or min(full, 1024)
    patch_block = patch_block or min(full, BLOCK_LIMIT // width_block)
    slot_block = triton.next_power_of_2(side * side)
    region_block = region_block or min(
        triton.next_power_of_2(max(rh * rw, -(-16 // slot_block))), max(1, BLOCK_LIMIT // slot_block)
    )
    tile = max(region_block * slot_block, range_block)
    warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 1
    feature_sum = torch.empty(b, d, dtype=torch.float32, device=device)
    lab_sum = torch.empty(b, 4, dtype=torch.float32, device=device)
    terms = torch.empty(b, 3, n, dtype=torch.float32, device=device)
    with launch_device(texture):
        sums_kernel[(b, triton.cdiv(d, sums_width))](
            features, texture, patch_valid, feature_sum, lab_sum, n, d, c,
            P_BLOCK=sums_block, D_BLOCK=sums_width, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
        terms_kernel[(b, triton.cdiv(n, patch_block))](
            features, texture, patch_valid, feature_sum, lab_sum, terms, gh, gw, d, c,
            SURROUND=surround, P_BLOCK=patch_block, D_BLOCK=width_block, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
        regions_kernel[(b,)](
            terms, patch_valid, weights, out, gh, gw, side, rw, rh * rw,
            N_BLOCK=range_block, R_BLOCK=region_block, S_BLOCK=slot_block,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out
