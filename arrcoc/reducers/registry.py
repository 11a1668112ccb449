"""Token reducers: a grid of visual features -> exactly ``K`` tokens, behind one interface and a registry.

A reducer turns the patch features of any vision tower (arrcoc's own encoder, or a Hugging Face VLM's) into
the ``K`` tokens a language model reads. arrcoc's relevance path is one reducer; the public methods it is
compared with (``arrcoc.reducers.baselines``) are others. They share one signature,

    reducer(visual: VisualInput, budget: int) -> ReducedTokens

so the generation adapter, the evaluation and the benchmarks take any of them by name (``method=``). The
budget is a Python int because it fixes the output shape ``(B, K, D)``; everything else is a tensor, and a
reducer never reads tensor values on the host (it can be captured as a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import BudgetError, InvalidInputError, InvalidTypeError

__all__ = [
    "VisualInput",
    "ReducedTokens",
    "Reducer",
    "REDUCERS",
    "register_reducer",
    "create_reducer",
    "list_reducers",
    "check_budget",
    "check_visual",
]


@dataclass
class VisualInput:
    """What a reducer may read about a batch of images. Only ``features`` is required.

    Attributes:
        features: ``(B, gh, gw, D)`` patch features on the grid.
        patch_valid: ``(B, gh, gw)`` share of each patch that is image (``None``: every patch is image).
        pixels: ``(B, 3, S, S)`` RGB in [0, 1], ``S`` a multiple of ``gh`` and ``gw`` (texture for arrcoc's
            weight-free scorers; ``None``: feature statistics only).
        valid: ``(B, 1, S, S)`` 1 on image pixels (``None``: all image).
        query: ``(B, L, D)`` query tokens in the feature space (``None``: no query).
        query_mask: ``(B, L)`` bool, True on real query tokens.
        cls_attention: ``(B, gh, gw)`` attention of the vision tower's [CLS] token to each patch.
        text_attention: ``(B, gh, gw)`` attention from the prompt's text tokens to each image token at an
            early language-model layer.
    """

    features: Tensor
    patch_valid: Tensor | None = None
    pixels: Tensor | None = None
    valid: Tensor | None = None
    query: Tensor | None = None
    query_mask: Tensor | None = None
    cls_attention: Tensor | None = None
    text_attention: Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])

    def valid_patches(self) -> Tensor:
        """``(B, gh, gw)`` patch validity, all ones when none was given."""
        if self.patch_valid is not None:
            return self.patch_valid
        return self.features.new_ones(self.features.shape[:3])


@dataclass
class ReducedTokens:
    """A reducer's output: exactly ``K`` tokens per image, in the order the language model reads them.

    Attributes:
        tokens: ``(B, K, D)``.
        positions: ``(B, K, 4)`` int64 ``(row, col, height, width)`` of each token's pooled area, in patches.
        weights: ``(B, K)`` float, patches pooled into each token (1 for a kept patch).
        relevance: ``(B, rh, rw)`` or ``(B, gh, gw)`` map the reducer followed, where it has one.
        allocation: ``(B, rh, rw)`` int64 tokens per region, where the reducer allocates per region.
    """

    tokens: Tensor
    positions: Tensor
    weights: Tensor
    relevance: Tensor | None = None
    allocation: Tensor | None = None


class Reducer(Protocol):
    """``reducer(visual, budget) -> ReducedTokens`` with exactly ``budget`` tokens per image.

    ``needs`` names the optional fields of :class:`VisualInput` the reducer reads (for example
    ``{"cls_attention"}``); a caller fills those it can, and a reducer raises ``InvalidInputError`` naming the
    field when one it cannot do without is missing.
    """

    needs: frozenset[str]

    def __call__(self, visual: VisualInput, budget: int) -> ReducedTokens: ...


#: name -> factory; ``create_reducer(name, **kwargs)`` calls the factory.
REDUCERS: dict[str, Callable[..., Reducer]] = {}


def register_reducer(name: str) -> Callable[[Callable[..., Reducer]], Callable[..., Reducer]]:
    """Decorator: make a reducer factory (a class or function) available as ``create_reducer(name)``."""

    def add(factory: Callable[..., Reducer]) -> Callable[..., Reducer]:
        if name in REDUCERS:
            raise InvalidInputError(f"a reducer named {name!r} is already registered")
        REDUCERS[name] = factory
        return factory

    return add


def _load_registrations() -> None:
    from . import arrcoc, baselines  # noqa: F401  (each registers its reducers on import)


def list_reducers() -> list[str]:
    """Names of every registered reducer (arrcoc's variants and the baselines)."""
    _load_registrations()
    return sorted(REDUCERS)


def create_reducer(name: str, **kwargs: Any) -> Reducer:
    """Build a registered reducer by name, e.g. ``create_reducer("arrcoc")`` or ``create_reducer("tome")``."""
    if name not in REDUCERS:
        _load_registrations()
    if name not in REDUCERS:
        raise InvalidInputError(f"unknown reducer {name!r}; registered: {sorted(REDUCERS)}")
    return REDUCERS[name](**kwargs)


#: Largest feature magnitude reducers accept: the scorers' second moments (sums of squares over up to a few
#: thousand channels) must stay inside float32.
FEATURE_LIMIT = 1e15


def _capturing(tensor: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s device (a host query: no sync)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_visual(visual: VisualInput, values: bool = True) -> None:
    """Host-side check shared by reducers: shapes and dtypes of every given field, and finite features.

    The value check (finite features of usable magnitude) reads one flag from the device; it is skipped while a CUDA graph is
    being captured, where the caller validated the inputs it copies into the graph, and with ``values=False``, where
    the caller made the features itself (a model's own tower) and waiting for them would stall its launches.

    Raises:
        InvalidTypeError: ``features`` is not a floating-point tensor.
        InvalidInputError: a field has the wrong shape, or ``features`` holds NaN, infinite or overflowing values.
    """
    if not isinstance(visual, VisualInput):
        raise InvalidTypeError(f"visual must be an arrcoc.reducers.VisualInput; got {type(visual).__name__}")
    features = visual.features
    if not isinstance(features, Tensor) or not features.is_floating_point():
        given = features.dtype if isinstance(features, Tensor) else type(features).__name__
        raise InvalidTypeError(f"visual.features must be a floating-point tensor (B, gh, gw, D); got {given}")
    if features.ndim != 4 or 0 in features.shape:
        raise InvalidInputError(
            f"visual.features must have shape (B, gh, gw, D), none of them 0; got {tuple(features.shape)}"
        )
    b, gh, gw, d = features.shape
    expected = {"patch_valid": (b, gh, gw), "cls_attention": (b, gh, gw), "text_attention": (b, gh, gw)}
    for name, shape in expected.items():
        value = getattr(visual, name)
        if value is not None and tuple(value.shape) != shape:
            raise InvalidInputError(f"visual.{name} must have shape {shape}; got {tuple(value.shape)}")
    if visual.pixels is not None:
        pixels = visual.pixels
        if pixels.ndim != 4 or pixels.shape[:2] != (b, 3) or pixels.shape[2] % gh or pixels.shape[3] % gw:
            raise InvalidInputError(
                f"visual.pixels must have shape ({b}, 3, S, S') with S a multiple of {gh} and S' of "
                f"{gw}; got {tuple(pixels.shape)}"
            )
    if visual.query is not None:
        query = visual.query
        if query.ndim != 3 or query.shape[0] not in (1, b) or query.shape[2] != d:
            raise InvalidInputError(f"visual.query must have shape (1 or {b}, L, {d}); got {tuple(query.shape)}")
        mask = visual.query_mask
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (query.shape[0], query.shape[1])):
            raise InvalidInputError(
                f"visual.query_mask must be bool of shape {tuple(query.shape[:2])}; got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
    if values and not _capturing(features):
        usable = torch.isfinite(features) & (features.abs() <= FEATURE_LIMIT)
        if not bool(usable.all()):  # ok-sync: validation, outside capture
            raise InvalidInputError(
                f"visual.features hold NaN, infinite or overflowing values (|x| > {FEATURE_LIMIT:g}: "
                "their squares overflow float32 statistics); rescale the features"
            )


def check_budget(visual: VisualInput, budget: int) -> None:
    """Host-side check shared by reducers: ``budget`` is a whole number in ``[1, gh * gw]``, and no image has
    fewer real patches (``patch_valid > 0``) than the budget: a token never stands for padding.

    The real-patch count reads one number per image from the device; it is skipped while a CUDA graph is being
    captured, where the caller validated the inputs it copies into the graph.
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise BudgetError(f"budget must be a whole number of tokens; got {budget!r} ({type(budget).__name__})")
    gh, gw = visual.grid
    if not 1 <= budget <= gh * gw:
        raise BudgetError(f"budget must be between 1 and the {gh}x{gw} = {gh * gw} patches; got {budget}")
    if visual.patch_valid is not None and not _capturing(visual.patch_valid):
        real = (visual.patch_valid > 0).flatten(1).sum(1).tolist()  # ok-sync: validation, outside capture
        short = [(i, n) for i, n in enumerate(real) if n < budget]
        if short:
            i, n = short[0]
            raise BudgetError(
                f"budget {budget} is above the {n} real patches of image {i} (the rest of its "
                f"{gh}x{gw} grid is padding); {len(short)} image(s) are short of it"
            )
