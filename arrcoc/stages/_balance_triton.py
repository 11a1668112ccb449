"""The Triton kernel behind :meth:`arrcoc.stages.balance.Balance.forward` on CUDA: the opponent processing of one
image in one program, where torch takes about 80 launches over ``(B,)``, ``(B, 3)`` and ``(B, R)`` tensors.

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. The program holds
the image's three maps in registers, one lane per region: which regions hold image content and the cover's sum over
each region's patches (read from the patch maps), the weights, the combined map, the maps' correlation,
exploit and temperature, then the redundancy (one row of the similarity per region), the softmax, the cover and the
evenness. The same formulas in the same order as the torch form; its sums and ``exp`` and ``log`` round otherwise,
so the two agree to float32 rounding (about 1e-7 of each value), not bit for bit. Where the cover is all of the
relevance (an image without a question under the default ``cover = 1``) the relevance is the picked patches' share
per region in both forms, bit for bit: counts over a count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._normalize_triton import normalized
from .kernels import launch_device

__all__ = ["launch"]


@triton.jit
def balance_kernel(
    scores_ptr,  # (B, 3, R) float32
    query_mask_ptr,  # (B, L) uint8
    patch_valid_ptr,  # (B, N) float32: the share of each patch that is image
    budget_ptr,  # (B,) int64 (HAS_BUDGET)
    similarity_ptr,  # (B, R, R) float32
    novel_ptr,  # (B, N) float32 each patch's novelty, or 1 where picked (COVERS): the cover sums it per region
    knobs_ptr,  # (9,) float32: base weights x3, exploit, scarcity, diversify, particularize, cover, query cover
    relevance_ptr,  # (B, R) float32 out
    weights_ptr,  # (B, 3) float32 out
    report_ptr,  # (B, 5) float32 out: agreement, exploit, temperature, coverage, evenness
    redundancy_ptr,  # (B, R) float32 out
    regions,
    tokens,  # L
    patches,  # N
    gh,
    gw,
    rw,
    log_t_high,
    log_t_span,  # log t_low - log t_high, as Python rounds it
    R_BLOCK: tl.constexpr,
    L_BLOCK: tl.constexpr,
    N_BLOCK: tl.constexpr,
    SIDE: tl.constexpr,
    HAS_BUDGET: tl.constexpr,
    COVERS: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, R_BLOCK)
    inside = lane < regions
    # each region's patches: whether any is image (the regions that count), and the cover's sum over them
    seen = tl.zeros([R_BLOCK], dtype=tl.int32)
    novel = tl.zeros([R_BLOCK], dtype=tl.float32)
    for slot in range(0, SIDE * SIDE):
        row = (lane // rw) * SIDE + slot // SIDE
        col = (lane % rw) * SIDE + slot % SIDE
        at = image * patches + row * gw + col
        on = inside & (row < gh) & (col < gw)
        seen = tl.maximum(seen, (tl.load(patch_valid_ptr + at, mask=on, other=0.0) > 0).to(tl.int32))
        if COVERS:
            novel += tl.load(novel_ptr + at, mask=on, other=0.0)
    keep = (seen > 0) & inside
    m0 = tl.load(scores_ptr + (image * 3 + 0) * regions + lane, mask=inside, other=0.0)
    m1 = tl.load(scores_ptr + (image * 3 + 1) * regions + lane, mask=inside, other=0.0)
    m2 = tl.load(scores_ptr + (image * 3 + 2) * regions + lane, mask=inside, other=0.0)
    t = tl.arange(0, L_BLOCK)
    asked = tl.max(tl.load(query_mask_ptr + image * tokens + t, mask=t < tokens, other=0).to(tl.int32), 0) > 0
    has_query = asked.to(tl.float32)

    # the weights: no question, no participatory map
    w0 = tl.load(knobs_ptr + 0)
    w1 = tl.load(knobs_ptr + 1)
    w2 = tl.load(knobs_ptr + 2) * has_query
    total = tl.maximum(w0 + w1 + w2, 1e-12)
    w0, w1, w2 = tl.math.div_rn(w0, total), tl.math.div_rn(w1, total), tl.math.div_rn(w2, total)
    combined = normalized(w0 * m0 + w1 * m1 + w2 * m2, keep)

    # agreement: the mean correlation of the active maps over the image's regions
    weight = keep.to(tl.float32)
    count = tl.maximum(tl.sum(weight, 0), 1e-12)
    c0 = (m0 - tl.math.div_rn(tl.sum(m0 * weight, 0), count)) * weight
    c1 = (m1 - tl.math.div_rn(tl.sum(m1 * weight, 0), count)) * weight
    c2 = (m2 - tl.math.div_rn(tl.sum(m2 * weight, 0), count)) * weight
    s0 = tl.sqrt(tl.maximum(tl.sum(c0 * c0, 0), 1e-12))
    s1 = tl.sqrt(tl.maximum(tl.sum(c1 * c1, 0), 1e-12))
    s2 = tl.sqrt(tl.maximum(tl.sum(c2 * c2, 0), 1e-12))
    a0, a1, a2 = (w0 > 0).to(tl.float32), (w1 > 0).to(tl.float32), (w2 > 0).to(tl.float32)
    p01, p02, p12 = a0 * a1, a0 * a2, a1 * a2
    pairs = 2 * (p01 + p02 + p12)
    corr = (
        tl.sum(c0 * c1, 0) / (s0 * s1) * p01
        + tl.sum(c0 * c2, 0) / (s0 * s2) * p02
        + tl.sum(c1 * c2, 0) / (s1 * s2) * p12
    )
    agreement = tl.where(pairs > 0, (2 * corr / tl.maximum(pairs, 1e-12) + 1) / 2, 1.0)
    exploit = tl.load(knobs_ptr + 3) + 0.5 * (agreement - 0.5)
    if HAS_BUDGET:
        n = tl.arange(0, N_BLOCK)
        seen = tl.zeros([N_BLOCK], dtype=tl.float32)
        for start in range(0, patches, N_BLOCK):
            at = start + n
            share = tl.load(patch_valid_ptr + image * patches + at, mask=at < patches, other=0.0)
            seen += (share > 0).to(tl.float32)
        image_patches = tl.maximum(tl.sum(seen, 0), 1.0)
        budget = tl.maximum(tl.load(budget_ptr + image), 1).to(tl.float32)
        exploit = exploit + tl.load(knobs_ptr + 4) * tl.log2(tl.math.div_rn(image_patches, 8 * budget))
    exploit = tl.minimum(tl.maximum(exploit, 0.0), 1.0)
    temperature = tl.exp(log_t_high + log_t_span * exploit)

    # redundancy: each region's best similarity with a region ranked above it (ties: the lower index ranks above)
    redundancy = tl.zeros([R_BLOCK], dtype=tl.float32)
    for r in range(0, regions):
        mine = tl.sum(tl.where(lane == r, combined, 0.0), 0)
        row = tl.load(similarity_ptr + (image * regions + r) * regions + lane, mask=inside, other=0.0)
        above = keep & ((combined > mine) | ((combined == mine) & (lane < r)))
        best = tl.max(tl.where(above, row, 0.0), 0)
        redundancy = tl.where(lane == r, best, redundancy)
    redundancy = tl.minimum(tl.maximum(redundancy, 0.0), 1.0)
    focused = combined * (1 - tl.load(knobs_ptr + 5) * redundancy)

    logits = tl.where(keep, tl.math.div_rn(focused, temperature), float("-inf"))
    top = tl.max(logits, 0)
    raised = tl.where(keep, tl.exp(logits - top), 0.0)
    peaked = tl.math.div_rn(raised, tl.sum(raised, 0))
    uniform = tl.math.div_rn(weight, tl.maximum(tl.sum(weight, 0), 1.0))
    particularize = tl.load(knobs_ptr + 6)
    relevance = (1 - particularize) * uniform + particularize * peaked
    coverage = tl.where(asked, tl.load(knobs_ptr + 8), tl.load(knobs_ptr + 7))
    if COVERS:
        novel = tl.math.div_rn(novel, tl.maximum(tl.sum(novel, 0), 1e-12))
        relevance = (1 - coverage) * relevance + coverage * novel
    relevance = tl.where(keep, relevance, 0.0)
    entropy = -tl.sum(relevance * tl.log(tl.maximum(relevance, 1e-30)), 0)
    evenness = tl.math.div_rn(entropy, tl.log(tl.maximum(tl.sum(weight, 0), 2.0)))

    tl.store(relevance_ptr + image * regions + lane, relevance, mask=inside)
    tl.store(redundancy_ptr + image * regions + lane, redundancy, mask=inside)
    tl.store(weights_ptr + image * 3 + 0, w0)
    tl.store(weights_ptr + image * 3 + 1, w1)
    tl.store(weights_ptr + image * 3 + 2, w2)
    report = report_ptr + image * 5
    tl.store(report + 0, agreement)
    tl.store(report + 1, exploit)
    tl.store(report + 2, temperature)
    tl.store(report + 3, coverage)
    tl.store(report + 4, evenness)


def launch(
    scores: Tensor,
    query_mask: Tensor,
    patch_valid: Tensor,
    side: int,
    budget: Tensor | None,
    similarity: Tensor,
    novel: Tensor | None,
    knobs: Tensor,
    log_t: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run :func:`balance_kernel`.

    Args:
        scores: ``(B, 3, R)`` float32; query_mask: ``(B, L)`` bool; patch_valid: ``(B, gh, gw)``; side: the region
        side in patches; budget: ``(B,)`` int64 or ``None``; similarity: ``(B, R, R)``; novel: ``(B, gh, gw)`` the
        cover's patch map, or ``None`` (no cover); knobs: ``(9,)`` float32 (:func:`balance_kernel`); log_t:
        ``(log t_low, log t_high)``.

    Returns:
        relevance ``(B, R)``, weights ``(B, 3)``, the report's per-image values ``(B, 5)`` (agreement,
        exploit, temperature, coverage, evenness) and redundancy ``(B, R)``.
    """
    b, _, r = scores.shape
    gh, gw = patch_valid.shape[1:]
    device = scores.device
    scores = scores.float().contiguous()
    query_mask = query_mask.bool().contiguous().view(torch.uint8)
    budget = budget.long().contiguous() if budget is not None else None
    patch_valid = patch_valid.float().reshape(b, -1).contiguous()
    similarity = similarity.float().contiguous()
    relevance = torch.empty(b, r, dtype=torch.float32, device=device)
    weights = torch.empty(b, 3, dtype=torch.float32, device=device)
    report = torch.empty(b, 5, dtype=torch.float32, device=device)
    redundancy = torch.empty(b, r, dtype=torch.float32, device=device)
    if b and r:
        tokens, patches = query_mask.shape[1], patch_valid.shape[1]
        with launch_device(scores):
            balance_kernel[(b,)](
                scores, query_mask, patch_valid, budget if budget is not None else relevance,
                similarity, novel.float().reshape(b, -1).contiguous() if novel is not None else relevance, knobs,
                relevance, weights, report, redundancy, r, tokens, patches, gh, gw, -(-gw // side), log_t[1],
                log_t[0] - log_t[1], R_BLOCK=triton.next_power_of_2(r), L_BLOCK=triton.next_power_of_2(max(tokens, 1)),
                N_BLOCK=min(1024, triton.next_power_of_2(max(patches, 1))), SIDE=side, HAS_BUDGET=budget is not None,
                COVERS=novel is not None, num_warps=4 if r >= 512 else 1, enable_fp_fusion=False,
            )  # fmt: skip
    return relevance, weights, report, redundancy
