"""The Triton kernels behind the set-up of :func:`arrcoc.stages.balance.pick_patches`'s greedy max-min on CUDA: from
the patches' cosines to the greedy loop's two inputs in one launch (two where tiers order the candidates), where torch
takes about 25 (the colour distances, the masks, the nearest neighbours, the tiers' bonus).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. The distances of
``q`` from ``p`` (up to ``balance.PICK_SETUP_CELL_LIMIT`` patches an image): ``1 - cosine``, plus ``colour_share``
times the Lab distance (each channel's squared difference, summed in channel order, its square root), times the
candidate's weight; ``-inf`` where the candidate cannot be picked (padding, and itself). One program per image and
block of rows ``p``, so that an image's rows spread over the GPU: the greedy loop after it is one program per image,
and the set-up's latency is the batch's. Where tiers order the candidates (``priority``, ``frame``), a first launch
(:func:`extent_kernel`) finds each block's largest distance, which sizes a tier's bonus; the second
(:func:`pick_setup_kernel`) writes each row's distances with the bonus and each patch's nearest other patch. The same
IEEE operations in the same order as the torch form (no fused multiply-adds, square roots rounded to nearest), and
minima and maxima in any order give the same bits, so the two forms agree bit for bit; the cosines come in from
torch's own product.
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
def _candidate_scores(
    gram_ptr, lab_ptr, valid_ptr, weight_ptr, image, p, q, patches, lab_image, lab_patch, colour_share,
    COLOUR: tl.constexpr, WEIGHTED: tl.constexpr,
):  # fmt: skip
    """One tile's candidates (``others``), distances, and scores: the distance times the candidate's weight, ``-inf``
    where it cannot be picked."""
    others, distance = _tile(
        gram_ptr, lab_ptr, valid_ptr, image, p, q, patches, lab_image, lab_patch, colour_share, COLOUR
    )
    score = distance
    if WEIGHTED:
        score = score * _weight(weight_ptr, image, q, patches)[None, :]
    return others, distance, tl.where(others, score, float("-inf"))


@triton.jit
def extent_kernel(
    gram_ptr,  # (B, N, N) float32: cosine of every two patches' unit features
    lab_ptr,  # (B, N, >= 3) float32, channels contiguous (COLOUR)
    valid_ptr,  # (B, N) uint8: image patches
    weight_ptr,  # (B, N) float32 each candidate's weight (WEIGHTED)
    extent_ptr,  # (B, row blocks) float32 out: the block's largest score, NaN if any is
    patches,  # N
    lab_image,
    lab_patch,
    colour_share,
    P_BLOCK: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    COLOUR: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """Where tiers order the candidates: each block of rows' largest score, which sizes a tier's bonus."""
    image, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p = block * P_BLOCK + tl.arange(0, P_BLOCK)
    largest = tl.full([P_BLOCK, Q_BLOCK], float("-inf"), tl.float32)
    unordered = tl.zeros([P_BLOCK, Q_BLOCK], dtype=tl.int32)
    for q0 in range(0, patches, Q_BLOCK):
        q = q0 + tl.arange(0, Q_BLOCK)
        _, _, score = _candidate_scores(
            gram_ptr, lab_ptr, valid_ptr, weight_ptr, image, p, q, patches, lab_image, lab_patch, colour_share,
            COLOUR, WEIGHTED,
        )  # fmt: skip
        largest = tl.maximum(largest, score)
        unordered = tl.maximum(unordered, (score != score).to(tl.int32))
    extent = tl.where(tl.max(tl.max(unordered, 1), 0) > 0, float("nan"), tl.max(tl.max(largest, 1), 0))
    tl.store(extent_ptr + image * tl.num_programs(1) + block, extent)


@triton.jit
def pick_setup_kernel(
    gram_ptr,  # (B, N, N) float32: cosine of every two patches' unit features
    lab_ptr,  # (B, N, >= 3) float32, channels contiguous (COLOUR)
    valid_ptr,  # (B, N) uint8: image patches
    weight_ptr,  # (B, N) float32 each candidate's weight (WEIGHTED)
    priority_ptr,  # (B, N) float32 whole tiers (PRIORITY)
    frame_ptr,  # (B, N) uint8 the artificial border's patches, a tier below (FRAME)
    extent_ptr,  # (B, row blocks) float32: extent_kernel's output (PRIORITY or FRAME)
    weighted_ptr,  # (B, N, N) float32 out: [b, p, q] candidate q's score once p is kept
    score_ptr,  # (B, N) float32 out: each candidate's score before the first pick
    patches,  # N
    lab_image,
    lab_patch,
    colour_share,
    P_BLOCK: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    B_BLOCK: tl.constexpr,  # the row blocks, to the next power of two
    COLOUR: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PRIORITY: tl.constexpr,
    FRAME: tl.constexpr,
):
    image, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    span = 0.0
    if PRIORITY or FRAME:  # the image's largest score (NaN if any is: the torch form's maximum), from every block
        blocks = tl.arange(0, B_BLOCK)
        extent = tl.load(extent_ptr + image * tl.num_programs(1) + blocks, mask=blocks < tl.num_programs(1),
                         other=float("-inf"))  # fmt: skip
        span = tl.maximum(tl.max(tl.where(extent != extent, float("-inf"), extent), 0), 0.0) + 1.0
        span = tl.where(tl.max((extent != extent).to(tl.int32), 0) > 0, float("nan"), span)
    p = block * P_BLOCK + tl.arange(0, P_BLOCK)
    nearest = tl.full([P_BLOCK], float("inf"), tl.float32)
    lost = tl.zeros([P_BLOCK], dtype=tl.int32)  # a NaN distance: the torch form's minimum is NaN
    for q0 in range(0, patches, Q_BLOCK):
        q = q0 + tl.arange(0, Q_BLOCK)
        others, distance, score = _candidate_scores(
            gram_ptr, lab_ptr, valid_ptr, weight_ptr, image, p, q, patches, lab_image, lab_patch, colour_share,
            COLOUR, WEIGHTED,
        )  # fmt: skip
        nearest = tl.minimum(nearest, tl.min(tl.where(others, distance, float("inf")), 1))
        lost = tl.maximum(lost, tl.max((others & (distance != distance)).to(tl.int32), 1))
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
        blocks: a program's rows and a tile's columns, powers of two (default: up to 256 columns, 4,096 cells); a
            test's small ones exercise the tiles and the blocks.
    """
    b, n = valid.shape
    gram = gram.contiguous()
    out = torch.empty_like(gram), torch.empty(b, n, dtype=torch.float32, device=gram.device)
    if not (b and n):
        return out
    if lab is not None and lab.stride(-1) != 1:
        lab = lab.contiguous()
    q_block = min(256, triton.next_power_of_2(n))
    p_block, q_block = blocks or (max(1, 4096 // q_block), q_block)
    row_blocks = triton.cdiv(n, p_block)
    tiers = priority is not None or frame is not None
    dummy = out[1]
    valid, lab = valid.contiguous().view(torch.uint8), lab if lab is not None else dummy
    weight = weight.contiguous() if weight is not None else dummy
    colour = {
        "lab_image": lab.stride(0) if lab is not dummy else 0,
        "lab_patch": lab.stride(1) if lab is not dummy else 0,
        "colour_share": float(colour_share),
    }
    options = {"P_BLOCK": p_block, "Q_BLOCK": q_block, "COLOUR": lab is not dummy, "WEIGHTED": weight is not dummy}
    extent = torch.empty(b, row_blocks, dtype=torch.float32, device=gram.device) if tiers else dummy
    with launch_device(gram):
        if tiers:
            extent_kernel[(b, row_blocks)](
                gram, lab, valid, weight, extent, n, **colour, **options, num_warps=4, enable_fp_fusion=False
            )
        pick_setup_kernel[(b, row_blocks)](
            gram, lab, valid, weight,
            priority.contiguous() if priority is not None else dummy,
            frame.contiguous().view(torch.uint8) if frame is not None else valid,
            extent, *out, n, **colour, **options, B_BLOCK=triton.next_power_of_2(row_blocks),
            PRIORITY=priority is not None, FRAME=frame is not None, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return out
