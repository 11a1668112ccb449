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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InvalidInputError
from .regions import masked_mean, normalize_per_image, to_regions

__all__ = ["SCORERS", "register_scorer", "create_scorer", "Scorer",
           "PropositionalScorer", "PerspectivalScorer", "ParticipatoryScorer"]

SCORERS: dict[str, type[Scorer]] = {}


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

    def forward(self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor,
                query_mask: Tensor) -> Tensor:
        """Score regions.

        Args:
            features: ``(B, gh, gw, D)`` encoder patch features.
            texture: ``(B, gh, gw, 5)`` texture features (``arrcoc.texture.TEXTURE_CHANNELS``).
            patch_valid: ``(B, gh, gw)`` share of each patch that is image (0 on padding).
            query: ``(B, L, D)`` query embedding tokens.
            query_mask: ``(B, L)`` bool, True on real query tokens (all False: no query).

        Returns:
            ``(B, rh, rw)`` float32 in [0, 1] per image.
        """
        raise NotImplementedError


def _weighted_spread(values: Tensor, weights: Tensor) -> Tensor:
    """Standard deviation over the patch axis -2, weighted; averaged over channels. ``(B, rh, rw, P, C) -> (B, rh, rw)``."""
    w = weights[..., None]
    mean = masked_mean(values, w, -2)  # (B, rh, rw, C)
    var = masked_mean((values - mean[..., None, :]).square(), w, -2)
    return var.mean(-1).clamp_min(0).sqrt()


@register_scorer("propositional")
class PropositionalScorer(Scorer):
    """Information: edges, local contrast and colour variety, plus the spread of encoder features."""

    def __init__(self, region_size: int = 4, feature_weight: float = 0.5) -> None:
        super().__init__(region_size)
        self.feature_weight = feature_weight

    def forward(self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor,
                query_mask: Tensor) -> Tensor:
        weights = self.regions(patch_valid[..., None])[..., 0]  # (B, rh, rw, P)
        valid = weights.sum(-1) > 0  # (B, rh, rw)
        tex = self.regions(texture)  # (B, rh, rw, P, 5)
        edge = masked_mean(tex[..., 3], weights, -1)
        contrast = masked_mean(tex[..., 4], weights, -1)
        colour = _weighted_spread(tex[..., :3], weights)
        spread = _weighted_spread(self.regions(features), weights)
        terms = [normalize_per_image(t, valid) for t in (edge, contrast, colour)]
        texture_score = sum(terms) / len(terms)
        score = texture_score + self.feature_weight * normalize_per_image(spread, valid)
        return normalize_per_image(score, valid)


@register_scorer("perspectival")
class PerspectivalScorer(Scorer):
    """Salience: colour contrast with the surround and with the whole image, and feature distinctness."""

    def __init__(self, region_size: int = 4, surround: int = 5, feature_weight: float = 0.5) -> None:
        super().__init__(region_size)
        self.surround = surround
        self.feature_weight = feature_weight

    def forward(self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor,
                query_mask: Tensor) -> Tensor:
        w = patch_valid[:, None]  # (B, 1, gh, gw)
        lab = texture[..., :3].permute(0, 3, 1, 2)  # (B, 3, gh, gw)
        pool = dict(kernel_size=self.surround, stride=1, padding=self.surround // 2, count_include_pad=False)
        surround = F.avg_pool2d(lab * w, **pool) / F.avg_pool2d(w, **pool).clamp_min(1e-6)
        local = (lab - surround).norm(dim=1)  # (B, gh, gw)
        image_mean = masked_mean(lab.flatten(2), w.flatten(2), -1)  # (B, 3)
        global_ = (lab - image_mean[..., None, None]).norm(dim=1)  # (B, gh, gw)
        flat = features.flatten(1, 2)  # (B, N, D)
        mean_feature = masked_mean(flat, patch_valid.flatten(1)[..., None], 1)  # (B, D)
        distinct = 1 - F.cosine_similarity(flat, mean_feature[:, None], dim=-1).view_as(patch_valid)
        valid = patch_valid > 0
        patch = (normalize_per_image(local, valid) + 0.5 * normalize_per_image(global_, valid)
                 + self.feature_weight * normalize_per_image(distinct, valid))  # (B, gh, gw)
        weights = self.regions(patch_valid[..., None])[..., 0]  # (B, rh, rw, P)
        per_region = self.regions(patch[..., None])[..., 0]
        # A small salient object should light up its region: half peak, half mean.
        peak = torch.where(weights > 0, per_region, 0.0).amax(-1)
        score = 0.5 * peak + 0.5 * masked_mean(per_region, weights, -1)
        return normalize_per_image(score, weights.sum(-1) > 0)


@register_scorer("participatory")
class ParticipatoryScorer(Scorer):
    """Coupling to the query: the best cosine between a patch and any real query token, peak per region.

    The query lives in the encoder's feature space (width ``D``); a text encoder or a trained projection
    maps text there before this stage. Padding tokens of the query never count. Images without a query get
    an all-zero map.
    """

    def forward(self, features: Tensor, texture: Tensor, patch_valid: Tensor, query: Tensor,
                query_mask: Tensor) -> Tensor:
        patches = F.normalize(features.flatten(1, 2), dim=-1)  # (B, N, D)
        tokens = F.normalize(query.float(), dim=-1)  # (B, L, D)
        cosine = torch.einsum("bnd,bld->bnl", patches, tokens)  # (B, N, L)
        cosine = torch.where(query_mask[:, None, :], cosine, -2.0)  # padding never wins the max
        coupling = cosine.amax(-1).view_as(patch_valid)  # (B, gh, gw)
        weights = self.regions(patch_valid[..., None])[..., 0]  # (B, rh, rw, P)
        per_region = self.regions(coupling[..., None])[..., 0]
        peak = torch.where(weights > 0, per_region, -2.0).amax(-1)  # (B, rh, rw)
        score = normalize_per_image(peak, weights.sum(-1) > 0)
        return score * query_mask.any(-1)[:, None, None]
