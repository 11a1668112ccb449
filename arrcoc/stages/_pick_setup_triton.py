"""The Triton kernel behind the set-up of :func:`arrcoc.stages.balance.pick_patches`'s greedy max-min on CUDA: from the
patches' cosines to the greedy loop's two inputs in one launch, where torch takes about 25 (the colour distances,
the masks, the nearest neighbours, the tiers' bonus).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One program per
image (up to ``balance.PICK_SETUP_CELL_LIMIT`` patches) walks its ``(N, N)`` distances in tiles: ``1 - cosine``,
plus ``colour_share`` times the Lab distance (each channel's squared difference, summed in channel order, its square
root), times the candidate's weight; ``-inf``
where the candidate cannot be picked (padding, and itself). A first pass finds each patch's nearest other patch and,
where tiers order the candidates (``priority``, ``frame``), the image's largest distance, which sizes a tier's bonus;
a second pass writes the distances with the bonus. The same IEEE operations in the same order as the torch form
(no fused multiply-adds, square roots rounded to nearest), and minima and maxima in any order give the same bits, so
the two forms agree bit for bit; the cosines come in from torch's own product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch"]


@triton.jit
def _tile(
    gram_ptr, lab_ptr, valid_ptr, image, p, q, patches, lab_image, lab_patch, colour_share, COLOUR: tl.constexpr
):  # fmt: skip
    """One tile ``[p, q]``: where ``q`` is a candidate once ``p`` is kept (an image patch other than ``p``), and
    the distance of ``q`` from ``p``: ``1 - cosine`` plus ``colour_share`` times their Lab distance."""
    inside = (p < patches)[:, None] & (q < patches)[None, :]
    valid_q = tl.load(valid_ptr + image * patches + q, mask=q < patches, other=0) != 0
    others = inside & valid_q[None, :] & (p[:, None] != q[None, :])
    cosine = tl.load(gram_ptr + (image * patches + p[:, None]) * patches + q[None, :], mask=inside, other=0.0)
    distance = 1.0 - cosine
    if COLOUR:
        lab_p = lab_ptr + image * lab_image + p * lab_patch
        lab_q = lab_ptr + image * lab_image + q * lab_patch
        diff = (
            tl.load(lab_p, mask=p < patches, other=0.0)[:, None] - tl.load(lab_q, mask=q < patches, other=0.0)[None, :]
        )
        total = diff * diff
        for channel in tl.static_range(1, 3):
            a = tl.load(lab_p + channel, mask=p < patches, other=0.0)
            b = tl.load(lab_q + channel, mask=q < patches, other=0.0)
            diff = a[:, None] - b[None, :]
            total = total + diff * diff
        distance = distance + colour_share * tl.sqrt_rn(total)
    return others, distance


@triton.jit
def pick_setup_kernel(
    gram_ptr,  # (B, N, N) float32: cosine of every two patches' unit features
    lab_ptr,  # (B, N, >= 3) float32, channels contiguous (COLOUR)
    valid_ptr,  # (B, N) uint8: image patches
    weight_ptr,  # (B, N) float32 each candidate's weight (WEIGHTED)
    priority_ptr,  # (B, N) float32 whole tiers (PRIORITY)
    frame_ptr,  # (B, N) uint8 the artificial border's patches, a tier below (FRAME)
    weighted_ptr,  # (B, N, N) float32 out: [b, p, q] candidate q's score once p is kept
    score_ptr,  # (B, N) float32 out: each candidate's score before the first pick
    patches,  # N
    lab_image,
    lab_patch,
    colour_share,
    P_BLOCK: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    COLOUR: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PRIORITY: tl.constexpr,
    FRAME: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    rows, cols = tl.arange(0, P_BLOCK), tl.arange(0, Q_BLOCK)
    span = 0.0
    if PRIORITY or FRAME:  # a first pass for the image's largest score (NaN if any is: the torch form's maximum)
        largest = tl.full([P_BLOCK, Q_BLOCK], float("-inf"), tl.float32)
        unordered = tl.zeros([P_BLOCK, Q_BLOCK], dtype=tl.int32)
        for p0 in range(0, patches, P_BLOCK):
            p = p0 + rows
            for q0 in range(0, patches, Q_BLOCK):
                q = q0 + cols
                others, distance = _tile(
                    gram_ptr, lab_ptr, valid_ptr, image, p, q, patches, lab_image, lab_patch, colour_share, COLOUR
                )
                if WEIGHTED:
                    distance = distance * _weight(weight_ptr, image, q, patches)[None, :]
                score = tl.where(others, distance, float("-inf"))
                largest = tl.maximum(largest, score)
                unordered = tl.maximum(unordered, (score != score).to(tl.int32))
        span = tl.maximum(tl.max(tl.max(largest, 1), 0), 0.0) + 1.0
        span = tl.where(tl.max(tl.max(unordered, 1), 0) > 0, float("nan"), span)
    for p0 in range(0, patches, P_BLOCK):
        p = p0 + rows
        nearest = tl.full([P_BLOCK], float("inf"), tl.float32)
        lost = tl.zeros([P_BLOCK], dtype=tl.int32)  # a NaN distance: the torch form's minimum is NaN
        for q0 in range(0, patches, Q_BLOCK):
            q = q0 + cols
            others, distance = _tile(
                gram_ptr, lab_ptr, valid_ptr, image, p, q, patches, lab_image, lab_patch, colour_share, COLOUR
            )
            nearest = tl.minimum(nearest, tl.min(tl.where(others, distance, float("inf")), 1))
            lost = tl.maximum(lost, tl.max((others & (distance != distance)).to(tl.int32), 1))
            if WEIGHTED:
                distance = distance * _weight(weight_ptr, image, q, patches)[None, :]
            score = tl.where(others, distance, float("-inf"))
            if PRIORITY or FRAME:
                score = (
                    score
                    + _bonus(priority_ptr, frame_ptr, image * patches + q, q < patches, span, PRIORITY, FRAME)[None, :]
                )
            inside = (p < patches)[:, None] & (q < patches)[None, :]
            tl.store(weighted_ptr + (image * patches + p[:, None]) * patches + q[None, :], score, mask=inside)
        # no other patch (an image of one), or a NaN or infinite distance: 0, as the torch form's isfinite test
        nearest = tl.where((lost > 0) | (nearest == float("inf")) | (nearest == float("-inf")), 0.0, nearest)
        valid_p = tl.load(valid_ptr + image * patches + p, mask=p < patches, other=0) != 0
        if WEIGHTED:
            nearest = nearest * _weight(weight_ptr, image, p, patches)
        first = tl.where(valid_p, nearest, float("-inf"))
        if PRIORITY or FRAME:
            first = first + _bonus(priority_ptr, frame_ptr, image * patches + p, p < patches, span, PRIORITY, FRAME)
        tl.store(score_ptr + image * patches + p, first, mask=p < patches)


@triton.jit
def _weight(weight_ptr, image, q, patches):
    """Each candidate ``q``'s weight."""
    return tl.load(weight_ptr + image * patches + q, mask=q < patches, other=1.0)


@triton.jit
def _bonus(priority_ptr, frame_ptr, index, inside, span, PRIORITY: tl.constexpr, FRAME: tl.constexpr):
    """A candidate's tier times the span: its priority (0 without), one lower on the border."""
    tier = tl.zeros(index.shape, dtype=tl.float32)
    if PRIORITY:
        tier = tl.load(priority_ptr + index, mask=inside, other=0.0)
    if FRAME:
        tier = tier - (tl.load(frame_ptr + index, mask=inside, other=0) != 0).to(tl.float32)
    return tier * span


def launch(
    gram: Tensor,
    valid: Tensor,
    lab: Tensor | None,
    colour_share: float,
    weight: Tensor | None,
    priority: Tensor | None,
    frame: Tensor | None,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The greedy max-min's ``(weighted (B, N, N), score (B, N))`` (:func:`arrcoc.stages.greedy_pick.greedy_maxmin`).

    Args:
        gram: ``(B, N, N)`` float32, the cosine of every two patches' unit features; valid: ``(B, N)`` bool.
        lab: ``(B, N, >= 3)`` float32 Lab colour, or ``None`` (no colour distance); colour_share: its weight.
        weight: ``(B, N)`` float32 each candidate's weight, or ``None`` (1).
        priority: ``(B, N)`` float32 whole tiers, or ``None``; frame: ``(B, N)`` bool, a tier below, or ``None``.
        blocks: the tile's rows and columns, powers of two (default: up to 256 columns, 4,096 cells); a test's small
            ones exercise the tiled passes.
    """
    b, n = valid.shape
    gram = gram.contiguous()
    out = torch.empty_like(gram), torch.empty(b, n, dtype=torch.float32, device=gram.device)
    if lab is not None and lab.stride(-1) != 1:
        lab = lab.contiguous()
    dummy = out[1]
    q_block = min(256, triton.next_power_of_2(max(n, 1)))
    p_block, q_block = blocks or (max(1, 4096 // q_block), q_block)
    if b and n:
        with launch_device(gram):
            pick_setup_kernel[(b,)](
                gram, lab if lab is not None else dummy, valid.contiguous().view(torch.uint8),
                weight.contiguous() if weight is not None else dummy,
                priority.contiguous() if priority is not None else dummy,
                frame.contiguous().view(torch.uint8) if frame is not None else valid.view(torch.uint8),
                *out, n, lab.stride(0) if lab is not None else 0, lab.stride(1) if lab is not None else 0,
                float(colour_share), P_BLOCK=p_block, Q_BLOCK=q_block, COLOUR=lab is not None,
                WEIGHTED=weight is not None, PRIORITY=priority is not None, FRAME=frame is not None,
                num_warps=4, enable_fp_fusion=False,
            )  # fmt: skip
    return out
