"""arrcoc's own reducer: the relevance head on any feature grid, registered as ``arrcoc`` and its ablations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_WEIGHTS_DIR, SCORER_NAMES, PipelineConfig
from ..errors import BudgetError, MissingWeightsError
from ..stages.head import RelevanceHead, needs_objectness
from ..stages.objectness import OBJECTNESS_FILE, Objectness
from ..stages.regions import capacity_of
from ..stages.texture import TEXTURE_CHANNELS, Texture
from .registry import ReducedTokens, VisualInput, check_budget, check_visual, register_reducer

__all__ = ["ArrcocReducer"]


class ArrcocReducer(nn.Module):
    """arrcoc's relevance head on any feature grid: texture from the pixels, then the head, to ``K`` tokens.

    The same :class:`~arrcoc.stages.head.RelevanceHead` as :class:`arrcoc.Pipeline`, minus the encoder, so it
    runs on a VLM's own vision-tower features.

    Args:
        config: region size, token bounds and balance settings (the default config when omitted).
        scorers: names from ``SCORER_NAMES`` that take part (the others get weight 0): all three balanced, or
            one alone for ablations.
        read_query: ``False`` ignores any query given: relevance without a question, as a query-free baseline (a
            reducer without the participatory scorer never reads one).
        objectness: the probe of ``balance.pick="peaks"``, trained on the features this reducer will be given.
            By default the shipped one (``weights/objectness.safetensors``), which is trained on the shipped
            encoder, the vision tower of the shipped VLM: the reducer sees features only, so it checks their width
            (features of another width raise ``MissingWeightsError``), not whose they are.
    """

    needs: frozenset[str] = frozenset({"pixels", "valid", "patch_valid", "query", "query_mask"})

    def __init__(
        self,
        config: PipelineConfig | None = None,
        scorers: tuple[str, ...] = SCORER_NAMES,
        *,
        read_query: bool = True,
        objectness: Objectness | None = None,
    ) -> None:
        super().__init__()
        if objectness is None and needs_objectness(config or PipelineConfig()):
            objectness = Objectness.load(DEFAULT_WEIGHTS_DIR / OBJECTNESS_FILE)
        self.head = RelevanceHead(config, scorers, objectness=objectness)
        self.config = self.head.config
        # without the participatory scorer no query is read anywhere: not by compression, nor by the balance's
        # query-free tensions, which a query's presence would turn off
        self.read_query = read_query and "participatory" in scorers
        self.texture = Texture()

    def forward(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """Reduce ``visual.features`` ``(B, gh, gw, D)`` to ``budget`` tokens per image."""
        check_visual(visual)
        check_budget(visual, budget)
        cfg = self.config
        features = visual.features.float()
        b, gh, gw, d = features.shape
        probe = self.head.objectness
        if probe is not None and d != probe.width:
            raise MissingWeightsError(
                f"balance.pick='peaks' reads an objectness probe of {probe.width}-wide features (the shipped "
                f"encoder's, unless one was passed as objectness=); these features are {d} wide: train a probe on "
                "this tower's features (`python -m arrcoc.world.objectness`) or choose another pick"
            )
        patch_valid = visual.valid_patches().float()
        limit = capacity_of((gh, gw), cfg.region_size, cfg.max_tokens)
        if budget > limit:
            raise BudgetError(
                f"budget must be at most {limit}, the token capacity of a {gh}x{gw} grid under "
                f"max_tokens={cfg.max_tokens}; got {budget}"
            )
        if visual.pixels is not None:
            valid = visual.valid if visual.valid is not None else torch.ones_like(visual.pixels[:, :1])
            texture = self.texture(visual.pixels.float(), valid.float(), (gh, gw))  # (B, gh, gw, 6)
        else:
            texture = features.new_zeros(b, gh, gw, len(TEXTURE_CHANNELS))  # no pixels: the feature terms alone
        if visual.query is not None and self.read_query:
            query = visual.query.float().expand(b, -1, -1)
            query_mask = (
                visual.query_mask.expand(b, -1)
                if visual.query_mask is not None
                else torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
            )
        else:
            query = features.new_zeros(b, 1, d)
            query_mask = torch.zeros(b, 1, dtype=torch.bool, device=features.device)
        budgets = torch.full((b,), budget, dtype=torch.long, device=features.device)
        out = self.head(features, texture, patch_valid, query, query_mask, budgets, budget)
        return ReducedTokens(
            out["tokens"].to(visual.features.dtype),
            out["positions"],
            out["weights"],
            out["relevance"],
            out["allocation"],
        )


def _arrcoc_factory(scorers: tuple[str, ...], read_query: bool = True) -> Callable[..., ArrcocReducer]:
    def build(config: PipelineConfig | None = None, objectness: Objectness | None = None, **_: Any) -> ArrcocReducer:
        return ArrcocReducer(config, scorers, read_query=read_query, objectness=objectness)

    build.__doc__ = f"arrcoc's reducer with the scorers {scorers}{'' if read_query else ', reading no query'}."
    return build


register_reducer("arrcoc")(_arrcoc_factory(SCORER_NAMES))
#: What ``Pipeline`` does before any question exists: propositional and perspectival balanced, no query read.
register_reducer("arrcoc-noquery")(_arrcoc_factory(SCORER_NAMES, read_query=False))
for _name in SCORER_NAMES:
    register_reducer(f"arrcoc-{_name}")(_arrcoc_factory((_name,)))
