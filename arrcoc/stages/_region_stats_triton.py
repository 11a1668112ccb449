"""The Triton kernels behind the regions' feature statistics on CUDA: the propositional scorer
(:class:`arrcoc.stages.scorers.PropositionalScorer`, about 30 launches in torch, 2 here) and the unit mean feature
of each region that the balance's similarity multiplies (:meth:`arrcoc.stages.balance.Balance.similarity`, 11
launches before its product, 1 here).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. ``region_kernel`` is
one program per region: it reads the region's patches once per pass, weighted by their validity, and keeps per
channel the weighted sum and sum of squares (the torch form's ``masked_mean`` of the values and of their squares).
From them it writes either the propositional scorer's four raw terms (mean edge density, mean contrast, the Lab
colour spread, the feature spread) or the region's mean feature scaled to unit length. ``mix_kernel``, one program
per image (its regions in registers: the caller keeps the torch form past ``scorers.KERNEL_REGIONS``), min-max
normalises each term over the regions with image content, mixes them by the scorer's weights and
normalises the mix, as ``normalize_per_image`` does. The same formulas in the same order as the torch forms; the
sums over a region's patches and over the channels run in another order, so the two agree to float32 rounding, not
bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._normalize_triton import normalized
from .kernels import launch_device

__all__ = ["propositional", "region_units"]


@triton.jit
def _moments(ptr, patch, on, w, den, channel, channels, stride):
    """Per channel of a block, the weighted mean of the region's values and of their squares: ``(C,)`` twice."""
    inside = channel < channels
    x = tl.load(ptr + patch[:, None] * stride + channel[None, :], mask=on[:, None] & inside[None, :], other=0.0)
    mean = tl.math.div_rn(tl.sum(x * w[:, None], 0), den)
    square = tl.math.div_rn(tl.sum(x * x * w[:, None], 0), den)
    return mean, square, inside


@triton.jit
def region_kernel(
    texture_ptr,  # (B, gh, gw, TC) float32 (TERMS)
    features_ptr,  # (B, gh, gw, D) float32
    valid_ptr,  # (B, gh, gw) float32: the share of each patch that is image
    terms_ptr,  # (B, 4, R) float32 out (TERMS): edge, contrast, colour spread, feature spread
    region_valid_ptr,  # (B, R) uint8 out (TERMS): whether the region has image content
    unit_ptr,  # (B, R, D) float32 out (UNIT): the region's mean feature at unit length
    gh,
    gw,
    rw,
    regions,
    width,  # D
    width_float,  # D as a float (an int argument of 1 is a compile-time constant)
    texture_channels,  # TC
    SIDE: tl.constexpr,
    P_BLOCK: tl.constexpr,
    D_BLOCK: tl.constexpr,
    TERMS: tl.constexpr,
    UNIT: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    image, region = program // regions, program % regions
    slot = tl.arange(0, P_BLOCK)
    row = (region // rw) * SIDE + slot // SIDE
    col = (region % rw) * SIDE + slot % SIDE
    on = (slot < SIDE * SIDE) & (row < gh) & (col < gw)  # the region's patch slots on the grid
    patch = (image * gh + row) * gw + col
    w = tl.load(valid_ptr + patch, mask=on, other=0.0)
    total = tl.sum(w, 0)
    den = tl.maximum(total, 1e-12)
    lane = tl.arange(0, D_BLOCK)
    if TERMS:
        tex, tex_square, texture_inside = _moments(texture_ptr, patch, on, w, den, tl.arange(0, 8), 5, texture_channels)
        var = tl.where(texture_inside, tl.maximum(tex_square - tex * tex, 0.0), 0.0)
        colour = tl.sqrt_rn(
            tl.math.div_rn(tl.sum(tl.where(tl.arange(0, 8) < 3, var, 0.0), 0), tl.full([], 3.0, tl.float32))
        )
        edge = tl.sum(tl.where(tl.arange(0, 8) == 3, tex, 0.0), 0)
        contrast = tl.sum(tl.where(tl.arange(0, 8) == 4, tex, 0.0), 0)
        spread = tl.zeros([D_BLOCK], dtype=tl.float32)
        for start in range(0, width, D_BLOCK):
            mean, square, inside = _moments(features_ptr, patch, on, w, den, start + lane, width, width)
            spread += tl.where(inside, tl.maximum(square - mean * mean, 0.0), 0.0)
        spread = tl.sqrt_rn(tl.math.div_rn(tl.sum(spread, 0), width_float))
        out = terms_ptr + image * 4 * regions + region
        tl.store(out, edge)
        tl.store(out + regions, contrast)
        tl.store(out + 2 * regions, colour)
        tl.store(out + 3 * regions, spread)
        tl.store(region_valid_ptr + program, (total > 0).to(tl.uint8))
    if UNIT:
        norm = tl.zeros([D_BLOCK], dtype=tl.float32)
        for start in range(0, width, D_BLOCK):
            mean, _, inside = _moments(features_ptr, patch, on, w, den, start + lane, width, width)
            norm += mean * mean
        norm = tl.maximum(tl.sqrt_rn(tl.sum(norm, 0)), 1e-12)
        for start in range(0, width, D_BLOCK):
            mean, _, inside = _moments(features_ptr, patch, on, w, den, start + lane, width, width)
            tl.store(unit_ptr + program * width + start + lane, tl.math.div_rn(mean, norm), mask=inside)


@triton.jit
def mix_kernel(
    terms_ptr,  # (B, K, R) float32
    valid_ptr,  # (B, R) uint8: regions with image content
    weights_ptr,  # (K,) float32
    out_ptr,  # (B, R) float32 out
    regions,
    K: tl.constexpr,
    R_BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, R_BLOCK)
    inside = lane < regions
    keep = tl.load(valid_ptr + image * regions + lane, mask=inside, other=0) != 0
    mixed = tl.zeros([R_BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        term = tl.load(terms_ptr + (image * K + k) * regions + lane, mask=inside, other=0.0)
        mixed += normalized(term, keep) * tl.load(weights_ptr + k)
    tl.store(out_ptr + image * regions + lane, normalized(mixed, keep), mask=inside)


def _blocks(side: int, width: int, block: int | None) -> tuple[int, int]:
    """``(P_BLOCK, D_BLOCK)``: a power of two over the region's slots, and the channels read at once (a
    ``P_BLOCK x D_BLOCK`` tile of at most 4,096 floats unless ``block`` says otherwise)."""
    slots = triton.next_power_of_2(side * side)
    return slots, block or max(1, min(triton.next_power_of_2(width), 4096 // slots))


def _regions_of(patch_valid: Tensor, side: int) -> tuple[int, int, int]:
    gh, gw = patch_valid.shape[1:]
    rh, rw = -(-gh // side), -(-gw // side)
    return rh, rw, rh * rw


def propositional(
    texture: Tensor, features: Tensor, patch_valid: Tensor, side: int, term_weights: Tensor, block: int | None = None
) -> Tensor:
    """``PropositionalScorer``'s map in two launches: ``(B, gh, gw, >= 5)`` texture, ``(B, gh, gw, D)`` features and
    ``(B, gh, gw)`` patch validity, all float32, and its ``(4,)`` term weights (read on the device) ->
    ``(B, rh, rw)``. ``block``: the feature channels a pass reads at once (a test's small one exercises the loop)."""
    texture, features, patch_valid = texture.contiguous(), features.contiguous(), patch_valid.contiguous()
    b, gh, gw, d = features.shape
    rh, rw, r = _regions_of(patch_valid, side)
    p_block, d_block = _blocks(side, d, block)
    terms = torch.empty(b, 4, r, device=features.device, dtype=torch.float32)
    out = torch.empty(b, rh, rw, device=features.device, dtype=torch.float32)
    valid = torch.empty(b, r, device=features.device, dtype=torch.uint8)
    if b == 0:
        return out
    with launch_device(features):
        region_kernel[(b * r,)](
            texture, features, patch_valid, terms, valid, terms, gh, gw, rw, r, d, float(d), texture.shape[-1],
            SIDE=side, P_BLOCK=p_block, D_BLOCK=d_block, TERMS=True, UNIT=False, enable_fp_fusion=False,
        )  # fmt: skip
        mix_kernel[(b,)](
            terms,
            valid,
            term_weights.reshape(-1).contiguous(),
            out,
            r,
            K=4,
            R_BLOCK=triton.next_power_of_2(r),
            enable_fp_fusion=False,
        )
    return out


def region_units(features: Tensor, patch_valid: Tensor, side: int, block: int | None = None) -> Tensor:
    """Each region's valid-weighted mean feature at unit length, ``(B, gh, gw, D), (B, gh, gw) -> (B, R, D)``, in
    one launch (what ``Balance.similarity`` multiplies)."""
    features, patch_valid = features.contiguous(), patch_valid.contiguous()
    b, gh, gw, d = features.shape
    _, rw, r = _regions_of(patch_valid, side)
    p_block, d_block = _blocks(side, d, block)
    unit = torch.empty(b, r, d, device=features.device, dtype=torch.float32)
    if unit.numel():
        with launch_device(features):
            region_kernel[(b * r,)](
                features, features, patch_valid, unit, unit, unit, gh, gw, rw, r, d, float(d), d,
                SIDE=side, P_BLOCK=p_block, D_BLOCK=d_block, TERMS=False, UNIT=True, enable_fp_fusion=False,
            )  # fmt: skip
    return unit
