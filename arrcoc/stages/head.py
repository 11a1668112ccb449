"""The relevance head: every stage after the encoder, wired once.

features, texture, patch validity, query, query mask, budget
    -> score x3 -> balance -> allocate -> compress
    -> scores, relevance, balance report, allocation, tokens, positions, mask, weights

``Pipeline`` runs it after its encoder, the reducer behind ``arrcoc.hf`` after a VLM's own vision tower, and
training on drawn relevance maps; nothing else wires these stages. :meth:`RelevanceHead.stages` gives the
chain as named ``state -> new entries`` steps, which the graph runner captures and the benchmarks time one
by one; :meth:`RelevanceHead.forward` runs the same steps in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

import torch
from torch import Tensor, nn

from ..config import SCORER_NAMES, PipelineConfig
from ..errors import InvalidInputError, MissingWeightsError
from ..runtime.streams import run_branches
from .allocation import Allocator
from .balance import Balance, frame_patches, novelty, pick_patches
from .compression import Compressor
from .objectness import Objectness
from .regions import region_bounds, to_patches
from .scorers import create_scorer, query_coupling, unit_patches

__all__ = ["RelevanceHead", "Stage", "HEAD_OUTPUTS", "needs_objectness"]

#: One step of a chain: reads named tensors from a state dict, returns the new ones.
Stage = tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]

#: What the head returns, in order (the last five only when it allocates).
HEAD_OUTPUTS = ("scores", "relevance", "balance", "allocation", "tokens", "positions", "mask", "weights")


def needs_objectness(config: PipelineConfig) -> bool:
    """Whether a head of ``config`` picks by an objectness probe (``balance.pick="peaks"`` with a cover to use it)."""
    return config.balance.pick == "peaks" and config.balance.cover > 0


class RelevanceHead(nn.Module):
    """Score x3 -> balance -> allocate -> compress, on any patch-feature grid.

    Args:
        config: region size, token bounds, balance and compression settings.
        scorers: the scorers that take part (the others get weight 0); a head without the participatory
            scorer reads no query anywhere, compression included.
        concurrent: on CUDA, run the three scorers and the balance's region similarity on side streams.
        compile: ``torch.compile`` each step (each branch of the scoring step) before it runs or is captured.
        objectness: the probe of ``balance.pick="peaks"`` (:func:`needs_objectness`), trained on the features the
            head will read; the caller checks that it belongs to its encoder (:meth:`Objectness.check`).

    Raises:
        MissingWeightsError: the config picks ``"peaks"`` and no probe is given.
    """

    region_size: Final[int]
    concurrent: Final[bool]
    compile: Final[bool]

    def __init__(
        self,
        config: PipelineConfig | None = None,
        scorers: tuple[str, ...] = SCORER_NAMES,
        *,
        concurrent: bool = True,
        compile: bool = False,
        objectness: Objectness | None = None,
    ) -> None:
        super().__init__()
        config = config or PipelineConfig()
        unknown = sorted(set(scorers) - set(SCORER_NAMES))
        if unknown or not scorers:
            raise InvalidInputError(f"scorers must be a non-empty subset of {SCORER_NAMES}; got {scorers}")
        if tuple(scorers) != SCORER_NAMES:
            weights = tuple(w if name in scorers else 0.0 for name, w in zip(SCORER_NAMES, config.balance.weights))
            if sum(weights) == 0:
                weights = tuple(1.0 if name in scorers else 0.0 for name in SCORER_NAMES)
            config = config.replace(
                balance=dataclasses.replace(config.balance, weights=weights),
                query_detail=config.query_detail if "participatory" in scorers else 0.0,
            )
        self.config = config
        self.region_size = side = config.region_size
        self.concurrent, self.compile = concurrent, compile
        self.scorers = nn.ModuleDict({name: create_scorer(name, side) for name in SCORER_NAMES})
        self.balance = Balance(config.balance, side)
        self.allocator = Allocator()
        self.compressor = Compressor(side, config.query_detail, config.novelty_detail)
        # without a question, given a budget, a pick of the image's patches may replace the novelty cover
        self.pick: Final[str] = config.balance.pick if config.balance.cover > 0 else "off"
        # with novelty_detail (or a pick by novelty), the patches' novelty is computed once, beside the scorers, for
        # the balance's cover and compression; without it the balance computes it for its cover alone
        self.novelty: Final[bool] = config.novelty_detail > 0 or self.pick == "novelty"
        # the greedy picks keep an artificial border last; ranking by novelty has no tiers
        self.keeps_frame: Final[bool] = config.balance.pick_frame and self.pick in ("maxmin", "peaks")
        if self.pick == "peaks" and objectness is None:
            raise MissingWeightsError(
                "balance.pick='peaks' needs an objectness probe trained on the encoder's features (objectness=, "
                "arrcoc.stages.objectness.Objectness.for_encoder); Pipeline.from_pretrained() and the arrcoc reducers "
                "load the shipped encoder's"
            )
        self.objectness = objectness if self.pick == "peaks" else None

    def bounds(self, patch_valid: Tensor) -> tuple[Tensor, Tensor]:
        """``(min, max)`` tokens per region, each ``(B, rh, rw)`` int64; needs patch validity only, so a caller
        may compute it beside its encoder and pass it to :meth:`forward`."""
        return region_bounds(patch_valid, self.region_size, self.config.min_tokens, self.config.max_tokens)

    def stages(
        self,
        capacity: int = 0,
        *,
        concurrent: bool | None = None,
        compile: bool | None = None,
        pick_steps: int | None = None,
    ) -> list[Stage]:
        """The head as named steps over a state dict.

        The state holds ``features``, ``texture``, ``patch_valid``, ``query``, ``query_mask`` and, when
        ``capacity > 0``, ``budget``, ``min_tokens`` and ``max_tokens`` (:meth:`bounds`). With ``capacity=0`` the
        chain stops after balance (relevance only, no budget).

        Args:
            capacity: the token capacity ``T`` of the packed output (0: relevance only).
            concurrent: side streams for the scoring branches (default: the head's setting).
            compile: ``torch.compile`` each step and branch (default: the head's setting).
            pick_steps: the greedy steps of the query-free pick (``BalanceConfig.pick``), at least the largest
                budget: ``None`` takes ``capacity``; 0 builds no pick, for a caller that knows every image has a
                question (the pick is only read without one).
        """
        concurrent = self.concurrent if concurrent is None else concurrent
        compile = self.compile if compile is None else compile

        def body(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, dynamic=False) if compile else fn

        propositional, perspectival = body(self.scorers["propositional"]), body(self.scorers["perspectival"])
        participatory = self.scorers["participatory"]

        def couple(features: Tensor, patch_valid: Tensor, query: Tensor, query_mask: Tensor) -> tuple[Tensor, ...]:
            unit = unit_patches(features)  # (B, N, D) the query-free pick's cosines reuse it
            coupling = query_coupling(features, query, query_mask, unit)  # (B, gh, gw) compression reuses it
            return participatory.from_coupling(coupling, patch_valid, query_mask), coupling, unit

        couple, similarity_of, novelty_of = body(couple), body(self.balance.similarity), body(novelty)

        steps = capacity if pick_steps is None else min(pick_steps, capacity)
        picks = self.pick != "off" and steps > 0  # a pick needs a budget
        asked = self.pick != "off" and pick_steps == 0  # the caller left the pick out: every image has a question
        # a greedy pick that no scorer weights reads the image alone: it runs beside the scorers, off the chain's
        # critical path (its loop is one program per image, latency-bound); one weighted by salience, or ranking by
        # the novelty computed beside the scorers, runs after them
        early_pick = picks and self.config.balance.pick_salience == 0 and self.pick != "novelty"

        def pick_of(features: Tensor, texture: Tensor, patch_valid: Tensor, budget: Tensor) -> Tensor:
            return self._pick(features, texture, patch_valid, budget, steps)

        pick_of = body(pick_of)

        # The balance's region similarity, the patches' novelty and a pick no scorer weights need the image only:
        # they run beside the scorers.
        def score(s: dict[str, Any]) -> dict[str, Any]:
            args = (s["features"], s["texture"], s["patch_valid"], s["query"], s["query_mask"])
            branches = {
                "propositional": lambda: propositional(*args),
                "perspectival": lambda: perspectival(*args),
                "participatory": lambda: couple(s["features"], s["patch_valid"], s["query"], s["query_mask"]),
                "similarity": lambda: similarity_of(s["features"], s["patch_valid"]),
            }
            if self.novelty:
                branches["novelty"] = lambda: novelty_of(s["features"], s["patch_valid"])
            if early_pick:
                branches["pick"] = lambda: pick_of(s["features"], s["texture"], s["patch_valid"], s["budget"])
            results = dict(zip(branches, run_branches(list(branches.values()), s["features"].device, concurrent)))
            participation, coupling, unit = results.pop("participatory")
            scores = torch.stack((results.pop("propositional"), results.pop("perspectival"), participation), 1)
            # novelty (B, gh, gw) and pick (B, gh, gw), where computed
            return {"scores": scores, "coupling": coupling, "unit": unit, **results}

        def balance(s: dict[str, Any]) -> dict[str, Any]:
            budget = s["budget"] if capacity else None  # relevance alone has no budget to be scarce
            pick = None
            if picks:
                pick = s["pick"] if early_pick else self._pick(
                    s["features"], s["texture"], s["patch_valid"], s["budget"], steps, s["scores"], s.get("unit"),
                    s.get("novelty"),
                )  # fmt: skip
            relevance, report = self.balance(
                s["scores"],
                s["features"],
                s["patch_valid"],
                s["query_mask"],
                budget,
                s["similarity"],
                s.get("novelty"),
                pick,
                asked,
            )
            out = {"relevance": relevance, "balance": report}
            if pick is not None and not early_pick:
                out["pick"] = pick  # (B, gh, gw)
            return out

        def allocate(s: dict[str, Any]) -> dict[str, Any]:
            return {"allocation": self.allocator(s["relevance"], s["budget"], s["min_tokens"], s["max_tokens"])}

        def compress(s: dict[str, Any]) -> dict[str, Any]:
            tokens, positions, mask, weights = self.compressor(
                s["features"],
                s["patch_valid"],
                s["allocation"],
                capacity,
                s["query"],
                s["query_mask"],
                s.get("novelty"),
                s.get("pick"),
                s.get("coupling"),
            )
            return {"tokens": tokens, "positions": positions, "mask": mask, "weights": weights}

        chain: list[Stage] = [("score", score), ("balance", body(balance))]
        if capacity:
            chain += [("allocate", body(allocate)), ("compress", body(compress))]
        return chain

    def _pick(
        self,
        features: Tensor,
        texture: Tensor,
        patch_valid: Tensor,
        budget: Tensor,
        steps: int,
        scores: Tensor | None = None,
        unit: Tensor | None = None,
        patch_novelty: Tensor | None = None,
    ) -> Tensor:
        """``(B, gh, gw)`` the query-free pick (:func:`arrcoc.stages.balance.pick_patches`) of ``budget`` patches,
        weighted by the query-free scorers' map in ``scores`` (propositional and perspectival, at their base weights;
        only read with ``balance.pick_salience``), an artificial border's patches last (``balance.pick_frame``);
        ``unit`` and ``patch_novelty``: the patches' unit features and novelty, when already computed."""
        cfg = self.config.balance
        salience = None  # only computed where it weighs
        if cfg.pick_salience > 0:
            assert scores is not None  # the balance step passes them
            weights = self.balance.base_weights[:2]
            salience = (scores[:, :2] * weights[:, None, None]).sum(1) / weights.sum().clamp_min(1e-12)
            salience = to_patches(salience, features.shape[1:3], self.region_size)  # (B, gh, gw)
        return pick_patches(
            self.pick,
            features,
            patch_valid,
            budget,
            steps,
            salience,
            cfg.pick_salience,
            texture[..., :3],
            cfg.pick_colour,
            patch_novelty,
            cfg.pick_spatial,
            self.objectness(features, patch_valid) if self.objectness is not None else None,  # (B, gh, gw)
            cfg.pick_peaks,
            frame=frame_patches(texture[..., 5], patch_valid, texture[..., :3]) if self.keeps_frame else None,
            unit=unit,
        )

    def forward(
        self,
        features: Tensor,
        texture: Tensor,
        patch_valid: Tensor,
        query: Tensor,
        query_mask: Tensor,
        budget: Tensor | None = None,
        capacity: int = 0,
        *,
        relevance: Tensor | None = None,
        pick_steps: int | None = None,
    ) -> dict[str, Any]:
        """Run the head.

        Args:
            features: ``(B, gh, gw, D)`` float32 patch features.
            texture: ``(B, gh, gw, 6)`` texture features (zeros where there are no pixels).
            patch_valid: ``(B, gh, gw)`` share of each patch that is image.
            query: ``(B, L, D)`` query tokens in the feature space (zeros with an all-False mask: no query).
            query_mask: ``(B, L)`` bool, True on real query tokens.
            budget: ``(B,)`` int64 tokens per image (``None``: relevance only).
            capacity: ``T``, the packed output's token slots, at least the largest budget (0: relevance only).
            relevance: ``(B, rh, rw)`` a map to allocate by instead of scoring and balancing (training draws
                random ones); the output then has no scores or balance report.
            pick_steps: as in :meth:`stages`.

        Returns:
            ``HEAD_OUTPUTS`` present for this call: ``scores`` ``(B, 3, rh, rw)``, ``relevance`` ``(B, rh, rw)``,
            ``balance`` (dict of per-image tensors), and with a budget ``allocation`` ``(B, rh, rw)``, ``tokens``
            ``(B, T, D)``, ``positions`` ``(B, T, 4)``, ``mask`` ``(B, T)``, ``weights`` ``(B, T)``.
        """
        if (budget is None) != (capacity == 0):
            raise InvalidInputError("budget and capacity go together: both for compression, neither for relevance")
        state: dict[str, Any] = {
            "features": features,
            "texture": texture,
            "patch_valid": patch_valid,
            "query": query,
            "query_mask": query_mask,
        }
        if capacity:
            state["budget"] = budget
            state["min_tokens"], state["max_tokens"] = self.bounds(patch_valid)
        steps = self.stages(capacity, pick_steps=pick_steps)
        if relevance is not None:
            if not capacity:
                raise InvalidInputError("a given relevance map is only for allocation: pass a budget and capacity")
            state["relevance"] = relevance
            steps = [step for step in steps if step[0] in ("allocate", "compress")]
        for _, step in steps:
            state.update(step(state))
        return {key: state[key] for key in HEAD_OUTPUTS if key in state}
