"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL read arrcoc's tokens: :class:`ArrcocQwen`.

The adapter wraps a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
``Qwen3VLForConditionalGeneration`` without changing it. It runs the model's own vision tower and patch merger
(``model.model.visual``), so the reducer reads the model's own *merged* visual tokens ``(gh, gw, H)``, one
grid per image at that image's own size. Any registered reducer (:mod:`arrcoc.reducers`) keeps exactly ``budget``
tokens per image; they are written, in raster order, into ``budget`` image slots of the prompt, and the language
model runs as usual with explicit multimodal rotary position ids: ``model(inputs_embeds=..., attention_mask=...,
position_ids=...)`` or the model's own ``model.generate(...)`` (transformers carries the given ``(3, B, T)``
position ids forward).

Positions. The unmodified model places the merged token at row ``r``, column ``c`` of an image that starts at
text position ``s`` at ``(t, h, w) = (s, s + r, s + c)``, and the text after the image at ``s + max(gh, gw)``
onwards. A kept token keeps its own ``(s, s + r, s + c)`` (a token that pools an area takes its box's centre
cell), and the text after the image continues at ``s + max(gh, gw)``, the full image's max + 1, not at a
compacted position. Why: rotary attention reads relative positions, so keeping them leaves every distance
between the question and a kept token exactly as the model learned it; compacting would move the question
closer to the image than any training example put it. It is also what makes the full budget exact, and the
saving does not depend on it (the KV cache holds ``budget`` tokens either way).

Graphs. Each group's reduction (the query, the reducer, the raster order and the full-width gather) replays as one
CUDA graph (:class:`arrcoc.runtime.graphs.GraphChain`) keyed on the merged grid rounded up to ``grid_multiple`` per
side (the padding marked by ``patch_valid``, so no token stands for it), the number of images in that bucket and
the query length rounded up to 16. arrcoc's reducers read the budgets as a tensor (the relevance head packs each
image's tokens into an eighth, a quarter, a half or all of the bucket's capacity, the smallest that holds the
largest budget), so a share budget, different for every image size, does not multiply the graphs (without a
question the query-free pick's greedy steps, the largest budget rounded up to a power of two, join the key); the
baselines fix their output shape by the budget, which joins their key. Reducers that pool padding like an image
patch (those that do not read ``patch_valid``: ``uniform``, ``tome``) are keyed on the exact grid.
:func:`graph_buckets` counts the captures a corpus of sizes costs.

Pruning inside the tower (``prune_after=L``). Reducing after the tower leaves the tower itself, most of the
reduced time to first token, running on every patch. With ``prune_after`` the tower runs its patch embedding and
blocks ``0..L`` on every patch (:func:`~arrcoc.integrations.vision_tower.tower_head`); the model's own patch
merger turns the block-``L`` states into merged units in the language model's space, and the relevance head
scores and picks exactly ``budget`` of them per image as above (same reducer, graph keys and query: the
participatory scorer couples the question's embeddings with these units, which is why the merger, not a plain
2x2 mean of vision states, makes the features). Each kept unit's ``m x m`` patches (contiguous in the
processor's order; Qwen2.5-VL's blocks read whole units in window order) are gathered with their own rotary
embeddings, and blocks ``L+1..`` and the merger run on them alone
(:func:`~arrcoc.integrations.vision_tower.tower_tail`): full-attention blocks inside each image's kept units
(lengths ``budget * m * m``, known on the host), windowed blocks inside each window's kept units (counted on the
device; a window may keep none). The kept tokens take the same original positions as above. Only arrcoc's
reducers prune (each of their tokens is one merged unit); at every image's full budget the tower runs whole.
``L = depth - 1`` picks what reducing after the tower picks. With ``tower_graphs="auto"`` the two parts and the
merger at ``L`` replay as CUDA graphs: at batch 1 the compiled blocks' host launches, not their work, set the
tower's time (docs/generation.md).

Scoring on a narrow view (``score_width=d``). arrcoc's tokens are single merged units, so the relevance head
only scores and chooses cells; it does not need the language model's full width (3,584 for Qwen2.5-VL-7B) to do
so. With ``score_width`` the head reads the merged tokens and the question's query vectors through one fixed,
seeded projection to ``d`` dimensions (:func:`score_projection`: ``d`` orthonormal directions scaled by
``sqrt(D / d)``, so lengths, dot products and cosines are preserved in expectation, with errors of about
``1 / sqrt(d)``), and the tokens the language model reads are gathered afterwards from the full-width features
at the chosen cells, exactly. The query is the full-width mixture of the question's tokens projected, not one
recomputed from narrow cosines. ``"auto"`` narrows only images asked a question (the query-free pick follows
the projection's noise further). Scores, and so the chosen cells, are approximations of the full-width head's;
the tokens, their positions and their count are exact, and at every image's full budget (every cell chosen) the
logits equal the unmodified model's as before.

Covered: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images; videos are not reduced). Qwen3-VL's DeepStack (features of
early vision layers added to the first language-model layers at the image positions) follows the reduction:
a kept token reads its own cell's features, a token pooling a box their mean over the box (exact for
arrcoc's and ``uniform``'s boxes; for ``tome``, whose merges are not boxes, the mean over the merge's bounding
box). Not covered: reducers needing a vision ``[CLS]`` (``visionzip``: Qwen's tower has none) or early-layer
text attention (``fastv``).

Importing this module does not import transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PipelineConfig
from ..errors import BudgetError, InvalidInputError, InvalidTypeError
from ..reducers import ArrcocReducer, ReducedTokens, VisualInput, check_visual, create_reducer
from ..runtime.graphs import GraphChain
from ..stages.regions import capacity_of
from ..stages.texture import TEXTURE_CHANNELS
from .adapter import REDUCER_OUTPUTS, check_prompting, expand_prompt, processor_parts, reducer_chain
from .decode import GraphedDecoder
from .hf import raster_order
from .vision_tower import (
    TowerPlan,
    TowerState,
    _compiled,
    default_prune_after,
    tower_head,
    tower_merged,
    tower_plan,
    tower_tail,
)

__all__ = [
    "ArrcocQwen",
    "QwenPrepared",
    "QWEN_TEMPLATE",
    "QWEN_MODEL_TYPES",
    "SCORE_WIDTH",
    "graph_buckets",
    "kept_units",
    "merged_grid",
    "score_projection",
]

logger = logging.getLogger(__name__)

#: ``config.model_type`` of the models this adapter serves.
QWEN_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})

#: Qwen's chat template for one image and one question; ``{image}`` becomes the image pad token.
QWEN_TEMPLATE = "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"

#: Query tokens are padded (mask False) up to a multiple of this, so question lengths share graphs.
_QUERY_MULTIPLE = 16

#: Pruned-tower plans an adapter keeps (:meth:`ArrcocQwen.plan`).
_PLANS = 16

#: The relevance head's width under ``score_width="auto"`` (arrcoc's reducers on a wider language model): cosine
#: errors of about 1/16, and at Qwen2.5-VL-7B's 3,584 a fourteenth of the head's work on every cell.
SCORE_WIDTH = 256


@dataclass
class QwenPrepared:
    """Everything the language model reads for one batch, and what the reducer chose.

    Attributes:
        inputs_embeds: ``(B, T, H)`` prompt embeddings, left padded, ``budgets[i]`` image slots in row ``i``.
        attention_mask: ``(B, T)`` int64, 0 on left padding.
        position_ids: ``(3, B, T)`` int64 multimodal rotary positions (time, row, column); 0 on padding.
        input_ids: ``(B, T)`` the token ids behind ``inputs_embeds`` (image slots hold the image token id).
        reduced: per image, the reducer's output in raster order (tokens ``(1, K_i, H)``, boxes ``(1, K_i, 4)``
            on the merged grid).
        query_mask: ``(B, T)`` bool, the prompt tokens the participatory scorer read.
        image_tokens: per image ``(K_i, H)``, the tokens written into its slots.
        grids: per image ``(gh, gw)``, its merged grid.
        budgets: per image, the tokens kept.
        deepstack: Qwen3-VL only: per DeepStack layer ``(sum K_i, H)``, the kept tokens' features from that
            vision layer, in slot order (``None`` for Qwen2-VL and Qwen2.5-VL).
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    input_ids: Tensor
    reduced: list[ReducedTokens]
    query_mask: Tensor
    image_tokens: list[Tensor]
    grids: list[tuple[int, int]]
    budgets: list[int]
    deepstack: list[Tensor] | None = None


@dataclass
class _Group:
    """Images that share one reducer graph key, and what the reducer reads from the host."""

    bucket: tuple[int, int]  # the merged grid the images are padded to
    length: int  # query slots
    budget: int | None  # the key's budget (baselines); None: per-image budgets as a tensor (arrcoc's reducers)
    members: list[int]  # image indices in the batch
    budgets: Tensor | None  # (n,) int64, arrcoc's reducers
    where: Tensor | None  # (n, length) int64, each question token's index in its prompt row; None: no query read
    rows: Tensor | None  # (n,) int64 the members' prompt rows (with ``where``)
    query_mask: Tensor | None  # (n, length) bool, True on question tokens (with ``where``)
    valid: Tensor  # (n, bh, bw) float32, 1 on each member's own merged grid, 0 on the bucket's padding


#: The tensors of a :class:`_Group` made on the host, sent to the device with the prompts.
_GROUP_TENSORS = ("budgets", "where", "rows", "query_mask", "valid")


def merged_grid(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 16384,
) -> tuple[int, int]:
    """``(gh, gw)`` merged tokens of a ``height x width`` image under Qwen's resize (``smart_resize``).

    The same arithmetic as transformers' ``smart_resize`` (sides rounded to multiples of ``patch_size *
    merge_size``, the area clamped to ``[min_pixels, max_pixels]``), so it runs without transformers.
    """
    factor = patch_size * merge_size
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h // factor, w // factor


def score_projection(width: int, narrow: int, seed: int = 0) -> Tensor:
    """``(width, narrow)`` float32: ``narrow`` orthonormal directions of a seeded Gaussian draw (a QR on the CPU, so
    the same on every device), scaled by ``sqrt(width / narrow)`` so that ``x @ P`` keeps ``x``'s length, and dot
    products and cosines between rows, in expectation (Johnson-Lindenstrauss; errors of about ``1 / sqrt(narrow)``).
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, narrow, generator=gen, dtype=torch.float64))  # (width, narrow)
    return (basis * math.sqrt(width / narrow)).float()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def graph_buckets(grids: Iterable[tuple[int, int]], multiple: int) -> set[tuple[int, int]]:
    """The distinct graph grids (sides rounded up to ``multiple``) a corpus of merged ``grids`` needs."""
    return {(_round_up(gh, multiple), _round_up(gw, multiple)) for gh, gw in grids}


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the inner ``Qwen*VLModel``, its language model); refuses anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    inner = getattr(model, "model", None)
    if model_type not in QWEN_MODEL_TYPES or inner is None or not hasattr(inner, "visual"):
        raise InvalidTypeError(
            f"model must be a Qwen2-VL, Qwen2.5-VL or Qwen3-VL ...ForConditionalGeneration (model_type in "
            f"{sorted(QWEN_MODEL_TYPES)}); got {type(model).__name__} ({model_type!r})"
        )
    return inner, inner.language_model


def _graph_backend(setting: str, tensor: Tensor) -> str | None:
    """A ``reducer_graphs`` / ``tower_graphs`` setting's backend for a call on ``tensor``'s device: ``"cuda"``,
    ``"eager"``, or ``None`` (called directly)."""
    return {"auto": "cuda" if tensor.is_cuda else None, "eager": "eager", "off": None}[setting]


class ArrcocQwen(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model that reads ``budget`` arrcoc (or baseline) tokens per image.

    The query the participatory scorer reads comes from the prompt's question, as in
    :class:`arrcoc.integrations.hf.ArrcocLlava`: each question token's embedding ``t`` is compared (cosine) with
    the image's merged tokens ``f_p`` (already in the language model's space: Qwen's merger is its projector),
    and stands as the token mixture it points to, ``q = sum_p softmax_p(cos(t, f_p) / tau) f_p``, so the query
    lies among the visual tokens the scorer compares it with.

    Args:
        model: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration``.
        processor_or_tokenizer: a Qwen processor (images may then be PIL images, arrays or uint8 tensors), or a
            tokenizer alone (images must then be a mapping with the image processor's ``pixel_values`` and
            ``image_grid_thw``).
        method: a registered reducer name (``arrcoc.reducers.list_reducers()``).
        budget: the default budget of every call: an ``int`` is an exact count of tokens per image, a ``float`` in
            ``(0, 1]`` a share of each image's merged tokens (rounded, at least 1); ``None``: every token.
        config: the reducer's config (arrcoc's default when omitted).
        template: used when a prompt holds no image placeholder; ``{image}`` and ``{question}`` are filled in,
            and only the question's tokens form the query.
        query_temperature: ``tau`` of the query softmax.
        grid_multiple: graph buckets round each merged grid side up to this multiple.
        reducer_graphs: ``"auto"`` replays the reducer as a CUDA graph on CUDA and calls it directly elsewhere;
            ``"eager"`` uses the graph chain's eager backend (the same host-side path, for tests); ``"off"``
            always calls the reducer directly.
        prune_after: reduce inside the vision tower (module docstring, *Pruning inside the tower*): the index of
            the last block that runs on every patch, ``"auto"`` for
            :func:`~arrcoc.integrations.vision_tower.default_prune_after`, or ``None`` (the default) to reduce
            the tower's output. arrcoc's reducers only (each of their tokens is one merged unit).
        score_width: the width ``d`` the relevance head scores at (module docstring, *Scoring on a narrow view*):
            the merged tokens and the query go through :func:`score_projection` to ``d`` dimensions for scoring
            and choosing, and the kept tokens are gathered at full width from the chosen cells. Scores (so the
            chosen cells) become approximate; tokens, positions and counts stay exact. ``None``: the full width;
            ``"auto"`` (the default): :data:`SCORE_WIDTH` for arrcoc's reducers on a wider language model, for
            batches whose every image has a question (without one, the query-free pick scores at full width:
            it follows the projection's noise further), else ``None``; a number: that width for every image.
            arrcoc's reducers only (a baseline's pooled tokens cannot be gathered from cells).
        compile_reducer: ``torch.compile`` the reducer (``dynamic=False``) before its CUDA graph is captured:
            fewer, fused kernels in each replay, so less of arrcoc's own time, for a compile of some seconds on the
            first call of each graph key. With ``reducer_graphs="off"`` the compiled reducer is called directly.
        tower_graphs: with ``prune_after``, replay the pruned tower as CUDA graphs: its blocks up to the pruning
            block and the merger on their states (a graph each per batch of grids), and the blocks after it on the
            kept units (one per grids and budgets). At batch 1 the host's launches, about 0.7 ms a compiled
            block on the H100 (``bench/results/qwen-host-nvidia-h100-80gb-hbm3.md``), not the GPU's work, set the
            tower's time; a replay issues them at once. ``"auto"``: on CUDA;
            ``"eager"``: the graph chain's eager backend (for tests); ``"off"`` (the default): called directly.
    """

    def __init__(
        self,
        model: nn.Module,
        processor_or_tokenizer: Any,
        *,
        method: str = "arrcoc",
        budget: int | float | None = None,
        config: PipelineConfig | None = None,
        template: str = QWEN_TEMPLATE,
        query_temperature: float = 0.1,
        grid_multiple: int = 8,
        reducer_graphs: str = "auto",
        prune_after: int | str | None = None,
        score_width: int | str | None = "auto",
        compile_reducer: bool = False,
        tower_graphs: str = "off",
    ) -> None:
        super().__init__()
        self.model = model
        self.inner, self.language_model = _parts(model)
        self.deepstack = model.config.model_type == "qwen3_vl"
        self.tokenizer, self.image_processor = processor_parts(processor_or_tokenizer)
        check_prompting(template, query_temperature)
        if isinstance(grid_multiple, bool) or not isinstance(grid_multiple, int) or grid_multiple < 1:
            raise InvalidInputError(f"grid_multiple must be a whole number >= 1; got {grid_multiple!r}")
        for name, graphs in (("reducer_graphs", reducer_graphs), ("tower_graphs", tower_graphs)):
            if graphs not in ("auto", "eager", "off"):
                raise InvalidInputError(f"{name} must be 'auto', 'eager' or 'off'; got {graphs!r}")
        cfg, vision = model.config, model.config.vision_config
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.patch_size = int(vision.patch_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        # The texture terms are read per token: one patch's pixels per merged token (14 px on 28 px tokens), as
        # LLaVA's towers give the reducer per patch; full resolution would quadruple their cost for the same map.
        self.texture_cell = self.patch_size
        self.template = template
        self.query_temperature = float(query_temperature)
        self.grid_multiple = grid_multiple
        self.reducer_graphs = reducer_graphs
        self.tower_graphs = tower_graphs
        if not isinstance(compile_reducer, bool):
            raise InvalidTypeError(f"compile_reducer must be True or False; got {compile_reducer!r}")
        self.compile_reducer = compile_reducer
        self.method = method
        self.reducer = create_reducer(method, config=config)
        if isinstance(self.reducer, nn.Module):  # its constant buffers go with the model
            self.reducer.to(next(model.parameters()).device)
        self.needs = frozenset(getattr(self.reducer, "needs", frozenset()))
        missing = self.needs & {"cls_attention", "text_attention"}
        if missing:
            raise InvalidInputError(
                f"the {method!r} reducer needs {sorted(missing)}, which the Qwen-VL adapter does not "
                "provide (Qwen's vision tower has no [CLS]; early-layer text attention is not wired)"
            )
        # Decided once: reducers that rank padding last may read a padded (bucketed) grid; the others pool it.
        self.pads = "patch_valid" in self.needs
        # arrcoc's own reducers take per-image budgets as a tensor (one graph per bucket for every budget)
        self.budget_tensor = isinstance(self.reducer, ArrcocReducer)
        self.default_budget = budget
        self.prune_after = self._check_prune_after(prune_after, vision)
        if tower_graphs != "off" and self.prune_after is None:
            raise InvalidInputError("tower_graphs replays the pruned tower's parts: it needs prune_after")
        on = {"dtype": torch.float32, "device": next(model.parameters()).device}
        width = int(model.get_input_embeddings().weight.shape[1])
        self.score_width = self._check_score_width(score_width, width)
        # "auto" narrows only images asked a question: the query-free pick, a greedy max-min over cosines, follows
        # the projection's noise further (docs/generation.md); a width given as a number narrows every image
        self._narrow_unasked = score_width != "auto"
        projection = None if self.score_width is None else score_projection(width, self.score_width).to(on["device"])
        self.register_buffer("_score_projection", projection, persistent=False)  # (H, d) or None
        proc = self.image_processor
        mean, std = (getattr(proc, "image_mean", None), getattr(proc, "image_std", None)) if proc else (None, None)
        if proc is not None and not getattr(proc, "do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if mean is None:  # Qwen's processors normalise with CLIP's statistics
            mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        # on the model's device from the start: moving them per call would copy from the host after the tower
        self.register_buffer("_mean", torch.tensor(mean, **on).view(3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, **on).view(3, 1, 1), persistent=False)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.special_ids = frozenset(int(i) for i in getattr(self.tokenizer, "all_special_ids", []))
        self._chains: dict[tuple, Any] = {}
        self._tower_chains: dict[tuple, GraphChain] = {}
        self._plans: dict[tuple, TowerPlan] = {}
        self._pool: Any = None
        self._decoder: GraphedDecoder | None = None
        # transformers >= 5 marks image tokens by type for its own rope index; earlier versions have no such input
        self._mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters

    def _check_prune_after(self, prune_after: int | str | None, vision: Any) -> int | None:
        """The block index to prune after (``None``: no pruning), checked against the tower and the reducer."""
        if prune_after is None:
            return None
        depth = len(self.inner.visual.blocks)
        if prune_after == "auto":
            prune_after = default_prune_after(vision)
        if isinstance(prune_after, bool) or not isinstance(prune_after, int) or not 0 <= prune_after < depth:
            raise InvalidInputError(
                f"prune_after must be a vision block index in [0, {depth - 1}] (the tower has {depth} blocks), "
                f"'auto' or None; got {prune_after!r}"
            )
        if not self.budget_tensor:
            raise InvalidInputError(
                f"prune_after needs one of arrcoc's reducers, whose every token is one merged unit; the "
                f"{self.method!r} reducer's tokens are not"
            )
        return prune_after

    def _check_score_width(self, score_width: int | str | None, width: int) -> int | None:
        """The head's width (``None``: the language model's own ``width``), checked against the reducer."""
        if score_width == "auto":
            return SCORE_WIDTH if self.budget_tensor and width > SCORE_WIDTH else None
        if score_width is None:
            return None
        if isinstance(score_width, bool) or not isinstance(score_width, int) or score_width < 1:
            raise InvalidInputError(f"score_width must be a whole number >= 1, 'auto' or None; got {score_width!r}")
        if not self.budget_tensor:
            raise InvalidInputError(
                f"score_width needs one of arrcoc's reducers, whose every token is one merged unit gathered at full "
                f"width; the {self.method!r} reducer's tokens are not (use score_width=None)"
            )
        return score_width if score_width < width else None  # as wide as the model: nothing to narrow

    @property
    def captures(self) -> int:
        """Reducer graphs captured so far (one per graph key)."""
        return sum(1 for c in self._chains.values() if isinstance(c, GraphChain))

    # --- images -> merged grids ------------------------------------------------------------------------
    def image_inputs(self, images: Any) -> tuple[Tensor, Tensor]:
        """``(pixel_values, image_grid_thw)``: a mapping holding both passes through, anything else goes to the
        image processor (one image per prompt)."""
        if hasattr(images, "keys") and "pixel_values" in images and "image_grid_thw" in images:
            return images["pixel_values"], images["image_grid_thw"]
        if self.image_processor is None:
            raise InvalidTypeError(
                "images must be a mapping with 'pixel_values' and 'image_grid_thw' when the adapter "
                f"was given a tokenizer, not a processor; got {type(images).__name__}"
            )
        if isinstance(images, Tensor) and images.ndim == 3:
            images = [images]
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def merged_features(self, pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """The model's own merged visual tokens, per image ``(gh, gw, H)`` in raster order."""
        return self._image_features(pixel_values, grid_thw, self.merged_grids(grid_thw))[0]

    def _image_features(
        self, pixel_values: Tensor, grid_thw: Tensor, grids: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """Merged tokens per image ``(gh, gw, H)``, and for Qwen3-VL its DeepStack features per image
        ``(L, gh, gw, H)``.

        The tower is called directly, not through the model's ``get_image_features``: that reads the images' sizes
        back from ``grid_thw`` on the device after queueing the tower, a host sync that would hold every later
        launch (the reducer, the language model) until the tower ends. Here the sizes are known on the host.
        """
        visual = self.inner.visual
        merged, layers = _tower_outputs(visual(pixel_values.type(visual.dtype), grid_thw=grid_thw))
        sizes = [gh * gw for gh, gw in grids]
        features = [e.unflatten(0, grid) for e, grid in zip(torch.split(merged, sizes), grids)]
        if layers is None or not self.deepstack:
            return features, None
        layers = [torch.split(x, sizes) for x in layers]  # per layer, per image (n_i, H)
        deep = [torch.stack([layer[i] for layer in layers]).unflatten(1, grid) for i, grid in enumerate(grids)]
        return features, deep

    def merged_grids(self, grid_thw: Tensor) -> list[tuple[int, int]]:
        rows = grid_thw.tolist()  # ok-sync: a host-side input of the processor
        if any(t != 1 for t, _, _ in rows):
            raise InvalidInputError(f"each image must be one frame (grid t = 1); got image_grid_thw {rows}")
        m = self.merge_size
        return [(h // m, w // m) for _, h, w in rows]

    def _rgb(self, pixel_values: Tensor, grids: list[tuple[int, int]]) -> list[Tensor]:
        """Per image ``(3, gh * p, gw * p)`` RGB in [0, 1] (one patch's pixels per merged token, each the mean of
        its ``m x m`` source pixels), undoing the processor's patch layout. Consecutive images of one grid (a
        batch of one size) are undone together, one chain of kernels for the run."""
        m, p, tp = self.merge_size, self.patch_size, self.temporal_patch_size
        out, start, i = [], 0, 0
        while i < len(grids):
            gh, gw = grids[i]
            run = next((j for j in range(i, len(grids)) if grids[j] != grids[i]), len(grids)) - i
            n = gh * gw * m * m * run
            patches = pixel_values[start : start + n].view(run, gh, gw, m, m, 3, tp, p, p)[..., 0, :, :]
            start, i = start + n, i + run
            image = patches.float().permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(run, 3, gh * m * p, gw * m * p)
            if m > 1:
                image = F.avg_pool2d(image, m)  # (run, 3, gh * p, gw * p)
            out.extend((image * self._std + self._mean).clamp_(0, 1).unbind(0))
        return out

    # --- prompts -> ids ---------------------------------------------------------------------------------
    def _tokenize(self, prompt: str, slots: int) -> tuple[list[int], list[bool], int]:
        """Ids with the image placeholder expanded to ``slots`` copies, the query flags, and the placeholder's
        index."""
        return expand_prompt(
            prompt,
            slots,
            tokenizer=self.tokenizer,
            template=self.template,
            image_token=self.image_token,
            image_token_id=self.image_token_id,
            special_ids=self.special_ids,
        )

    # --- budgets ----------------------------------------------------------------------------------------
    def budgets(self, budget: int | float | None, grids: Sequence[tuple[int, int]]) -> list[int]:
        """Tokens kept per image: an ``int`` exactly, a ``float`` share of each image's merged tokens."""
        budget = self.default_budget if budget is None else budget
        sizes = [gh * gw for gh, gw in grids]
        if budget is None:
            return sizes
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise BudgetError(f"budget must be a whole number of tokens or a share in (0, 1]; got {budget!r}")
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise BudgetError(f"a budget share must lie in (0, 1]; got {budget}")
            return [max(1, min(n, round(budget * n))) for n in sizes]
        short = [(i, n) for i, n in enumerate(sizes) if not 1 <= budget <= n]
        if short:
            i, n = short[0]
            raise BudgetError(
                f"budget must be between 1 and each image's merged tokens; image {i} has {n} "
                f"({grids[i][0]}x{grids[i][1]}), got {budget}"
            )
        return [budget] * len(sizes)

    # --- the adapter ------------------------------------------------------------------------------------
    def prepare(self, images: Any, prompts: str | Sequence[str], budget: int | float | None = None) -> QwenPrepared:
        """Build the language model's input: prompts with each image's reduced tokens and their positions.

        Args:
            images: one image per prompt (PIL images, arrays or uint8 tensors with a processor), or a mapping with
                ``pixel_values`` and ``image_grid_thw`` as the image processor makes them.
            prompts: strings; a prompt with the image placeholder is used verbatim, one without it is put into
                the template.
            budget: as in the class (``None``: the adapter's default).
        """
        return self._prepare(images, prompts, budget, reduce=True)

    def unreduced(self, images: Any, prompts: str | Sequence[str]) -> QwenPrepared:
        """The unmodified model's input built the adapter's way, no reducer run: every merged token in its slot at
        its own position (what :meth:`prepare` gives at the full budget, without its relevance maps). The
        every-token baseline of :meth:`generate_prepared` and the benchmark."""
        return self._prepare(images, prompts, 1.0, reduce=False)

    def _prepare(
        self, images: Any, prompts: str | Sequence[str], budget: int | float | None, reduce: bool
    ) -> QwenPrepared:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.model.get_input_embeddings().weight.device
        pixel_values, grid_thw = self.image_inputs(images)
        grids = self.merged_grids(grid_thw)
        if len(grids) != len(prompts):
            raise InvalidInputError(
                f"images and prompts must pair up one to one; got {len(grids)} images and {len(prompts)} prompts"
            )
        budgets = self.budgets(budget, grids)
        pixel_values, grid_thw = pixel_values.to(device), grid_thw.to(device)
        # The tower goes first: the host work below (the prompts' ids, masks, the groups' index tensors) then
        # overlaps it, and what the host sends the device travels from pinned memory without waiting for the tower.
        # At every image's full budget nothing would be pruned: the tower runs whole, as without pruning.
        prune = self.prune_after is not None and any(k < gh * gw for k, (gh, gw) in zip(budgets, grids))
        plan = self.plan(grids, budgets, device) if prune else None
        if plan is not None:  # the head scores the pruning block's states, through the model's own merger
            features, state = self._tower_front(pixel_values, plan)  # per image (gh, gw, H)
            deep = None
        else:
            features, deep = self._image_features(pixel_values, grid_thw, grids)  # (gh, gw, H), (L, gh, gw, H)
        rows = [self._tokenize(p, k) for p, k in zip(prompts, budgets)]
        questions = [[j for j, q in enumerate(r[1]) if q] for r in rows]
        length = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        query_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row, q, _) in enumerate(rows):  # left padding
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
            query_mask[i, length - len(row) :] = torch.tensor(q)
        pads = [length - len(r[0]) for r in rows]
        slots = _image_slots(rows, pads, length, budgets)  # (sum K,) each kept token's place in (B, T)
        position_ids, offset = self._text_positions(rows, length, budgets, grids)
        groups = self._groups(grids, questions, pads, budgets) if reduce else []
        # everything the host made goes to the device in one copy; the groups' tensors are replaced by theirs
        fields = [(g, f) for g in groups for f in _GROUP_TENSORS if getattr(g, f) is not None]
        sent = _sent_all(
            [ids, mask, query_mask, slots, position_ids, offset, *(getattr(g, f) for g, f in fields)], device
        )
        ids, mask, query_mask, slots, position_ids, offset = sent[:6]
        for (group, field), tensor in zip(fields, sent[6:]):
            setattr(group, field, tensor)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, H)
        if reduce:
            rgb = self._rgb(pixel_values, grids) if "pixels" in self.needs else [None] * len(grids)
            # with pruning the tail makes the kept tokens: the head's own are not gathered
            reduced = self._reduce_all(groups, features, rgb, embeds, questions, budgets, gather=plan is None)
        else:
            reduced = [_every_cell(f) for f in features]
        deepstack = None
        if plan is not None:
            reduced, deepstack = self._tower_tail(state, plan, reduced, grids)
        image_tokens = [r.tokens[0] for r in reduced]  # (K_i, H) each, K_i = budgets[i]
        embeds.view(-1, embeds.shape[-1])[slots] = torch.cat(image_tokens).to(embeds.dtype)  # the image slots
        boxes = torch.cat([out.positions[0] for out in reduced])  # (sum K, 4) row, col, height, width, merged grid
        centre = offset[:, None] + boxes[:, :2] + (boxes[:, 2:] - 1) // 2  # (sum K, 2) a pooled area: its centre cell
        position_ids[1:].flatten(1)[:, slots] = centre.t().to(position_ids.dtype)  # the kept tokens' rows, columns
        if deep is not None:  # the kept tokens' DeepStack features, layer by layer, in slot order
            kept = [_box_means(d, r.positions[0]) for d, r in zip(deep, reduced)]  # (L, K_i, H) each
            deepstack = list(torch.cat(kept, 1).unbind(0))
        return QwenPrepared(
            embeds, mask, position_ids, ids, reduced, query_mask, image_tokens, grids, budgets, deepstack
        )

    def plan(self, grids: list[tuple[int, int]], budgets: list[int], device: Any) -> TowerPlan:
        """The pruned tower's :func:`~arrcoc.integrations.vision_tower.tower_plan`, kept for the last
        ``_PLANS`` (grids, budgets, device, compiled) keys: its host work (transformers' index helpers, about
        1 ms at batch 1 and 7 ms at batch 8 on one CPU core) comes before the tower's first launch, and a served
        stream of one image size asks for the same plan again. The plan's tensors are only read."""
        key = (tuple(grids), tuple(budgets), str(device), _compiled(self.inner.visual))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLANS:
                del self._plans[next(iter(self._plans))]  # the oldest
            plan = self._plans[key] = tower_plan(self.inner.visual, grids, budgets, device)
        return plan

    def _tower_tail(
        self, state: Any, plan: Any, reduced: list[ReducedTokens], grids: list[tuple[int, int]]
    ) -> tuple[list[ReducedTokens], list[Tensor] | None]:
        """The tower's blocks after the pruning block on the kept units only: their merged tokens replace the
        tokens the head picked (the pruning block's), and for Qwen3-VL give the DeepStack features in slot order."""
        budgets = tuple(out.tokens.shape[1] for out in reduced)
        tokens, deep = self.tower_tail_graphed(state, plan, kept_units(reduced, grids), budgets)  # (sum K_i, H)
        parts = torch.split(tokens, budgets)
        return [dataclasses.replace(out, tokens=t[None]) for out, t in zip(reduced, parts)], deep

    def _tower_backend(self, tensor: Tensor) -> str | None:
        """The tower graphs' backend for a call on ``tensor``'s device (``None``: call the parts directly)."""
        return _graph_backend(self.tower_graphs, tensor)

    def _graph_pool(self, backend: str) -> Any:
        """The memory pool every CUDA graph of this adapter shares (made on the first capture); ``None`` for the
        eager backend."""
        if backend == "cuda" and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool if backend == "cuda" else None

    def _tower_replay(self, key: tuple, fn: Any, inputs: dict[str, Tensor], outputs: Sequence[str]) -> Any:
        """``fn(inputs)``'s ``outputs`` from the tower graph of ``key`` (captured on its first call, with the plan
        ``fn`` holds), the results copied out of the graph's buffer: they outlive the next replay."""
        backend = self._tower_backend(next(iter(inputs.values())))
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        key = (*key, backend, _compiled(self.inner.visual), shapes)  # a graph replays the kernels it captured
        chain = self._tower_chains.get(key)
        if chain is None:
            pool, name = self._graph_pool(backend), f"vision tower {key[0]}"
            chain = self._tower_chains[key] = GraphChain(
                [(key[0], fn)], inputs, pool, outputs=outputs, backend=backend, name=name
            )
        return chain.run(inputs, rows=None)  # whole tensors: the inputs' and results' first sizes differ

    def _tower_front(self, pixel_values: Tensor, plan: TowerPlan) -> tuple[list[Tensor], TowerState]:
        """The tower's blocks up to ``prune_after`` on every patch (:meth:`tower_head_graphed` with
        ``tower_graphs``), and the model's merger on their states: per image ``(gh, gw, H)`` merged units, and the
        state :func:`tower_tail` continues from."""
        visual = self.inner.visual
        state = self.tower_head_graphed(pixel_values, plan)
        if self._tower_backend(pixel_values) is None:
            return tower_merged(visual, state, plan), state

        def merged(inputs: dict[str, Tensor]) -> dict[str, Any]:  # the merger reads the hidden states alone
            rebuilt = TowerState(inputs["hidden"], state.position_embeddings, state.stop, {})
            return {"merged": dict(enumerate(tower_merged(visual, rebuilt, plan)))}

        out = self._tower_replay(("merged", tuple(plan.grids)), merged, {"hidden": state.hidden}, ("merged",))
        return [out["merged"][str(i)] for i in range(len(plan.grids))], state

    def tower_head_graphed(self, pixel_values: Tensor, plan: TowerPlan) -> TowerState:
        """:func:`tower_head` to ``prune_after``, replayed as a graph keyed on the grids (called directly where
        ``tower_graphs`` gives no backend)."""
        visual, stop = self.inner.visual, self.prune_after
        if self._tower_backend(pixel_values) is None:
            return tower_head(visual, pixel_values, plan, stop)

        def head(inputs: dict[str, Tensor]) -> dict[str, Any]:
            state = tower_head(visual, inputs["pixels"], plan, stop)
            cos, sin = state.position_embeddings
            return {"hidden": state.hidden, "cos": cos, "sin": sin, "deep": {str(k): v for k, v in state.deep.items()}}

        outputs = ("hidden", "cos", "sin", "deep")
        out = self._tower_replay(("head", tuple(plan.grids)), head, {"pixels": pixel_values}, outputs)
        deep = {int(k): v for k, v in out["deep"].items()} if "deep" in out else {}
        return TowerState(out["hidden"], (out["cos"], out["sin"]), stop, deep)

    def tower_tail_graphed(
        self, state: TowerState, plan: TowerPlan, units: Tensor, budgets: tuple[int, ...]
    ) -> tuple[Tensor, list[Tensor] | None]:
        """:func:`tower_tail` replayed as a graph keyed on the grids and ``budgets`` (the plan's kept lengths;
        called directly where ``tower_graphs`` gives no backend)."""
        visual, stop = self.inner.visual, state.stop
        if self._tower_backend(units) is None:
            return tower_tail(visual, state, plan, units)

        def tail(inputs: dict[str, Tensor]) -> dict[str, Any]:
            deep = {int(name[5:]): v for name, v in inputs.items() if name.startswith("deep.")}
            rebuilt = TowerState(inputs["hidden"], (inputs["cos"], inputs["sin"]), stop, deep)
            tokens, layers = tower_tail(visual, rebuilt, plan, inputs["units"])
            return {"tokens": tokens, "deep": dict(enumerate(layers or []))}

        cos, sin = state.position_embeddings
        inputs = {"units": units, "hidden": state.hidden, "cos": cos, "sin": sin}
        inputs.update({f"deep.{k}": v for k, v in state.deep.items()})
        out = self._tower_replay(("tail", tuple(plan.grids), budgets), tail, inputs, ("tokens", "deep"))
        layers = out["deep"] if "deep" in out else {}
        return out["tokens"], [layers[str(i)] for i in range(len(layers))] if layers else None

    def reference_inputs(self, images: Any, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        """The unmodified model's own inputs for the same prompts with every merged token (``model(**inputs)``,
        ``model.generate(**inputs)``): the baseline the adapter is compared with."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.model.get_input_embeddings().weight.device
        pixel_values, grid_thw = self.image_inputs(images)
        rows = [self._tokenize(p, gh * gw)[0] for p, (gh, gw) in zip(prompts, self.merged_grids(grid_thw))]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as prepare
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
        inputs = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "pixel_values": pixel_values.to(device),
            "image_grid_thw": grid_thw.to(device),
        }
        if self._mm_types:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return inputs

    def _text_positions(
        self,
        rows: list[tuple[list[int], list[bool], int]],
        length: int,
        budgets: list[int],
        grids: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        """``(3, B, T)`` positions made on the host: text 1-D, the text after the image from the full image's
        ``max(gh, gw)`` on (see the module docstring), each kept token's time; and ``(sum K,)`` each kept token's
        image start, to which the device adds the token's own row and column once the reducer has chosen it."""
        positions = torch.zeros(3, len(rows), length, dtype=torch.long)
        offsets = []  # per kept token: its image's first position
        for i, ((row, _, start), k, (gh, gw)) in enumerate(zip(rows, budgets, grids)):
            pad = length - len(row)
            positions[:, i, pad : pad + start] = torch.arange(start)
            positions[0, i, pad + start : pad + start + k] = start
            after = len(row) - start - k
            positions[:, i, length - after :] = start + max(gh, gw) + torch.arange(after)
            offsets.append(torch.full((k,), start))
        return positions, torch.cat(offsets)

    def _query(self, grid: Tensor, valid: Tensor, text: Tensor, values: Tensor | None = None) -> Tensor:
        """``(n, L, ·)`` float32 question tokens ``text`` ``(n, L, H)`` as mixtures of each image's merged tokens
        ``grid`` ``(n, gh, gw, H)`` (``valid`` ``(n, gh, gw)`` 1 on the image's own cells; the others get no
        weight). The mixture weights come from full-width cosines; ``values`` ``(n, gh, gw, d)`` (the narrow view
        of ``grid``) are mixed instead of ``grid`` where given, the same query projected, since mixing is linear.
        The cosines read ``grid`` in its own dtype (no float32 copy of the full-width grid): a product of unit
        question vectors with the tokens, divided by the tokens' float32 norms."""
        tokens = grid.flatten(1, 2)  # (n, N, H)
        norms = torch.linalg.vector_norm(tokens, dim=-1, dtype=torch.float32).clamp_min(1e-12)  # (n, N)
        unit = F.normalize(text.float(), dim=-1).to(tokens.dtype)
        cosine = (unit @ tokens.transpose(1, 2)).float() / norms[:, None]  # (n, L, N)
        cosine = cosine.masked_fill(valid.flatten(1)[:, None] == 0, float("-inf"))
        mixed = tokens if values is None else values.flatten(1, 2)
        return torch.softmax(cosine / self.query_temperature, dim=-1) @ mixed.float()  # (n, L, H or d)

    def _groups(
        self, grids: list[tuple[int, int]], questions: list[list[int]], pads: list[int], budgets: list[int]
    ) -> list[_Group]:
        """Images sharing a reducer graph key, with the per-image budgets, question indices and validity maps made
        on the host (:meth:`_prepare` sends them with the prompts, in one copy)."""
        keyed: dict[tuple, list[int]] = {}
        for i, ((gh, gw), k) in enumerate(zip(grids, budgets)):
            grid = (_round_up(gh, self.grid_multiple), _round_up(gw, self.grid_multiple)) if self.pads else (gh, gw)
            length = _round_up(max(1, len(questions[i])), _QUERY_MULTIPLE)
            keyed.setdefault((grid, length, None if self.budget_tensor else k), []).append(i)
        groups = []
        for (bucket, length, k), members in keyed.items():
            where = rows = query_mask = None
            if self.needs & {"query", "query_mask"}:
                where = torch.zeros(len(members), length, dtype=torch.long)  # (n, L) past each row's left padding
                query_mask = torch.zeros(len(members), length, dtype=torch.bool)
                for j, i in enumerate(members):
                    where[j, : len(questions[i])] = torch.tensor(questions[i], dtype=torch.long) + pads[i]
                    query_mask[j, : len(questions[i])] = True
                rows = torch.tensor(members)
            valid = torch.zeros(len(members), *bucket)  # which cells are image depends on the sizes alone
            for j, i in enumerate(members):
                valid[j, : grids[i][0], : grids[i][1]] = 1
            tensor = torch.tensor([budgets[i] for i in members]) if self.budget_tensor else None
            groups.append(_Group(bucket, length, k, members, tensor, where, rows, query_mask, valid))
        return groups

    def _reduce_all(
        self,
        groups: list[_Group],
        features: list[Tensor],
        rgb: list[Tensor | None],
        embeds: Tensor,
        questions: list[list[int]],
        budgets: list[int],
        gather: bool = True,
    ) -> list[ReducedTokens]:
        """Reduce each image at its own grid; images sharing a graph key run as one batch.

        Each group's whole reduction after its padded inputs (the query mixture, the narrow view, the reducer, the
        raster order and the full-width gather) is one function of tensors (:meth:`_group_step`), so one CUDA graph
        replays it: at batch 1 the launches around the reducer, not its work, set arrcoc's own time. arrcoc's
        reducers take the budgets as a tensor (the relevance head allocates per image into a packed capacity of the
        bucket's cells), so one graph serves every budget of a bucket; the other reducers fix their output shape by
        the budget, which joins their key. With ``score_width`` the head's tokens are narrow: ``gather`` replaces
        them with the full-width features at the chosen cells (``False`` leaves them, for a caller that makes the
        tokens itself).
        """
        results: list[ReducedTokens | None] = [None] * len(features)
        for group in groups:
            members = group.members
            # the query-free pick runs only for images without a question: none when every image has one
            asked = self.budget_tensor and self.reducer.read_query and all(questions[i] for i in members)
            narrow = self._score_projection is not None and (asked or self._narrow_unasked)
            inputs = self._group_inputs(group, features, rgb, embeds)
            # shapes only, on the host: the model's own tower made the features (no read-back)
            check_visual(
                VisualInput(inputs["features"], patch_valid=inputs["patch_valid"], pixels=inputs.get("pixels")),
                values=False,
            )
            if group.budgets is None:
                kept = [group.budget] * len(members)
                name: tuple = ("reducer", group.budget)
                step = self._group_step(group.bucket, narrow, gather, budget=group.budget)
            else:
                kept = [budgets[i] for i in members]
                capacity, steps = self._capacity(group.bucket, kept, [features[i].shape[:2] for i in members], asked)
                name = ("head", capacity, steps)
                step = self._group_step(group.bucket, narrow, gather, capacity=capacity, steps=steps)
            out = self._run((*name, narrow, gather), step, inputs)
            for j, i in enumerate(members):  # views of the group's output: its first kept[j] tokens are image i's
                results[i] = ReducedTokens(
                    out.tokens[j : j + 1, : kept[j]],
                    out.positions[j : j + 1, : kept[j]],
                    out.weights[j : j + 1, : kept[j]],
                    None if out.relevance is None else out.relevance[j : j + 1],
                    None if out.allocation is None else out.allocation[j : j + 1],
                )
        return results  # type: ignore[return-value]

    def _group_inputs(
        self, group: _Group, features: list[Tensor], rgb: list[Tensor | None], embeds: Tensor
    ) -> dict[str, Tensor]:
        """One bucket's graph inputs: the full-width grids zero-padded to the bucket (``features``), their
        validity (``patch_valid``, 0 on the padding), their pixels where the reducer reads them, the question
        tokens (``text``, ``query_mask``) where it reads a query, and the budgets of arrcoc's reducers.

        Per image only the copies into the padded batch; everything else comes with the group."""
        (bh, bw), members = group.bucket, group.members
        first = features[members[0]]
        n, h = len(members), first.shape[-1]
        grid = first.new_zeros(n, bh, bw, h)
        for j, i in enumerate(members):
            gh, gw = features[i].shape[:2]
            grid[j, :gh, :gw] = features[i]
        inputs = {"features": grid, "patch_valid": group.valid}
        if "pixels" in self.needs:
            cell = self.texture_cell
            pixels = first.new_zeros(n, 3, bh * cell, bw * cell, dtype=torch.float32)
            for j, i in enumerate(members):
                _, ph, pw = rgb[i].shape
                pixels[j, :, :ph, :pw] = rgb[i]
            inputs["pixels"] = pixels
        if group.where is not None:
            # (n, L, H) the question tokens (any past them: masked)
            inputs["text"] = embeds[group.rows[:, None], group.where]
            inputs["query_mask"] = group.query_mask
        if group.budgets is not None:
            inputs["budget"] = group.budgets
        return inputs

    def _visual(self, state: dict[str, Tensor], narrow: bool) -> VisualInput:
        """What the reducer reads, from a group's inputs (:meth:`_group_inputs`): the pixels' validity at pixel
        resolution, the query mixed from the merged tokens (:meth:`_query`) and, with ``narrow``, the grid and the
        query through the ``score_width`` projection (the head then reads ``(n, bh, bw, d)``). Tensors in, tensors
        out: part of the group's graph."""
        grid, valid = state["features"], state["patch_valid"]
        n, bh, bw, _ = grid.shape
        visual = VisualInput(features=grid)
        if "patch_valid" in self.needs:
            visual.patch_valid = valid
        if "pixels" in state:
            cell = self.texture_cell
            visual.pixels = state["pixels"]
            # each image's pixels cover its merged grid exactly, ``cell`` pixels a side per merged token
            visual.valid = valid[:, :, None, :, None].expand(n, bh, cell, bw, cell).reshape(n, 1, bh * cell, bw * cell)
        narrowed = grid @ self._score_projection.to(grid.dtype) if narrow else None  # (n, bh, bw, d), padding 0
        if "text" in state:
            visual.query = self._query(grid, valid, state["text"], narrowed) * state["query_mask"][..., None]
            visual.query_mask = state["query_mask"]
        if narrowed is not None:  # the head's narrow view
            visual.features = narrowed
        return visual

    def _capacity(
        self, bucket: tuple[int, int], budgets: list[int], grids: list[tuple[int, int]], asked: bool
    ) -> tuple[int, int]:
        """arrcoc's reducers on a bucket: ``(C, steps)``. Tokens are packed kept-first into ``C`` = the smallest of
        1/8, 1/4, 1/2 or all of the bucket's capacity that holds every budget, so the graph's key holds that step,
        not the budget. The query-free pick's greedy steps (``BalanceConfig.pick``) are the largest budget rounded
        up to a power of two (which joins the key), or none when every image is ``asked`` a question.

        Raises:
            BudgetError: a budget is above its image's token capacity.
        """
        cfg = self.reducer.config
        for i, ((gh, gw), k) in enumerate(zip(grids, budgets)):
            limit = capacity_of((gh, gw), cfg.region_size, cfg.max_tokens)
            if k > limit:
                raise BudgetError(
                    f"budget {k} of image {i} is above {limit}, the token capacity of its {gh}x{gw} "
                    f"merged grid under max_tokens={cfg.max_tokens}"
                )
        full = capacity_of(bucket, cfg.region_size, cfg.max_tokens)
        # A share budget lands on one step for every grid of a bucket, so the ladder rarely adds a capture; packing
        # all of the capacity would write and convert every cell's token where a share keeps a few.
        capacity = next((full // d for d in (8, 4, 2) if max(budgets) <= full // d), full)
        picks = self.reducer.head.pick != "off" and not asked
        steps = min(capacity, 1 << (max(budgets) - 1).bit_length()) if picks else 0
        return capacity, steps

    def _group_step(
        self,
        bucket: tuple[int, int],
        narrow: bool,
        gather: bool,
        *,
        budget: int | None = None,
        capacity: int = 0,
        steps: int = 0,
    ) -> Any:
        """A group's reduction as one function of its inputs (:meth:`_group_inputs`) -> the reducer's outputs in
        raster order: a baseline keeps ``budget`` tokens; arrcoc's relevance head (``budget=None``) reads the
        per-image budgets as a tensor and packs them kept-first into ``capacity`` slots, with ``steps`` greedy pick
        steps (:meth:`_capacity`). With ``narrow`` and ``gather`` the tokens are the full-width features at the
        chosen cells."""
        reducer, bw = self.reducer, bucket[1]

        def run(state: dict[str, Tensor]) -> dict[str, Tensor]:
            visual = self._visual(state, narrow)
            if budget is not None:
                kept = reducer(visual, budget)
                out = {k: getattr(kept, k) for k in REDUCER_OUTPUTS if getattr(kept, k) is not None}
            else:
                out = self._head(visual, state["budget"], capacity, steps)
            # the head's packed slots past each image's budget stay last
            ordered = raster_order(ReducedTokens(**out), bw, None if budget is not None else state["budget"])
            out = {**out, "tokens": ordered.tokens, "positions": ordered.positions, "weights": ordered.weights}
            if gather and narrow:  # each token one cell: the cell's full-width features
                cells = ordered.positions[..., 0] * bw + ordered.positions[..., 1]  # (n, K)
                grid = state["features"].flatten(1, 2)  # (n, bh * bw, H)
                out["tokens"] = grid.gather(1, cells[..., None].expand(-1, -1, grid.shape[-1]))
            return out

        return run

    def _head(self, visual: VisualInput, budget: Tensor, capacity: int, steps: int) -> dict[str, Tensor]:
        """arrcoc's relevance head on ``visual`` with per-image ``budget`` ``(n,)``: tokens ``(n, capacity, d)``
        packed kept-first, in the features' dtype."""
        reducer = self.reducer
        features = visual.features.float()
        b, gh, gw, d = features.shape
        texture = (
            reducer.texture(visual.pixels.float(), visual.valid.float(), (gh, gw))
            if visual.pixels is not None
            else features.new_zeros(b, gh, gw, len(TEXTURE_CHANNELS))
        )  # (B, gh, gw, 6)
        if reducer.read_query and visual.query is not None:
            query, query_mask = visual.query.float(), visual.query_mask
        else:
            query, query_mask = features.new_zeros(b, 1, d), torch.zeros(b, 1, dtype=torch.bool, device=features.device)
        out = reducer.head(
            features, texture, visual.patch_valid.float(), query, query_mask, budget, capacity, pick_steps=steps
        )
        return {
            "tokens": out["tokens"].to(visual.features.dtype),
            "positions": out["positions"],
            "weights": out["weights"],
            "relevance": out["relevance"],
            "allocation": out["allocation"],
        }

    def _run(self, name: tuple, fn: Any, inputs: dict[str, Tensor]) -> ReducedTokens:
        """``fn(inputs)``, replayed as a CUDA graph keyed on ``name`` and the inputs' shapes where allowed."""
        first = inputs["features"]
        backend = _graph_backend(self.reducer_graphs, first)
        if torch.is_grad_enabled() and any(v.requires_grad for v in inputs.values()):
            backend = None  # a graph replay has no autograd: with gradients wanted, call the reducer directly
        key = (*name, backend, tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        chain = self._chains.get(key) if backend or self.compile_reducer else fn
        if chain is None:  # a graph of the (compiled) reducer, or where none can be captured, the step itself
            step = torch.compile(fn, dynamic=False) if self.compile_reducer else fn  # one compile per key
            chain = self._chains[key] = (self._chain(step, inputs, backend) if backend else None) or step
        result = chain.run(inputs, rows=first.shape[0]) if isinstance(chain, GraphChain) else chain(inputs)
        return ReducedTokens(
            result["tokens"],
            result["positions"],
            result["weights"],
            result["relevance"] if "relevance" in result else None,
            result["allocation"] if "allocation" in result else None,
        )

    def _chain(self, fn: Any, inputs: dict[str, Tensor], backend: str) -> GraphChain | None:
        return reducer_chain(fn, inputs, backend, self._graph_pool(backend), f"{self.method} reducer")

    @contextlib.contextmanager
    def reading(self, prepared: QwenPrepared) -> Iterator[None]:
        """While open, the model reads ``prepared``'s DeepStack features (Qwen3-VL; nothing to do otherwise).

        Qwen3-VL adds features of early vision layers to the hidden states of its first language-model layers at
        the image positions; its own forward computes them only from ``pixel_values``. A forward pre-hook on the
        language model hands it the kept tokens' features and positions for any pass over the whole prompt (a
        prefill, or a longer sequence starting with it); decode steps read the KV cache and get none.
        """
        if prepared.deepstack is None:
            yield
            return
        slots = prepared.input_ids == self.image_token_id  # (B, T)

        def hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and embeds.shape[1] >= slots.shape[1]:
                extra = slots.new_zeros(slots.shape[0], embeds.shape[1] - slots.shape[1])
                kwargs["visual_pos_masks"] = torch.cat((slots, extra), 1)
                kwargs["deepstack_visual_embeds"] = prepared.deepstack
            return args, kwargs

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def run(self, prepared: QwenPrepared, **kwargs: Any) -> Any:
        """The model's output (``.logits`` ``(B, T, vocab)``) on prepared inputs."""
        with self.reading(prepared):
            return self.model(
                inputs_embeds=prepared.inputs_embeds,
                attention_mask=prepared.attention_mask,
                position_ids=prepared.position_ids,
                **kwargs,
            )

    def forward(
        self, images: Any, prompts: str | Sequence[str], budget: int | float | None = None, **kwargs: Any
    ) -> Any:
        """The model's output (``.logits`` ``(B, T, vocab)``) on the prompts with each image's reduced tokens."""
        return self.run(self.prepare(images, prompts, budget), **kwargs)

    @torch.no_grad()
    def generate(
        self,
        images: Any,
        prompts: str | Sequence[str],
        budget: int | float | None = None,
        *,
        decode: str = "hf",
        **generate_kwargs: Any,
    ) -> Tensor:
        """Generate after the prompts with each image's reduced tokens; returns the new ids ``(B, new)``.

        Args:
            images, prompts, budget: as in :meth:`prepare`.
            decode: ``"hf"``: the model's own ``generate`` (greedy, sampling, anything transformers offers);
                ``"graphed"``: a static KV cache with the prefill and the decode step replayed as CUDA graphs
                (:meth:`generate_prepared`).
        """
        return self.generate_prepared(self.prepare(images, prompts, budget), decode=decode, **generate_kwargs)

    @torch.no_grad()
    def generate_prepared(self, prepared: QwenPrepared, *, decode: str = "hf", **generate_kwargs: Any) -> Tensor:
        """Generate after prepared inputs (:meth:`prepare`, :meth:`unreduced`); returns the new ids ``(B, new)``.

        ``decode="graphed"`` runs :class:`arrcoc.integrations.decode.GraphedDecoder` over the language model: the
        prompt's multimodal positions as given, each new token one past the prompt's last position on every axis
        (as the model's own ``generate``), Qwen3-VL's DeepStack features added in the prefill at the image slots.
        It takes ``max_new_tokens``, ``do_sample``, ``temperature``, ``eos_token_id``, ``pad_token_id`` and
        ``generator``. On a batch-1 7B prefill the language model is launch-bound in transformers' eager forward,
        so fewer image tokens shorten the time to first token only when the prefill is replayed as a graph
        (docs/generation.md).
        """
        if decode == "hf":
            with self.reading(prepared):
                return self.model.generate(
                    inputs_embeds=prepared.inputs_embeds,
                    attention_mask=prepared.attention_mask,
                    position_ids=prepared.position_ids,
                    **generate_kwargs,
                )
        if decode != "graphed":
            raise InvalidInputError(f"decode must be 'hf' or 'graphed'; got {decode!r}")
        return self.decoder.generate(
            prepared.inputs_embeds, prepared.attention_mask, **self._decoder_inputs(prepared), **generate_kwargs
        )

    def _decoder_inputs(self, prepared: QwenPrepared) -> dict[str, Tensor | None]:
        """The graphed decoder's ``position_ids`` and ``deepstack``: for Qwen3-VL a dense ``(n, B, T, H)``, the kept
        tokens' DeepStack features at their slots and zero elsewhere."""
        deepstack = None
        if prepared.deepstack is not None:
            embeds = prepared.inputs_embeds
            slots = _true_places(prepared.input_ids == self.image_token_id, sum(prepared.budgets))
            deepstack = embeds.new_zeros(len(prepared.deepstack), embeds.shape[0] * embeds.shape[1], embeds.shape[2])
            deepstack[:, slots] = torch.stack(prepared.deepstack).to(embeds.dtype)
            deepstack = deepstack.unflatten(1, embeds.shape[:2])
        return {"position_ids": prepared.position_ids, "deepstack": deepstack}

    @property
    def decoder(self) -> GraphedDecoder:
        """The :class:`arrcoc.integrations.decode.GraphedDecoder` over this model's language model (built on first use)."""
        if self._decoder is None:
            self._decoder = GraphedDecoder(self.language_model, self.model.get_output_embeddings())
        return self._decoder


def kept_units(reduced: Sequence[ReducedTokens], grids: Sequence[tuple[int, int]]) -> Tensor:
    """``(sum K_i,)`` the merged units each image's single-unit tokens name (arrcoc's tokens), in raster order
    counted over the batch, each image's in its tokens' order: what the pruned tower's tail runs on."""
    units, offset = [], 0
    for out, (gh, gw) in zip(reduced, grids):
        cells = out.positions[0]  # (K_i, 4) row, column, 1, 1
        units.append(cells[:, 0] * gw + cells[:, 1] + offset)
        offset += gh * gw
    return torch.cat(units)


def _image_slots(
    rows: list[tuple[list[int], list[bool], int]], pads: list[int], length: int, counts: list[int]
) -> Tensor:
    """``(sum K,)`` each kept token's place in the flattened ``(B, T)`` input, image by image: past the row's left
    padding and the text before its image (``rows[i][2]``), ``counts[i]`` tokens."""
    return torch.cat(
        [i * length + pad + row[2] + torch.arange(k) for i, (pad, row, k) in enumerate(zip(pads, rows, counts))]
    )


def _every_cell(features: Tensor) -> ReducedTokens:
    """Every cell of a ``(gh, gw, H)`` grid kept, in raster order, as a reducer would return them."""
    gh, gw, _ = features.shape
    on = features.device
    rows, cols = torch.meshgrid(torch.arange(gh, device=on), torch.arange(gw, device=on), indexing="ij")
    ones = torch.ones_like(rows)
    boxes = torch.stack((rows, cols, ones, ones), -1).flatten(0, 1)  # (N, 4)
    weights = torch.ones(1, gh * gw, device=on)
    return ReducedTokens(features.flatten(0, 1)[None], boxes[None], weights)


def _true_places(mask: Tensor, count: int) -> Tensor:
    """``(count,)`` the flat indices of ``mask``'s ``count`` True entries, in order, without a host read."""
    return torch.sort(mask.flatten().long(), descending=True, stable=True).indices[:count]


def _sent_all(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Host-made ``tensors`` on ``device`` in one copy: their bytes packed (each at an 8-byte boundary) into one
    buffer, pinned for a GPU so that the copy queues behind the work already launched (the vision tower) instead
    of the host waiting for it, and viewed back with their own dtypes and shapes (no kernel per tensor)."""
    parts, sizes, gap = [], [], torch.zeros(8, dtype=torch.uint8)
    for t in tensors:  # each tensor's bytes, then the padding to the next 8-byte boundary (possibly none)
        data = t.contiguous().view(-1).view(torch.uint8)
        pad = gap[: -data.numel() % 8]
        parts += [data, pad]
        sizes += [data.numel(), pad.numel()]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=device.type == "cuda")
    torch.cat(parts, out=buffer)
    chunks = buffer.to(device, non_blocking=True).split(sizes)[::2]
    return [c.view(t.dtype).view(t.shape) for c, t in zip(chunks, tensors)]


def _tower_outputs(out: Any) -> tuple[Tensor, list[Tensor] | None]:
    """(every image's merged tokens end to end ``(N, H)``, DeepStack features per layer ``(N, H)`` or ``None``)
    from the vision tower's output: a model output with ``pooler_output`` (transformers >= 5), a tuple
    ``(merged, deepstack)`` (Qwen3-VL before) or the merged tensor (Qwen2-VL, Qwen2.5-VL before)."""
    if isinstance(out, Tensor):
        return out, None
    if hasattr(out, "pooler_output"):
        layers = getattr(out, "deepstack_features", None)
        return out.pooler_output, None if layers is None else list(layers)
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0], list(out[1]) if len(out) > 1 and out[1] is not None else None
    raise InvalidTypeError(f"the vision tower returned {type(out).__name__}, which this adapter does not read")


def _box_means(grid: Tensor, boxes: Tensor) -> Tensor:
    """``(L, K, H)``: the mean of ``grid`` ``(L, gh, gw, H)`` over each box ``(K, 4)`` (row, col, height, width);
    a one-cell box reads its cell exactly. Sums come from an integral image (no host reads)."""
    r, c, h, w = boxes.unbind(-1)  # (K,) each
    cells = grid[:, r, c]  # (L, K, H)
    integral = F.pad(grid.float().cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))  # (L, gh + 1, gw + 1, H)
    total = integral[:, r + h, c + w] - integral[:, r, c + w] - integral[:, r + h, c] + integral[:, r, c]
    area = (h * w)[None, :, None]
    return torch.where(area == 1, cells, (total / area).to(grid.dtype))
