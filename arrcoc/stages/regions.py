"""Regions: square blocks of patches, the unit that allocation hands tokens to.

Pure functions over ``(B, gh, gw, C)`` patch grids. A grid whose sides are not multiples of the region side
is padded with invalid patches, so every region has ``side * side`` patch slots.

On CUDA, :func:`normalize_per_image` is one Triton kernel (``_normalize_triton``) outside ``torch.compile`` (which
fuses the torch form itself); ``ARRCOC_NORMALIZE_KERNEL=0`` in the environment (read once, at import) or
``regions.USE_KERNEL = False`` keeps the torch form there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import kernel_enabled, runs_kernel

__all__ = [
    "region_grid",
    "to_regions",
    "to_patches",
    "masked_mean",
    "normalize_per_image",
    "region_bounds",
    "capacity_of",
    "patch_boxes",
    "USE_KERNEL",
]

#: Whether CUDA float32 maps go to the Triton kernel of :func:`normalize_per_image` (else the torch form everywhere).
USE_KERNEL: bool = kernel_enabled("ARRCOC_NORMALIZE_KERNEL")


def region_grid(patch_grid: tuple[int, int], side: int) -> tuple[int, int]:
    """``(rh, rw)``: how many regions of ``side x side`` patches cover a ``(gh, gw)`` patch grid."""
    return (-(-patch_grid[0] // side), -(-patch_grid[1] // side))


def to_regions(grid: Tensor, side: int) -> Tensor:
    """Group a patch grid into regions.

    Args:
        grid: ``(B, gh, gw, C)``.
        side: region side in patches.

    Returns:
        ``(B, rh, rw, side * side, C)``: patches of each region in raster order, zero-filled past the grid.
    """
    b, gh, gw, c = grid.shape
    rh, rw = region_grid((gh, gw), side)
    grid = F.pad(grid, (0, 0, 0, rw * side - gw, 0, rh * side - gh))  # (B, rh*s, rw*s, C)
    grid = grid.view(b, rh, side, rw, side, c).permute(0, 1, 3, 2, 4, 5)  # (B, rh, rw, s, s, C)
    return grid.reshape(b, rh, rw, side * side, c)


def to_patches(region_map: Tensor, grid: tuple[int, int], side: int) -> Tensor:
    """The inverse of :func:`to_regions` for one value per region: ``(B, rh, rw)`` spread over each region's
    patches and cut to the patch grid, ``(B, gh, gw)``."""
    return region_map.repeat_interleave(side, 1).repeat_interleave(side, 2)[:, : grid[0], : grid[1]]


def masked_mean(values: Tensor, weights: Tensor, dim: int) -> Tensor:
    """Mean of ``values`` along ``dim`` weighted by ``weights`` (broadcast); 0 where all weights are 0."""
    total = (values * weights).sum(dim)
    return total / weights.sum(dim).clamp_min(1e-12)


def normalize_per_image(score: Tensor, valid: Tensor) -> Tensor:
    """Min-max normalise each image's map to [0, 1] over its valid entries; invalid entries become 0.

    Per image, never across the batch, so an image's result does not depend on its batch. A constant map
    becomes all zeros (it says nothing about where to look).

    Args:
        score: ``(B, ...)`` float, or ``(B, K, ...)``: a stack of K maps per image, each normalised on its own.
        valid: ``(B, ...)`` bool.
    """
    stacked = score.ndim == valid.ndim + 1
    flat = score.flatten(2) if stacked else score.flatten(1)  # (B, [K,] R)
    if _uses_kernel(flat) and valid.dtype == torch.bool and valid.shape == score.shape[:1] + score.shape[1 + stacked :]:
        # the same bits in one launch (no gradient: only where none is asked for; a broadcast mask: the torch form)
        from . import _normalize_triton  # Triton is imported on the first CUDA call only

        return _normalize_triton.launch(flat if stacked else flat[:, None], valid.flatten(1)).view_as(score)
    mask = valid.flatten(1)[:, None] if stacked else valid.flatten(1)
    low = torch.where(mask, flat, torch.inf).amin(-1, keepdim=True)
    high = torch.where(mask, flat, -torch.inf).amax(-1, keepdim=True)
    scaled = torch.where(mask, (flat - low) / (high - low).clamp_min(1e-12), 0.0)
    return scaled.view_as(score)


def _uses_kernel(flat: Tensor) -> bool:
    """Whether :func:`normalize_per_image` launches its Triton kernel for these maps."""
    return runs_kernel(flat, USE_KERNEL)


def region_bounds(patch_valid: Tensor, side: int, min_tokens: int, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    """Per-region token bounds for allocation.

    A region may hold at most as many tokens as it has patches with image content (capped by ``max_tokens``),
    so no token ever stands for a patch of padding; a region with image content gets at least ``min_tokens``,
    one that is all padding gets none.

    Args:
        patch_valid: ``(B, gh, gw)`` share of each patch that is image.

    Returns:
        ``(min, max)``, each ``(B, rh, rw)`` int64.
    """
    image = (to_regions(patch_valid[..., None], side)[..., 0] > 0).sum(-1)  # (B, rh, rw) patches with image
    high = image if max_tokens is None else image.clamp(max=max_tokens)
    low = torch.where(image > 0, min_tokens, 0).minimum(high)
    return low.long(), high.long()


def capacity_of(patch_grid: tuple[int, int], side: int, max_tokens: int | None) -> int:
    """Most tokens an image on a ``(gh, gw)`` patch grid can yield: the sum of the region maxima.

    For a letterboxed image anchored top-left, ``patch_grid`` is the patches its content touches: the most
    tokens it can yield without one standing for padding.
    """
    gh, gw = patch_grid
    if max_tokens is None:
        return gh * gw
    total = 0
    for r0 in range(0, gh, side):
        for c0 in range(0, gw, side):
            total += min(max_tokens, min(side, gh - r0) * min(side, gw - c0))
    return total


def patch_boxes(gh: int, gw: int, device: torch.device | str | None = None) -> Tensor:
    """``(gh * gw, 4)`` int64 ``(row, col, 1, 1)`` box of every patch, in raster order."""
    index = torch.arange(gh * gw, device=device)
    ones = torch.ones_like(index)
    return torch.stack((index // gw, index % gw, ones, ones), -1)
