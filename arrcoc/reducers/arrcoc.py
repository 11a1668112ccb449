"""arrcoc's own reducer: the relevance head on any feature grid, registered as ``arrcoc`` and its ablations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import SCORER_NAMES, PipelineConfig
from ..errors import BudgetError, InvalidInputError
from ..stages.allocation import Allocator
from ..stages.balance import Balance
from ..stages.compression import Compressor
from ..stages.regions import capacity_of, region_bounds
from ..stages.scorers import create_scorer
from ..stages.texture import Texture
from .registry import ReducedTokens, VisualInput, check_budget, check_visual, register_reducer

__all__ = ["ArrcocReducer"]


class ArrcocReducer(nn.Module):
    """arrcoc's relevance path on any feature grid: score x3 -> balance -> allocate -> compress to ``K``.

    The same stage modules as :class:`arrcoc.Pipeline`, minus the encoder, so it runs on a VLM's own
    vision-tower features. ``scorers`` picks which relevance maps take part (the others get weight 0): all
    three balanced, or one alone for ablations.

    Args:
        config: region size, token bounds and balance settings (the default config when omitted).
        scorers: names from ``SCORER_NAMES`` that take part.
    """

    needs: frozenset[str] = frozenset({"pixels", "valid", "patch_valid", "query", "query_mask"})

    def __init__(self, config: PipelineConfig | None = None, scorers: tuple[str, ...] = SCORER_NAMES) -> None:
        super().__init__()
        config = config or PipelineConfig()
        unknown = sorted(set(scorers) - set(SCORER_NAMES))
        if unknown or not scorers:
            raise InvalidInputError(f"scorers must be a non-empty subset of {SCORER_NAMES}; got {scorers}")
        weights = tuple(w if name in scorers else 0.0 for name, w in zip(SCORER_NAMES, config.balance.weights))
        if sum(weights) == 0:
            weights = tuple(1.0 if name in scorers else 0.0 for name in SCORER_NAMES)
        # a variant without the participatory scorer reads no query anywhere (nor in compression): a clean ablation
        query_detail = config.query_detail if "participatory" in scorers else 0.0
        self.config = config.replace(balance=dataclasses.replace(config.balance, weights=weights), query_detail=query_detail)
        side = config.region_size
        self.texture = Texture()
        self.scorers = nn.ModuleDict({name: create_scorer(name, side) for name in SCORER_NAMES})
        self.balance = Balance(self.config.balance, side)
        self.allocator = Allocator()
        self.compressor = Compressor(side, self.config.query_detail)

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Reduce ``visual.features`` ``(B, gh, gw, D)`` to ``budget`` tokens per image."""
        check_visual(visual)
        check_budget(visual, budget)
        cfg = self.config
        features = visual.features.float()
        b, gh, gw, d = features.shape
        patch_valid = visual.valid_patches().float()
        limit = capacity_of((gh, gw), cfg.region_size, cfg.max_tokens)
        if budget > limit:
            raise BudgetError(f"budget must be at most {limit}, the token capacity of a {gh}x{gw} grid under "
                              f"max_tokens={cfg.max_tokens}; got {budget}")
        if visual.pixels is not None:
            valid = visual.valid if visual.valid is not None else torch.ones_like(visual.pixels[:, :1])
            texture = self.texture(visual.pixels.float(), valid.float(), (gh, gw))  # (B, gh, gw, 5)
        else:
            texture = features.new_zeros(b, gh, gw, 5)  # no pixels: the feature terms alone
        if visual.query is not None:
            query = visual.query.float().expand(b, -1, -1)
            query_mask = (visual.query_mask.expand(b, -1) if visual.query_mask is not None
                          else torch.ones(query.shape[:2], dtype=torch.bool, device=query.device))
        else:
            query = features.new_zeros(b, 1, d)
            query_mask = torch.zeros(b, 1, dtype=torch.bool, device=features.device)
        scores = torch.stack([s(features, texture, patch_valid, query, query_mask) for s in self.scorers.values()], 1)
        budgets = torch.full((b,), budget, dtype=torch.long, device=features.device)
        relevance, _ = self.balance(scores, features, patch_valid, query_mask, budgets)  # (B, rh, rw)
        low, high = region_bounds(patch_valid, cfg.region_size, cfg.min_tokens, cfg.max_tokens)
        allocation = self.allocator(relevance, budgets, low, high)
        tokens, positions, _, weights = self.compressor(features, patch_valid, allocation, budget, query, query_mask)
        return ReducedTokens(tokens.to(visual.features.dtype), positions, weights, relevance, allocation)


def _arrcoc_factory(scorers: tuple[str, ...]) -> Callable[..., ArrcocReducer]:
    def build(config: PipelineConfig | None = None, **_: Any) -> ArrcocReducer:
        return ArrcocReducer(config, scorers)

    build.__doc__ = f"arrcoc's reducer with the scorers {scorers}."
    return build


register_reducer("arrcoc")(_arrcoc_factory(SCORER_NAMES))
for _name in SCORER_NAMES:
    register_reducer(f"arrcoc-{_name}")(_arrcoc_factory((_name,)))
