"""The three relevance scorers and their registry.

Each scorer is a stage: patch features, texture, patch validity and a query in; one ``(B, rh, rw)`` map out,
normalised per image to [0, 1] (0 on regions with no image content). All three share one signature, so the
pipeline, the tests and the benchmarks loop over the registry.

- *propositional*: how much information a region holds (edge density, local contrast, colour variety,
  variance of the encoder's features inside it).
- *perspectival*: how much it stands out from its surround (colour centre-surround contrast, distinctness of
  its features from the image's mean feature).
- *participatory*: how strongly it couples to the query (cosine of patch features with the query tokens;
  zero for images with no query).

The first two need no learned weights: they read texture and feature statistics.

On CUDA, outside ``torch.compile``, each scorer runs as Triton kernels (``_region_stats_triton``,
``_perspectival_triton``, ``_participatory_triton``; ``arrcoc.stages.kernels``): a few launches each where torch
takes 20-45. ``ARRCOC_SCORER_KERNEL=0`` in the environment, or ``scorers.USE_KERNEL = False``, keeps the torch forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidInputError
from .kernels import kernel_enabled, runs_kernel
from .regions import masked_mean, normalize_per_image, region_grid, to_regions

__all__ = [
    "SCORERS",
    "register_scorer",
    "create_scorer",
    "Scorer",
    "PropositionalScorer",
    "PerspectivalScorer",
    "ParticipatoryScorer",
    "query_coupling",
    "unit_patches",
    "USE_KERNEL",
]

SCORERS: dict[str, type[Scorer]] = {}

#: Whether CUDA float32 inputs go to the scorers' Triton kernels (else the torch forms everywhere).
USE_KERNEL: bool = kernel_enabled("ARRCOC_SCORER_KERNEL")

#: The most regions per image the kernels that normalise a region map hold at once; larger grids take the torch form.
KERNEL_REGIONS = 1024


def _uses_kernel(features: Tensor, *grids: Tensor, side: int = 1) -> bool:
    """Whether a scorer's kernels stand in for its torch form: ``features`` as :func:`runs_kernel` asks, and each of
    ``grids`` (texture, patch validity, coupling: float32 tensors on the same patch grid), no more than
    :data:`KERNEL_REGIONS` regions of ``side``."""
    return (
        runs_kernel(features, USE_KERNEL)
        and all(g.dtype == torch.float32 and g.shape[:3] == features.shape[:3] for g in grids)
        and math.prod(region_grid(features.shape[1:3], side)) <= KERNEL_REGIONS
    )


def _couples_in_kernel(unit: Tensor, query: Tensor, query_mask: Tensor) -> bool:
    """Whether :func:`query_coupling`'s kernel stands in for its torch form: ``unit`` as :func:`runs_kernel` asks, a
    boolean mask and at least one query token."""
    return runs_kernel(unit, USE_KERNEL) and query_mask.dtype == torch.bool and query.shape[1] > 0


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a scorer available to :func:`create_scorer` under ``name``."""

    def add(cls: type[Scorer]) -> type[Scorer]:
        SCORERS[name] = cls
        cls.name = name
        return cls

    return add


def create_scorer(name: str, region_size: int = 4, **kwargs: object) -> Scorer:
    """Build a registered scorer by name."""
    if name not in SCORERS:
        raise InvalidInputError(f"unknown scorer {name!r}; registered: {sorted(SCORERS)}")
    return SCORERS[name](region_size=region_size, **kwargs)


class Scorer(nn.Module):
    """Base class: one relevance map over regions of ``region_size x region_size`` patches."""

    name: str = ""
    region_size: Final[int]

    def __init__(self, region_size: int = 4) -> None:
        super().__init__()
        self.region_size = region_size

    def regions(self, grid: Tensor) -> Tensor:
        """``(B, gh, gw, C)`` -> ``(B, rh, rw, P, C)``."""
        return to_regions(grid, self.region_size)

    def forward(
        self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor
    ) -> Tensor:
        """Score regions.

        Args:
            features: ``(B, gh, gw, D)`` encoder patch features.
            texture: ``(B, gh, gw, 6)`` texture features (``arrcoc.stages.texture.TEXTURE_CHANNELS``).
            patch_valid: ``(B, gh, gw)`` share of each patch that is image (0 on padding).
            query: ``(B, L, D)`` query embedding tokens.
            query_mask: ``(B, L)`` bool, True on real query tokens (all False: no query).

        Returns:
            ``(B, rh, rw)`` float32 in [0, 1] per image.
        """
        raise NotImplementedError


@register_scorer("propositional")
class PropositionalScorer(Scorer):
    """Information: edge density, local contrast and colour variety, plus the spread of encoder features.

    Each term is normalised per image, then they are mixed with ``term_weights`` (edge, contrast, colour,
    feature spread).
    """

    def __init__(
        self, region_size: int = 4, term_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.5)
    ) -> None:
        super().__init__(region_size)
        self.register_buffer("term_weights", torch.tensor(term_weights).view(-1, 1, 1), persistent=False)

    def forward(
        self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor
    ) -> Tensor:
        if _uses_kernel(features, texture, patch_valid, side=self.region_size) and texture.shape[-1] >= 5:
            from . import _region_stats_triton  # Triton is imported on the first CUDA call only

            return _region_stats_triton.propositional(
                texture, features, patch_valid, self.region_size, self.term_weights
            )
        weights = self.regions(patch_valid[..., None])  # (B, rh, rw, P, 1)
        valid = weights.sum((-1, -2)) > 0  # (B, rh, rw)
        stats = self.regions(torch.cat((texture[..., :5], features), -1))  # (B, rh, rw, P, 5 + D): flatness left out
        mean = masked_mean(stats, weights, -2)  # (B, rh, rw, 5 + D)
        var = (masked_mean(stats.square(), weights, -2) - mean.square()).clamp_min(0)
        colour = var[..., :3].mean(-1).sqrt()  # spread of L*a*b* across the region's patches
        spread = var[..., 5:].mean(-1).sqrt()  # spread of encoder features
        terms = normalize_per_image(torch.stack((mean[..., 3], mean[..., 4], colour, spread), 1), valid)
        return normalize_per_image((terms * self.term_weights).sum(1), valid)


def _surround_mean(values: Tensor, weights: Tensor, size: int) -> Tensor:
    """Weighted surround mean: the mean of ``values`` over each ``size x size`` window (the part of it on the grid)
    over the mean of ``weights`` there, clamped.

    Bit for bit ``avg_pool2d(values) / avg_pool2d(weights).clamp_min(1e-6)`` with ``count_include_pad=False``,
    but built from window sums (``divisor_override=1``) and a count of each window's cells on the grid: inductor
    lowers ``count_include_pad=False`` to a divisor of ``Max(-2 + index, 0)`` index expressions, on which the
    Triton code generator of torch 2.11 fails (``'-2 + ((0))' is not comparable``, the score stage on the H100).

    Args:
        values: ``(B, C, gh, gw)`` weighted values.
        weights: ``(B, 1, gh, gw)`` their weights.

    Returns:
        ``(B, C, gh, gw)``, the dtype of ``values``.
    """
    pool = dict(kernel_size=size, stride=1, padding=size // 2, divisor_override=1)  # window sums, zero padding
    # sums at least in float32 (as avg_pool2d accumulates), each mean rounded to the input dtype as it rounds it
    acc = torch.promote_types(values.dtype, torch.float32)
    inside = F.avg_pool2d(
        torch.ones_like(weights, dtype=acc), **pool
    )  # (B, 1, gh, gw) cells of each window on the grid
    mean_values = (F.avg_pool2d(values.to(acc), **pool) / inside).to(values.dtype)
    mean_weights = (F.avg_pool2d(weights.to(acc), **pool) / inside).to(weights.dtype)
    return mean_values / mean_weights.clamp_min(1e-6)


@register_scorer("perspectival")
class PerspectivalScorer(Scorer):
    """Salience: colour contrast with the surround and with the whole image, and feature distinctness.

    Measured per patch (``term_weights``: local contrast, global contrast, feature distinctness), then per
    region as half its peak and half its mean, so a small salient object lights up its region.
    """

    def __init__(
        self, region_size: int = 4, surround: int = 5, term_weights: tuple[float, float, float] = (1.0, 0.5, 0.5)
    ) -> None:
        super().__init__(region_size)
        self.surround = surround
        self.register_buffer("term_weights", torch.tensor(term_weights).view(-1, 1, 1), persistent=False)

    def forward(
        self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor
    ) -> Tensor:
        if _uses_kernel(features, texture, patch_valid, side=self.region_size) and texture.shape[-1] >= 3:
            from . import _perspectival_triton  # Triton is imported on the first CUDA call only

            return _perspectival_triton.launch(
                texture, features, patch_valid, self.region_size, self.surround, self.term_weights
            )
        w = patch_valid[:, None]  # (B, 1, gh, gw)
        lab = texture[..., :3].permute(0, 3, 1, 2)  # (B, 3, gh, gw)
        surround = _surround_mean(lab * w, w, self.surround)
        local = (lab - surround).norm(dim=1)  # (B, gh, gw)
        image_mean = (lab * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(1e-6)
        global_ = (lab - image_mean).norm(dim=1)  # (B, gh, gw)
        mean_feature = (features * patch_valid[..., None]).sum((1, 2), keepdim=True)  # direction only
        distinct = 1 - F.cosine_similarity(features, mean_feature, dim=-1)  # (B, gh, gw)
        terms = normalize_per_image(torch.stack((local, global_, distinct), 1), patch_valid > 0)
        patch = (terms * self.term_weights).sum(1)  # (B, gh, gw)
        weights = self.regions(patch_valid[..., None])[..., 0]  # (B, rh, rw, P)
        per_region = self.regions(patch[..., None])[..., 0]
        score = 0.5 * per_region.amax(-1) + 0.5 * masked_mean(per_region, weights, -1)  # padding patches score 0
        return normalize_per_image(score, weights.sum(-1) > 0)


def unit_patches(features: Tensor) -> Tensor:
    """``(B, gh, gw, D) -> (B, N, D)``: each patch's feature scaled to unit length, what cosines are taken of."""
    return F.normalize(features.float().flatten(1, 2), dim=-1)


def query_coupling(features: Tensor, query: Tensor, query_mask: Tensor, unit: Tensor | None = None) -> Tensor:
    """Per patch, the best cosine with any real query token: ``(B, gh, gw, D), (B, L, D), (B, L) -> (B, gh, gw)``.

    -2 everywhere for an image without a query (all of ``query_mask`` False): padding tokens never win the max.
    ``unit``: :func:`unit_patches` of ``features`` when already computed.
    """
    patches = unit_patches(features) if unit is None else unit  # (B, N, D)
    if _couples_in_kernel(patches, query, query_mask):
        from . import _participatory_triton  # Triton is imported on the first CUDA call only

        return _participatory_triton.coupling(patches, query.float(), query_mask).view(features.shape[:3])
    tokens = F.normalize(query.float(), dim=-1)  # (B, L, D)
    cosine = torch.einsum("bnd,bld->bnl", patches, tokens)  # (B, N, L)
    cosine = torch.where(query_mask[:, None, :], cosine, -2.0)
    return cosine.amax(-1).view(features.shape[:3])


@register_scorer("participatory")
class ParticipatoryScorer(Scorer):
    """Coupling to the query: the best cosine between a patch and any real query token, peak per region.

    The query lives in the encoder's feature space (width ``D``); a text encoder or a trained projection
    maps text there before this stage. Padding tokens of the query never count. Images without a query get
    an all-zero map.
    """

    def forward(
        self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor
    ) -> Tensor:
        return self.from_coupling(query_coupling(features, query, query_mask), patch_valid, query_mask)

    def from_coupling(self, coupling: Tensor, patch_valid: Tensor, query_mask: Tensor) -> Tensor:
        """The map from each patch's coupling (:func:`query_coupling`), for a caller that keeps the coupling too."""
        if _uses_kernel(coupling, patch_valid, side=self.region_size) and query_mask.dtype == torch.bool:
            from . import _participatory_triton  # Triton is imported on the first CUDA call only

            return _participatory_triton.peak(coupling, patch_valid, query_mask, self.region_size)
        weights = self.regions(patch_valid[..., None])[..., 0]  # (B, rh, rw, P)
        per_region = self.regions(coupling[..., None])[..., 0]
        peak = torch.where(weights > 0, per_region, -2.0).amax(-1)  # (B, rh, rw)
        score = normalize_per_image(peak, weights.sum(-1) > 0)
        return score * query_mask.any(-1)[:, None, None]
