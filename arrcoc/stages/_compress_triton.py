"""The Triton kernel behind :func:`arrcoc.stages.compression.compress` on CUDA: ranking and packing in one launch,
where torch takes about 60 (region views of the features, the distinctness key, two sorts, the slots, the boxes,
the scatters, the mask).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One program per
region: it reads its patches' features straight from the grid in blocks of channels, accumulating each patch's
distance from the region's mean (the mean of a channel needs only that channel), mixes in the priority, ranks its
patches by counting the ones ahead of each, and writes its kept patches to their slots. The first region's program
of each image also writes the image's mask and weights.

Everything but the distinctness key is computed as torch computes it (the mix in the same order, without fused
multiply-adds). The key's sums run in another order than torch's reductions, so where two patches' keys are within
rounding of each other the two forms may show them in another order or keep the other one. Without a question, or
with ``query_detail = 1``, the key drops out of the mix and the forms agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch"]


@triton.jit
def compress_kernel(
    features_ptr,  # (B, gh, gw, D) float32, contiguous
    valid_ptr,  # (B, gh, gw) float32 share of each patch that is image
    count_ptr,  # (B, R) int64 tokens per region
    priority_ptr,  # (B, gh, gw) float32 (HAS_PRIORITY)
    share_ptr,  # (B,) float32 (SHARE_PER_IMAGE)
    tokens_ptr,  # (B, T, D) float32 out, zeros
    positions_ptr,  # (B, T, 4) int64 out, zeros
    mask_ptr,  # (B, T) uint8 out
    weights_ptr,  # (B, T) float32 out
    gh,
    gw,
    rw,
    regions,
    d,
    capacity,
    share_value,  # the share when it is one number
    keep_value,  # 1 - share_value, as Python rounds it
    SIDE: tl.constexpr,
    P_BLOCK: tl.constexpr,  # next power of two of SIDE * SIDE
    D_BLOCK: tl.constexpr,
    R_BLOCK: tl.constexpr,  # next power of two of the region count, for the start slot
    T_BLOCK: tl.constexpr,
    HAS_PRIORITY: tl.constexpr,
    SHARE_PER_IMAGE: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    image, region = program // regions, program % regions
    slot = tl.arange(0, P_BLOCK)
    row = (region // rw) * SIDE + slot // SIDE
    col = (region % rw) * SIDE + slot % SIDE
    exists = (slot < SIDE * SIDE) & (row < gh) & (col < gw)  # a slot inside the grid
    cell = (image * gh + row) * gw + col  # (P,) the patch's index in the grid
    valid = exists & (tl.load(valid_ptr + cell, mask=exists, other=0.0) > 0)
    weight = valid.to(tl.float32)
    images = tl.maximum(tl.sum(weight, 0), 1.0)

    # distinctness: each patch's squared distance from the region's mean feature, channel block by block
    key = tl.zeros([P_BLOCK], dtype=tl.float32)
    channel = tl.arange(0, D_BLOCK)
    for start in range(0, d, D_BLOCK):
        ch = start + channel
        load = exists[:, None] & (ch < d)[None, :]
        f = tl.load(features_ptr + cell[:, None] * d + ch[None, :], mask=load, other=0.0)  # (P, D_BLOCK)
        mean = tl.sum(f * weight[:, None], 0) / images  # (D_BLOCK,)
        diff = tl.where((ch < d)[None, :], f - mean[None, :], 0.0)
        key += tl.sum(diff * diff, 1)
    if HAS_PRIORITY:
        if SHARE_PER_IMAGE:
            share = tl.load(share_ptr + image)
            keep = 1 - share
        else:
            share = share_value
            keep = keep_value
        most = tl.max(tl.where(valid, key, 0.0), 0)  # the region's most distinct image patch
        priority = tl.load(priority_ptr + cell, mask=exists, other=0.0)
        key = tl.math.div_rn(keep * key, tl.maximum(most, 1e-12)) + share * priority

    # rank: image patches, then padding, then slots off the grid; each by key (NaN first), then slot
    group = valid.to(tl.int32) + exists.to(tl.int32)
    g_me, g_other = group[:, None], group[None, :]
    k_me, k_other = key[:, None], key[None, :]
    nan_me, nan_other = k_me != k_me, k_other != k_other
    higher = (k_other > k_me) | (nan_other & ~nan_me)
    equal = (k_other == k_me) | (nan_other & nan_me)
    earlier = slot[None, :] < slot[:, None]
    ahead = (g_other > g_me) | ((g_other == g_me) & (higher | (equal & earlier)))
    ahead = ahead & (slot < SIDE * SIDE)[None, :]
    rank = tl.sum(ahead.to(tl.int32), 1)  # (P,)

    # the region's tokens go to the slots after those of the regions before it
    others = tl.arange(0, R_BLOCK)
    counts = tl.load(count_ptr + image * regions + others, mask=others < regions, other=0)
    start_slot = tl.sum(tl.where(others < region, counts, 0), 0)
    count = tl.load(count_ptr + image * regions + region)
    dest = start_slot + rank
    kept = (slot < SIDE * SIDE) & (rank < count) & (dest < capacity)
    out_row = image * capacity + dest
    for start in range(0, d, D_BLOCK):
        ch = start + channel
        inside = (ch < d)[None, :]
        f = tl.load(features_ptr + cell[:, None] * d + ch[None, :], mask=kept[:, None] & inside, other=0.0)
        tl.store(tokens_ptr + out_row[:, None] * d + ch[None, :], f, mask=kept[:, None] & inside)
    box = tl.arange(0, 4)
    value = tl.where(box[None, :] == 0, row[:, None], tl.where(box[None, :] == 1, col[:, None], 1)).to(tl.int64)
    tl.store(positions_ptr + out_row[:, None] * 4 + box[None, :], value, mask=kept[:, None])

    if region == 0:  # the image's mask and weights: its first `budget` slots
        total = tl.sum(counts, 0)
        t = tl.arange(0, T_BLOCK)
        for begin in range(0, capacity, T_BLOCK):
            at = begin + t
            on = at < total
            tl.store(mask_ptr + image * capacity + at, on.to(tl.uint8), mask=at < capacity)
            tl.store(weights_ptr + image * capacity + at, on.to(tl.float32), mask=at < capacity)


def launch(
    features: Tensor,
    patch_valid: Tensor,
    allocation: Tensor,
    capacity: int,
    side: int,
    priority: Tensor | None,
    share: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`arrcoc.stages.compression.compress` for float32 ``features`` ``(B, gh, gw, D)``; same arguments, same
    outputs (``priority`` only where ``compress`` uses it: given, with a share that is a tensor or above 0)."""
    b, gh, gw, d = features.shape
    rh, rw = allocation.shape[1:]
    regions = rh * rw
    features = features.contiguous()
    valid = patch_valid.float().contiguous()
    count = allocation.reshape(b, regions).long().contiguous()
    per_image = isinstance(share, Tensor)
    share_tensor = share.float().expand(b).contiguous() if per_image else valid  # unused unless per image
    value = 0.0 if per_image else float(share)
    prio = priority.float().contiguous() if priority is not None else valid  # unused without a priority
    tokens = features.new_zeros(b, capacity, d)
    positions = torch.zeros(b, capacity, 4, dtype=torch.long, device=features.device)
    mask = torch.empty(b, capacity, dtype=torch.uint8, device=features.device)
    weights = torch.empty(b, capacity, dtype=features.dtype, device=features.device)
    if b and regions and capacity:
        p_block = triton.next_power_of_2(side * side)
        d_block = max(16, min(triton.next_power_of_2(d), 4096 // p_block))
        with launch_device(features):
            compress_kernel[(b * regions,)](
                features, valid, count, prio, share_tensor, tokens, positions, mask, weights,
                gh, gw, rw, regions, d, capacity, value, 1 - value,
                SIDE=side, P_BLOCK=p_block, D_BLOCK=d_block, R_BLOCK=triton.next_power_of_2(regions),
                T_BLOCK=min(1024, triton.next_power_of_2(capacity)), HAS_PRIORITY=priority is not None,
                SHARE_PER_IMAGE=per_image, num_warps=4, enable_fp_fusion=False,
            )  # fmt: skip
    elif b:
        mask.zero_(), weights.zero_()
    return tokens, positions, mask.view(torch.bool), weights
