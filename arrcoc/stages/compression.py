"""Compression: each region yields its allocated number of tokens, packed into a fixed-shape batch.

A region given ``k`` tokens shows ``k`` of its patches at full detail, each at its own place; its other patches
are left out. ``k`` equal to its patch count is every patch, ``k = 0`` drops the region. Detail varies by region
through ``k``; every token is a real patch.

Which ``k``: the patches ranked highest by ``(1 - query_detail) * distinctness + query_detail * coupling``, both
scaled to [0, 1]. *Distinctness* is a patch's distance from the region's mean feature (the patches a summary of
the region would describe worst; scaled by the region's most distinct image patch); *coupling* is its best
cosine with the query (:func:`arrcoc.stages.scorers.query_coupling`, min-max scaled per image). Without a query, or with
``query_detail = 0``, distinctness alone ranks.

Why a mix: distinctness alone shows a framed label's edge as readily as its glyphs, coupling alone its plain
inside; the mix answered more on validation seeds. Why real patches and no pooled tokens: a language model
reads them better. The measurements behind both are in docs/decisions.md.

Patches from the letterbox padding rank after every image patch; allocation never gives a region more tokens
than it has image patches, so none is kept.

On CUDA, outside ``torch.compile``, :func:`compress` is one Triton kernel (``_compress_triton``; ``USE_KERNEL``).
"""

from __future__ import annotations

from typing import Final

import torch
from torch import Tensor, nn

from .kernels import kernel_enabled, runs_kernel
from .regions import normalize_per_image, to_regions
from .scorers import query_coupling

__all__ = ["Compressor", "compress", "query_priority", "USE_KERNEL"]

#: Whether CUDA float32 features go to the Triton kernel of :func:`compress` (``ARRCOC_COMPRESS_KERNEL=0``: the
#: torch form everywhere).
USE_KERNEL: bool = kernel_enabled("ARRCOC_COMPRESS_KERNEL")


def _rank_patches(
    features: Tensor, valid: Tensor, exists: Tensor, priority: Tensor | None = None, query_detail: float = 0.0
) -> Tensor:
    """Rank of each patch inside its region: image patches first, highest key first, then index.

    Args:
        features: ``(B, R, P, D)``; valid: ``(B, R, P)`` bool image patches; exists: ``(P-slot inside the grid)``.
        priority: ``(B, R, P)`` query coupling (or, without a question, novelty) in [0, 1], or ``None``: the key
            is distinctness alone.
        query_detail: the priority's share of the key: one number, or ``(B,)`` one per image.

    Returns:
        ``(B, R, P)`` int64 ranks, a permutation of ``0..P-1`` per region.
    """
    weight = valid.float()[..., None]
    mean = (features * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp_min(1)
    key = (features - mean).square().sum(-1)  # (B, R, P) distinctness
    if priority is not None and (isinstance(query_detail, Tensor) or query_detail > 0):
        share = query_detail.view(-1, 1, 1) if isinstance(query_detail, Tensor) else query_detail
        most = torch.where(valid, key, 0.0).amax(-1, keepdim=True)  # the region's most distinct image patch
        key = (1 - share) * key / most.clamp_min(1e-12) + share * priority
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    group = (valid.long() + exists.long()).gather(-1, order)  # 2 image, 1 padding, 0 outside the grid
    order = order.gather(-1, torch.sort(group, dim=-1, descending=True, stable=True).indices)
    return torch.argsort(order, dim=-1)  # inverse permutation: rank of each patch


def query_priority(
    features: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor, coupling: Tensor | None = None
) -> Tensor:
    """``(B, gh, gw)`` each patch's coupling to the query, min-max scaled per image over its image patches.

    All zeros for an image without a query (a constant map says nothing about which patch to show). ``coupling``:
    :func:`~arrcoc.stages.scorers.query_coupling` of the same inputs when already computed.
    """
    if coupling is None:
        coupling = query_coupling(features, query, query_mask)
    return normalize_per_image(coupling, patch_valid > 0)


def _uses_kernel(features: Tensor) -> bool:
    """Whether :func:`compress` launches its Triton kernel (float32 features on CUDA, no gradient asked for)."""
    return runs_kernel(features, USE_KERNEL)


def compress(
    features: Tensor,
    patch_valid: Tensor,
    allocation: Tensor,
    capacity: int,
    region_size: int = 4,
    priority: Tensor | None = None,
    query_detail: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack each region's allocated tokens into ``(B, T, D)``.

    Args:
        features: ``(B, gh, gw, D)`` patch features.
        patch_valid: ``(B, gh, gw)`` share of each patch that is image.
        allocation: ``(B, rh, rw)`` int64 tokens per region, each at most the region's patch count; per image
            it sums to at most ``capacity``.
        capacity: ``T``, the fixed token dimension.
        region_size: region side in patches.
        priority: ``(B, gh, gw)`` query coupling in [0, 1] (:func:`query_priority`; without a question, the
            patches' novelty), or ``None``.
        query_detail: the priority's share of the key that picks a region's patches (module docstring): one
            number, or ``(B,)`` one per image.

    Returns:
        tokens ``(B, T, D)`` (zeros past the budget); positions ``(B, T, 4)`` int64 (row, col, height, width
        in patches of the area a token stands for: its patch, so height and width are 1); mask ``(B, T)``
        bool, True on the first ``allocation.sum()`` tokens; weights ``(B, T)`` float, the number of patches
        each token stands for (1 on every token, 0 past the budget). Tokens come region by region in raster
        order of regions; inside a region, highest key first.
    """
    uses_priority = priority is not None and (isinstance(query_detail, Tensor) or query_detail > 0)
    if _uses_kernel(features):  # one launch; the same result but where two patches' keys are within rounding
        from . import _compress_triton  # Triton is imported on the first CUDA call only

        prio = priority if uses_priority else None
        return _compress_triton.launch(features, patch_valid, allocation, capacity, region_size, prio, query_detail)
    b, gh, gw, d = features.shape
    side = region_size
    rh, rw = allocation.shape[1:]
    p = side * side
    regions = to_regions(features, side).flatten(1, 2)  # (B, R, P, D)
    valid = to_regions((patch_valid > 0)[..., None], side)[..., 0].flatten(1, 2)  # (B, R, P)
    exists = to_regions(torch.ones_like(patch_valid, dtype=torch.bool)[..., None], side)[..., 0].flatten(1, 2)
    count = allocation.flatten(1)  # (B, R)
    prio = to_regions(priority[..., None], side)[..., 0].flatten(1, 2) if uses_priority else None  # (B, R, P)
    rank = _rank_patches(regions, valid, exists, prio, query_detail)  # (B, R, P)

    # A region's first `count` patches by rank go to the slots after the tokens of the regions before it.
    start = torch.cumsum(count, -1) - count  # (B, R)
    kept = rank < count[..., None]  # (B, R, P)
    dest = torch.where(kept, start[..., None] + rank, capacity).flatten(1)  # slot `capacity` is cut off at the end

    slot = torch.arange(p, device=features.device)
    region = torch.arange(rh * rw, device=features.device)
    rows = (region // rw * side)[:, None] + slot // side  # (R, P)
    cols = (region % rw * side)[:, None] + slot % side
    boxes = torch.stack((rows, cols, torch.ones_like(rows), torch.ones_like(rows)), -1).expand(b, -1, -1, -1)

    out_tokens = features.new_zeros(b, capacity + 1, d)
    out_pos = torch.zeros(b, capacity + 1, 4, dtype=torch.long, device=features.device)
    out_tokens.scatter_(1, dest[..., None].expand(-1, -1, d), regions.flatten(1, 2))
    out_pos.scatter_(1, dest[..., None].expand(-1, -1, 4), boxes.flatten(1, 2))
    mask = torch.arange(capacity, device=features.device) < count.sum(-1, keepdim=True)  # (B, T)
    keep = mask[..., None]
    return out_tokens[:, :capacity] * keep, out_pos[:, :capacity] * keep, mask, mask.to(features.dtype)


class Compressor(nn.Module):
    """Stage: patch features + allocation (+ the query) -> packed tokens, positions, mask and weights.

    Args:
        region_size: region side in patches.
        query_detail: in [0, 1], how much the query's coupling, against distinctness, picks the patches a region
            shows (module docstring); 0 ignores the query here.
        novelty_detail: in [0, 1], the same for images without a question, with each patch's novelty
            (:func:`arrcoc.stages.balance.novelty`) in the query's place; 0: distinctness alone.
    """

    region_size: Final[int]
    query_detail: Final[float]
    novelty_detail: Final[float]

    def __init__(self, region_size: int = 4, query_detail: float = 0.0, novelty_detail: float = 0.0) -> None:
        super().__init__()
        self.region_size = region_size
        self.query_detail = float(query_detail)
        self.novelty_detail = float(novelty_detail)

    def forward(
        self,
        features: Tensor,
        patch_valid: Tensor,
        allocation: Tensor,
        capacity: int,
        query: Tensor | None = None,
        query_mask: Tensor | None = None,
        novelty: Tensor | None = None,
        pick: Tensor | None = None,
        coupling: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """See :func:`compress`; ``query`` ``(B, L, D)`` and ``query_mask`` ``(B, L)`` as the scorers take them,
        ``novelty`` ``(B, gh, gw)`` as :func:`arrcoc.stages.balance.novelty` gives it; ``pick`` ``(B, gh, gw)``, 1 on
        the patches :func:`arrcoc.stages.balance.pick_patches` kept: an image without a question shows those first;
        ``coupling`` ``(B, gh, gw)``, :func:`~arrcoc.stages.scorers.query_coupling` of the same inputs when the
        participatory scorer has computed it already."""
        priority, share = None, self.query_detail
        if self.query_detail > 0 and query is not None and query_mask is not None:
            priority = query_priority(features, patch_valid, query, query_mask, coupling)
        if self.novelty_detail > 0 and novelty is not None:  # per image: the question's coupling, else novelty
            has_query = query_mask.any(-1) if query_mask is not None else novelty.new_zeros(len(novelty)).bool()
            coupling = priority if priority is not None else torch.zeros_like(novelty)
            priority = torch.where(has_query[:, None, None], coupling, novelty)  # (B, gh, gw)
            share = torch.where(has_query, self.query_detail, self.novelty_detail)  # (B,)
        if pick is not None:  # per image: the question's coupling, else the pick alone
            has_query = query_mask.any(-1) if query_mask is not None else pick.new_zeros(len(pick)).bool()
            coupling = priority if priority is not None else torch.zeros_like(pick)
            priority = torch.where(has_query[:, None, None], coupling, pick)  # (B, gh, gw)
            share = torch.where(has_query, share, 1.0)  # (B,)
        return compress(features, patch_valid, allocation, capacity, self.region_size, priority, share)
