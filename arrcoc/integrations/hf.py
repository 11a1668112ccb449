"""Hugging Face LLaVA models read arrcoc's tokens: ``ArrcocLlava`` and the ``arrcoc generate`` command.

The adapter wraps a ``LlavaForConditionalGeneration`` without changing it. For each image it runs the model's
own vision tower with the model's own feature selection (``vision_feature_layer``,
``vision_feature_select_strategy``), reduces the patch grid to exactly ``budget`` tokens with any registered
reducer (:mod:`arrcoc.reducers`) *before* the projector, projects the ``budget`` tokens with the model's own
projector, and writes them into ``budget`` image slots of the prompt. The language model then runs as usual:
``model(inputs_embeds=..., attention_mask=...)`` or ``model.generate(inputs_embeds=..., ...)``; or, with
``decode="graphed"``, through :class:`arrcoc.integrations.decode.GraphedDecoder` (a static KV cache and a CUDA-graphed
decode step).

Covered families: LLaVA-1.5-style models (a CLIP/SigLIP-like vision tower whose ``hidden_states`` are
``(B, [CLS +] N, D)``) and LLaVA whose tower is a timm ViT behind ``TimmWrapperConfig``. LLaVA-NeXT is not
covered: its any-resolution packing (a base view plus crops, with ``image_newline`` tokens) is a different
token layout. LLaVA uses 1-D rotary positions, so a stock model does not read the tokens' 2-D ``positions``
(they are returned in :class:`Prepared`); a model with a ``token_positions`` submodule
(:class:`arrcoc.integrations.token_positions.TokenPositions`, as the project's own VLM may have) gets them added to the
projected tokens.

Importing this module does not import transformers (only :func:`main` and :func:`word_tokenizer` do); the
adapter works on whatever transformers objects it is handed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PipelineConfig
from ..errors import ArrcocError, BudgetError, InvalidInputError, InvalidTypeError
from ..reducers import ReducedTokens, VisualInput, create_reducer
from .adapter import check_prompting, expand_prompt, processor_parts, reducer_chain
from .decode import GraphedDecoder, language_model, rope
from .token_positions import add_token_positions

__all__ = ["ArrcocLlava", "Prepared", "raster_order", "word_tokenizer", "main"]

logger = logging.getLogger(__name__)

#: VisualInput fields a reducer graph takes as static inputs (when present).
_VISUAL_FIELDS = ("features", "pixels", "query", "query_mask", "cls_attention", "text_attention")

#: The LLaVA-1.5 conversation template; ``{image}`` becomes the tokenizer's image token.
LLAVA_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"


@dataclass
class Prepared:
    """Everything the language model reads for one batch, and what the reducer chose.

    Attributes:
        inputs_embeds: ``(B, T, H)`` prompt embeddings, left padded, ``budget`` image slots per row.
        attention_mask: ``(B, T)`` int64, 0 on left padding.
        input_ids: ``(B, T)`` the token ids behind ``inputs_embeds`` (image slots hold the image token id).
        reduced: the reducer's output, tokens in raster order ``(B, K, D_vision)`` (``K`` patch tokens; the
            [CLS] token of a ``"full"`` selection is not among them).
        query_mask: ``(B, T)`` bool, the prompt tokens the participatory scorer read.
        image_tokens: ``(B, budget, H)`` the projected image tokens written into the slots.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    input_ids: Tensor
    reduced: ReducedTokens
    query_mask: Tensor
    image_tokens: Tensor


def raster_order(reduced: ReducedTokens, grid_width: int, kept: Tensor | None = None) -> ReducedTokens:
    """Reorder tokens by the raster position (row, then column) of their box's top-left patch.

    At full detail this is exactly the vision tower's patch order; a token that stands for an area (a merged
    token of a baseline) follows a kept patch that shares its corner (stable sort). Sorting happens on the
    device (no host read).

    Args:
        reduced: tokens ``(B, K, D)``, positions ``(B, K, 4)``, weights ``(B, K)``.
        grid_width: ``gw``, patches per row.
        kept: ``(B,)`` for tokens packed kept-first: row ``b``'s first ``kept[b]`` are ordered and the slots past
            them stay last, in their order (``None``: every token is ordered).
    """
    key = reduced.positions[..., 0] * grid_width + reduced.positions[..., 1]  # (B, K)
    if kept is not None:
        slot = torch.arange(key.shape[1], device=key.device)
        key = torch.where(slot < kept[:, None], key, torch.iinfo(key.dtype).max)
    order = torch.sort(key, dim=-1, stable=True).indices
    return ReducedTokens(
        tokens=reduced.tokens.gather(1, order[..., None].expand_as(reduced.tokens)),
        positions=reduced.positions.gather(1, order[..., None].expand_as(reduced.positions)),
        weights=reduced.weights.gather(1, order),
        relevance=reduced.relevance,
        allocation=reduced.allocation,
    )


def word_tokenizer(words: Sequence[str], image_token_id: int | None = None, image_token: str = "<image>") -> Any:
    """A word-level fast tokenizer (whitespace and punctuation split) for models without a pretrained one.

    Ids: ``<pad>`` 0, ``<s>`` 1 (prepended to every text), ``</s>`` 2, ``<unk>`` 3, the image token
    ``image_token_id`` (default 4), then ``words`` in order. For tests, benchmarks and small trained VLMs.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    image_id = len(special) if image_token_id is None else int(image_token_id)
    vocab = {w: i for i, w in enumerate(special)}
    vocab[image_token] = image_id
    free = (i for i in range(len(special), len(special) + len(words) + 2) if i != image_id)
    for word in dict.fromkeys(words):
        vocab.setdefault(word, next(free))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[image_token],
    )


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(vision tower, projector) across transformers versions (4.46 keeps them on the outer model)."""
    for owner in (getattr(model, "model", None), model):
        if owner is not None and hasattr(owner, "vision_tower") and hasattr(owner, "multi_modal_projector"):
            return owner.vision_tower, owner.multi_modal_projector
    raise InvalidTypeError(
        f"model must be a LlavaForConditionalGeneration (with a vision_tower and a "
        f"multi_modal_projector); got {type(model).__name__}"
    )


class ArrcocLlava(nn.Module):
    """A LLaVA model that reads ``budget`` arrcoc (or baseline) tokens per image instead of all patches.

    The query the participatory scorer reads comes from the prompt, coupled in the language model's space:
    each question token's embedding ``t`` is compared (cosine) with the *projected* patch tokens
    ``P(f_p)``, and pulled back into the vision space the reducer scores as the patch mixture it points to,
    ``q = sum_p softmax_p(cos(t, P(f_p)) / tau) f_p``. The projector is not invertible, so this mixture is the
    vision-space vector that stands for the text token; the scorer's cosine with ``q`` is then high on the
    patches the text couples to. Padding, special tokens and the chat template's boilerplate are masked out.
    A trained query head may replace this later.

    Args:
        model: a ``LlavaForConditionalGeneration`` (CLIP-like or ``TimmWrapper`` vision tower).
        processor_or_tokenizer: a ``LlavaProcessor`` (images may then be PIL images or arrays), or a tokenizer
            alone (images must then be ``pixel_values`` tensors prepared as the model expects).
        method: a registered reducer name (``arrcoc.reducers.list_reducers()``).
        config: the reducer's config (arrcoc's default when omitted).
        template: the prompt template used when a prompt holds no image placeholder; ``{image}`` and
            ``{question}`` are filled in, and only the question's tokens form the query.
        query_temperature: ``tau`` of the pull-back softmax.
        image_mean: per-channel mean of the pixel normalisation (read from the processor or the timm tower
            when omitted); used to give reducers RGB pixels in [0, 1].
        image_std: the matching standard deviation.
        fastv_layer: the language-model layer whose text-to-image attention fills ``text_attention`` (for
            reducers that need it, e.g. FastV).
        reducer_graphs: ``"auto"`` runs the reducer as a CUDA graph (:class:`arrcoc.runtime.graphs.GraphChain`, one per
            budget and input shapes) on CUDA and directly elsewhere; ``"eager"`` uses the chain's eager backend
            (the same host-side path, for tests); ``"off"`` always calls the reducer directly. A reducer that
            cannot be captured falls back to a direct call, with one warning; so does any call that needs
            gradients (graphs replay without autograd).
    """

    def __init__(
        self,
        model: nn.Module,
        processor_or_tokenizer: Any,
        *,
        method: str = "arrcoc",
        config: PipelineConfig | None = None,
        template: str = LLAVA_TEMPLATE,
        query_temperature: float = 0.1,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        fastv_layer: int = 2,
        reducer_graphs: str = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        self.vision_tower, self.projector = _parts(model)
        self.tokenizer, self.image_processor = processor_parts(processor_or_tokenizer)
        check_prompting(template, query_temperature)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.template = template
        self.query_temperature = float(query_temperature)
        self.fastv_layer = int(fastv_layer)
        if reducer_graphs not in ("auto", "eager", "off"):
            raise InvalidInputError(f"reducer_graphs must be 'auto', 'eager' or 'off'; got {reducer_graphs!r}")
        self.reducer_graphs = reducer_graphs
        self._chains: dict[tuple, Any] = {}
        self._pool: Any = None
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise InvalidInputError(
                f"vision_feature_select_strategy must be 'default' or 'full'; got {self.strategy!r}"
            )
        # Decided once: a timm tower gives NCHW block outputs with the prefix tokens already removed.
        self.timm_tower = hasattr(self.vision_tower, "timm_model")
        self.keeps_cls = self.strategy == "full" and not self.timm_tower
        if self.keeps_cls and getattr(model, "token_positions", None) is not None:
            raise InvalidInputError(
                "a model with token_positions places patch tokens only; its [CLS] token has no "
                "box: use vision_feature_select_strategy='default'"
            )
        self.method = method
        self.reducer = create_reducer(method, config=config)
        if isinstance(self.reducer, torch.nn.Module):  # its constant buffers (colour matrix, filters) go with the model
            self.reducer.to(next(model.parameters()).device)
        self.needs = frozenset(getattr(self.reducer, "needs", frozenset()))
        mean, std = self._normalisation(image_mean, image_std)
        self.register_buffer("_mean", None if mean is None else torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", None if std is None else torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.special_ids = frozenset(int(i) for i in getattr(self.tokenizer, "all_special_ids", []))
        self._decoder: GraphedDecoder | None = None

    # --- set-up helpers ------------------------------------------------------------------------------
    def _normalisation(
        self, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> tuple[Sequence[float] | None, Sequence[float] | None]:
        if mean is not None and std is not None:
            return tuple(mean), tuple(std)
        proc = self.image_processor
        if proc is not None and getattr(proc, "image_mean", None) is not None:
            if getattr(proc, "do_normalize", True):
                return tuple(proc.image_mean), tuple(proc.image_std)
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        config = getattr(proc, "data_config", None)
        if isinstance(config, dict) and "mean" in config:
            return tuple(config["mean"]), tuple(config["std"])
        if self.timm_tower:
            import timm.data

            data = timm.data.resolve_model_data_config(self.vision_tower.timm_model)
            return tuple(data["mean"]), tuple(data["std"])
        logger.warning("no image mean/std known: reducers get no RGB pixels (feature terms only)")
        return None, None

    @property
    def full_tokens(self) -> int:
        """Image tokens the unmodified model reads per image (patches, plus [CLS] under ``"full"``)."""
        gh, gw = self.grid
        return gh * gw + int(self.keeps_cls)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)``: the vision tower's patch grid at its configured image size."""
        vc = self.model.config.vision_config
        if self.timm_tower:
            grid = self.vision_tower.timm_model.patch_embed.grid_size
            return int(grid[0]), int(grid[1])
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    # --- images -> features --------------------------------------------------------------------------
    def pixel_values(self, images: Any) -> Tensor:
        """``(B, 3, H, W)`` normalised pixel values: a tensor passes through, anything else goes to the processor."""
        if isinstance(images, Tensor):
            pixels = images if images.ndim == 4 else images[None]
            if pixels.ndim != 4 or pixels.shape[1] != 3:
                raise InvalidInputError(
                    f"images as a tensor must be pixel_values (B, 3, H, W); got {tuple(images.shape)}"
                )
            return pixels
        if self.image_processor is None:
            raise InvalidTypeError(
                "images must be a pixel_values tensor (B, 3, H, W) when the adapter was given a "
                f"tokenizer, not a processor; got {type(images).__name__}"
            )
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def _layer_states(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        return tuple(out.hidden_states)

    def features(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The model's own selected features: the grid the reducer reads, the [CLS] token and its attention.

        Returns:
            grid ``(B, gh, gw, D)`` (``D`` = vision width times the number of selected layers); cls ``(B, 1, D)``
            under the ``"full"`` selection of a CLIP-like tower, else ``None``; cls_attention ``(B, gh, gw)``
            where the tower exposes it and the reducer needs it, else ``None``.
        """
        states = self._layer_states(pixel_values)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        picked = [states[i] for i in layers]
        gh, gw = self.grid
        if self.timm_tower:  # block outputs (B, D, gh, gw), prefix tokens removed by timm
            grids = [s.permute(0, 2, 3, 1) for s in picked]
            cls = None
        else:  # (B, prefix + N, D)
            grids = [s[:, -gh * gw :].unflatten(1, (gh, gw)) for s in picked]
            cls = torch.cat([s[:, :1] for s in picked], -1) if self.keeps_cls else None
        grid = torch.cat(grids, -1)  # (B, gh, gw, D)
        attention = None
        if "cls_attention" in self.needs and not self.timm_tower and isinstance(self.feature_layer, int):
            attention = _cls_attention(self.vision_tower, states, self.feature_layer, (gh, gw))
        return grid, cls, attention

    def _rgb(self, pixel_values: Tensor) -> Tensor | None:
        if self._mean is None:
            return None
        pixels = pixel_values.float() * self._std.to(pixel_values.device) + self._mean.to(pixel_values.device)
        return pixels.clamp(0, 1)

    # --- prompts -> ids -------------------------------------------------------------------------------
    def _tokenize(self, prompt: str, slots: int) -> tuple[list[int], list[bool]]:
        """Token ids with the image placeholder expanded to ``slots`` copies, and which tokens form the query."""
        ids, query, _ = expand_prompt(
            prompt,
            slots,
            tokenizer=self.tokenizer,
            template=self.template,
            image_token=self.image_token,
            image_token_id=self.image_token_id,
            special_ids=self.special_ids,
        )
        return ids, query

    def _batch_ids(self, prompts: Sequence[str], slots: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        rows = [self._tokenize(p, slots) for p in prompts]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        query = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row, q) in enumerate(rows):  # left padding
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
            query[i, length - len(row) :] = torch.tensor(q)
        return ids.to(device), mask.to(device), query.to(device)

    # --- the adapter ----------------------------------------------------------------------------------
    def check_budget(self, budget: int) -> None:
        """``budget`` counts every image token the language model reads: ``1 + keeps_cls`` up to ``full_tokens``."""
        low = 1 + int(self.keeps_cls)
        if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= self.full_tokens:
            raise BudgetError(
                f"budget must be a whole number of image tokens in [{low}, {self.full_tokens}] "
                f"(the model reads {self.full_tokens} unreduced); got {budget!r}"
            )

    def prepare(self, images: Any, prompts: str | Sequence[str], budget: int) -> Prepared:
        """Build the language model's input: prompts with ``budget`` reduced image tokens each.

        Args:
            images: one image per prompt: PIL images/arrays (with a processor) or ``pixel_values`` ``(B, 3, H, W)``.
            prompts: strings; a prompt with the image placeholder is used verbatim, one without it is put into
                the template.
            budget: image tokens per image (``full_tokens`` reads every patch in the model's own order).
        """
        self.check_budget(budget)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.model.get_input_embeddings().weight.device
        pixel_values = self.pixel_values(images).to(device)
        if pixel_values.shape[0] != len(prompts):
            raise InvalidInputError(
                f"images and prompts must pair up one to one; got {pixel_values.shape[0]} "
                f"images and {len(prompts)} prompts"
            )
        ids, mask, query_mask = self._batch_ids(prompts, budget, device)
        embeds = self.model.get_input_embeddings()(ids)  # (B, T, H)
        grid, cls, cls_attention = self.features(pixel_values)
        visual = VisualInput(features=grid, pixels=self._rgb(pixel_values), cls_attention=cls_attention)
        if self.needs & {"query", "query_mask"}:
            visual.query, visual.query_mask = self._query(grid, embeds, query_mask)
        if "text_attention" in self.needs:
            visual.text_attention = self._text_attention(prompts, grid, cls)
        reduced = raster_order(self.reduce(visual, budget - int(self.keeps_cls)), grid.shape[2])
        tokens = reduced.tokens if cls is None else torch.cat((cls, reduced.tokens), 1)
        image_tokens = add_token_positions(
            self.model, self.projector(tokens.to(grid.dtype)), reduced.positions, grid.shape[1:3]
        )  # (B, budget, H)
        embeds = _fill_slots(embeds, ids == self.image_token_id, image_tokens)
        return Prepared(embeds, mask, ids, reduced, query_mask, image_tokens)

    def reduce(self, visual: VisualInput, budget: int) -> ReducedTokens:
        """The reducer on ``visual``, replayed as a CUDA graph where ``reducer_graphs`` allows (see the class)."""
        device = visual.features.device
        backend = {"auto": "cuda" if device.type == "cuda" else None, "eager": "eager", "off": None}[
            self.reducer_graphs
        ]
        inputs = {f: getattr(visual, f) for f in _VISUAL_FIELDS if getattr(visual, f) is not None}
        if torch.is_grad_enabled() and any(v.requires_grad for v in inputs.values()):
            backend = None  # a graph replay has no autograd: with gradients wanted, call the reducer directly
        key = (budget, backend, tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        chain = self._chains.get(key) if backend else False
        if chain is None:
            chain = self._chains[key] = self._chain(inputs, budget, backend)
        if chain is False:
            return self.reducer(visual, budget)
        result = chain.run(inputs, rows=visual.features.shape[0])
        return ReducedTokens(
            result["tokens"], result["positions"], result["weights"], result.get("relevance"), result.get("allocation")
        )

    def _chain(self, inputs: dict[str, Tensor], budget: int, backend: str) -> Any:
        def reduce(state: dict[str, Any]) -> dict[str, Any]:
            out = self.reducer(VisualInput(**{k: state[k] for k in inputs}), budget)
            return {k: v for k, v in vars(out).items() if v is not None}

        if backend == "cuda" and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return reducer_chain(reduce, inputs, backend, self._pool, f"{self.method} reducer") or False

    def _query(self, grid: Tensor, embeds: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pull the prompt's question tokens back into the vision space (see the class docstring)."""
        patches = grid.flatten(1, 2)  # (B, N, D)
        projected = self.projector(patches)  # (B, N, H)
        cosine = torch.einsum(
            "blh,bnh->bln", F.normalize(embeds.float(), dim=-1), F.normalize(projected.float(), dim=-1)
        )  # (B, T, N)
        mix = torch.softmax(cosine / self.query_temperature, dim=-1)
        query = torch.einsum("btn,bnd->btd", mix, patches.float())  # (B, T, D)
        return query, query_mask

    def _text_attention(self, prompts: list[str], grid: Tensor, cls: Tensor | None) -> Tensor:
        """FastV's signal: ``(B, gh, gw)`` attention from the prompt's text to each image token, with every image
        token in place, inside language-model layer ``fastv_layer``."""
        ids, mask, _ = self._batch_ids(prompts, self.full_tokens, grid.device)
        tokens = grid.flatten(1, 2) if cls is None else torch.cat((cls, grid.flatten(1, 2)), 1)
        slots = ids == self.image_token_id
        embeds = _fill_slots(
            self.model.get_input_embeddings()(ids),
            slots,
            add_token_positions(self.model, self.projector(tokens), None, grid.shape[1:3]),
        )
        attention = _text_to_image_attention(
            language_model(self.model), self.fastv_layer, embeds, mask, slots, self.full_tokens
        )
        return attention[:, int(self.keeps_cls) :].unflatten(-1, grid.shape[1:3])

    def forward(self, images: Any, prompts: str | Sequence[str], budget: int, **kwargs: Any) -> Any:
        """The model's output (``.logits`` ``(B, T, vocab)``) on the prompts with ``budget`` image tokens each."""
        prepared = self.prepare(images, prompts, budget)
        return self.model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self, images: Any, prompts: str | Sequence[str], budget: int, *, decode: str = "hf", **generate_kwargs: Any
    ) -> Tensor:
        """Generate after the prompts; returns the new token ids ``(B, new)``.

        Args:
            images, prompts, budget: as in :meth:`prepare`.
            decode: ``"hf"`` calls ``model.generate(inputs_embeds=..., attention_mask=..., **generate_kwargs)``
                (greedy, sampling, anything transformers offers); ``"graphed"`` runs a static KV cache and a
                CUDA-graphed decode step (:class:`arrcoc.integrations.decode.GraphedDecoder`; ``max_new_tokens``,
                ``do_sample``, ``temperature``, ``eos_token_id`` only).
        """
        prepared = self.prepare(images, prompts, budget)
        if decode == "hf":
            return self.model.generate(
                inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **generate_kwargs
            )
        if decode == "graphed":
            return self.decoder.generate(prepared.inputs_embeds, prepared.attention_mask, **generate_kwargs)
        raise InvalidInputError(f"decode must be 'hf' or 'graphed'; got {decode!r}")

    @property
    def decoder(self) -> GraphedDecoder:
        """The :class:`arrcoc.integrations.decode.GraphedDecoder` over this model's language model (built on first use)."""
        if self._decoder is None:
            self._decoder = GraphedDecoder.from_llava(self.model)
        return self._decoder


def _fill_slots(embeds: Tensor, slots: Tensor, tokens: Tensor) -> Tensor:
    """Write ``tokens`` ``(B, K, H)`` into the ``K`` True slots of each row of ``slots`` ``(B, T)``, in order."""
    b, k, h = tokens.shape
    # Every row holds exactly K slots, so the k-th True of a row takes token k: no host read needed.
    order = torch.sort(slots.long(), dim=1, descending=True, stable=True).indices[:, :k]  # (B, K) slot columns
    return embeds.scatter(1, order[..., None].expand(b, k, h), tokens.to(embeds.dtype))


def _cls_attention(tower: nn.Module, states: tuple[Tensor, ...], layer: int, grid: tuple[int, int]) -> Tensor | None:
    """``(B, gh, gw)`` head-mean attention of [CLS] to each patch inside the layer that made ``states[layer]``.

    Recomputed from that layer's input with its own norm and q/k projections (CLIP-like encoders), so it works
    whatever attention kernel the tower runs; ``None`` where the tower has no such layer or no [CLS].
    """
    index = layer % len(states)
    layers = getattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers", None)
    if index == 0 or layers is None:
        return None
    block = layers[index - 1]
    attn = block.self_attn
    x = block.layer_norm1(states[index - 1])  # (B, 1 + N, D)
    heads = int(getattr(attn, "num_heads", 0) or tower.config.num_attention_heads)
    q = attn.q_proj(x[:, :1]).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, 1, hd)
    k = attn.k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, 1 + N, hd)
    weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    gh, gw = grid
    return weights.mean(1)[:, 0, -gh * gw :].unflatten(-1, (gh, gw))


class _Stop(Exception):
    """Raised by a forward pre-hook to stop the language model once the layer input is captured."""


def _text_to_image_attention(
    lm: nn.Module, index: int, embeds: Tensor, mask: Tensor, slots: Tensor, count: int
) -> Tensor:
    """``(B, count)`` head- and query-mean attention from text tokens after the image to the image slots.

    Runs the language model up to layer ``index`` (a pre-hook captures that layer's input and its rotary
    cos/sin, then stops the model), and recomputes the layer's attention weights from its own norm and q/k
    projections (Llama-family layers), so it works whatever attention kernel the model runs.
    """
    layers = lm.layers
    if not 0 <= index < len(layers):
        raise InvalidInputError(f"fastv_layer must be in [0, {len(layers)}); got {index}")
    captured: dict[str, Any] = {}

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs.get("position_embeddings")
        raise _Stop

    handle = layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    layer = layers[index]
    attn = layer.self_attn
    x = layer.input_layernorm(captured["x"])  # (B, T, H)
    hd = attn.head_dim
    q = attn.q_proj(x).unflatten(-1, (-1, hd)).transpose(1, 2)  # (B, h, T, hd)
    k = attn.k_proj(x).unflatten(-1, (-1, hd)).transpose(1, 2)  # (B, kv, T, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if captured["rope"] is not None:
        cos, sin = captured["rope"]  # (B, T, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * hd**-0.5  # (B, h, T, T)
    t = embeds.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
    allowed = (causal & mask.bool()[:, None, None, :]) | torch.eye(
        t, dtype=torch.bool, device=embeds.device
    )  # pads: self
    weights = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1).mean(1)  # (B, T, T)
    last_slot = torch.where(slots, torch.arange(t, device=slots.device), -1).amax(-1, keepdim=True)  # (B, 1)
    text = (torch.arange(t, device=slots.device) > last_slot) & mask.bool()  # (B, T) text after the image
    per_slot = (weights * text[..., None]).sum(1) / text.sum(-1, keepdim=True).clamp_min(1)  # (B, T)
    columns = torch.sort(slots.long(), dim=1, descending=True, stable=True).indices[:, :count]
    return per_slot.gather(1, columns)


# --- the command ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc generate",
        description="Answer a prompt about an image with a "
        "local Hugging Face LLaVA model that reads arrcoc's budgeted tokens.",
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("--prompt", required=True, help="the question (put into the template) or a full prompt")
    parser.add_argument("--model", required=True, help="local model folder (LlavaForConditionalGeneration + processor)")
    parser.add_argument("--budget", type=int, default=64, help="image tokens (default 64)")
    parser.add_argument("--method", default="arrcoc", help="reducer name (default arrcoc)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--graphed", action="store_true", help="static KV cache + CUDA-graphed decode step")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``arrcoc generate IMAGE --prompt ... --model PATH --budget N``: prints the answer; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    try:
        from pathlib import Path

        from PIL import Image

        from ..errors import ImageLoadError

        if not Path(args.model).is_dir():
            raise InvalidInputError(f"--model must be a local model folder; got {args.model!r}")
        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, ValueError) as err:
            raise ImageLoadError(f"cannot read image {args.image!r}: {err}") from err
        import transformers
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
        model = LlavaForConditionalGeneration.from_pretrained(args.model, **{key: dtype}).to(device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
        adapter = ArrcocLlava(model, processor, method=args.method)
        new = adapter.generate(
            [image],
            [args.prompt],
            budget=args.budget,
            max_new_tokens=args.max_new_tokens,
            decode="graphed" if args.graphed else "hf",
            do_sample=False,
        )
        print(adapter.tokenizer.decode(new[0], skip_special_tokens=True).strip())
        return 0
    except ArrcocError as err:
        print(f"arrcoc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
