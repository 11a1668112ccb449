"""Hugging Face VLMs reading arrcoc's tokens: one entry point, :func:`wrap`, that picks the adapter.

``wrap(model, processor, method="arrcoc", budget=0.25)`` returns :class:`~arrcoc.integrations.qwen.ArrcocQwen` for
Qwen2-VL / Qwen2.5-VL / Qwen3-VL and :class:`~arrcoc.integrations.hf.ArrcocLlava` for LLaVA-1.5-style models; both
have ``prepare``, ``forward`` and ``generate``. The adapters' modules' public names are re-exported here, so
``arrcoc.hf.ArrcocLlava`` keeps working. :func:`pack_vision_tower` runs a Qwen-VL vision tower with one
attention call per layer (where flash-attn is not installed), its patch embedding as one matrix product, its gated
MLPs at an aligned width and, with ``compile=True``, its blocks compiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import BudgetError, InvalidTypeError
from .integrations.hf import ArrcocLlava, Prepared, main, raster_order, word_tokenizer
from .integrations.qwen import QWEN_MODEL_TYPES, ArrcocQwen, QwenPrepared
from .integrations.vision_tower import pack_vision_tower, unpack_vision_tower

__all__ = [
    "wrap",
    "ArrcocLlava",
    "ArrcocQwen",
    "Prepared",
    "QwenPrepared",
    "pack_vision_tower",
    "unpack_vision_tower",
    "raster_order",
    "word_tokenizer",
    "main",
]


class _BudgetedLlava(ArrcocLlava):
    """An :class:`ArrcocLlava` whose calls default to the budget given to :func:`wrap` (a count or a share)."""

    def __init__(self, model: Any, processor: Any, budget: int | float, **kwargs: Any) -> None:
        super().__init__(model, processor, **kwargs)
        self.default_budget = self._count(budget)

    def _count(self, budget: int | float | None) -> int:
        if budget is None:
            return self.default_budget
        if isinstance(budget, float) and not isinstance(budget, bool):
            if not 0 < budget <= 1:
                raise BudgetError(f"a budget share must lie in (0, 1]; got {budget}")
            return max(1 + int(self.keeps_cls), round(budget * self.full_tokens))
        return budget

    def prepare(self, images: Any, prompts: str | Sequence[str], budget: int | float | None = None) -> Prepared:
        return super().prepare(images, prompts, self._count(budget))

    def forward(
        self, images: Any, prompts: str | Sequence[str], budget: int | float | None = None, **kwargs: Any
    ) -> Any:
        return super().forward(images, prompts, self._count(budget), **kwargs)

    def generate(
        self, images: Any, prompts: str | Sequence[str], budget: int | float | None = None, **kwargs: Any
    ) -> Any:
        return super().generate(images, prompts, self._count(budget), **kwargs)


def wrap(
    model: Any, processor: Any, method: str = "arrcoc", budget: int | float | None = None, **kwargs: Any
) -> ArrcocQwen | ArrcocLlava:
    """The arrcoc adapter for ``model``, chosen from its ``config.model_type``.

    Args:
        model: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL or LLaVA ``...ForConditionalGeneration``.
        processor: its processor (or a tokenizer alone; images must then be the model's pixel inputs).
        method: a registered reducer name.
        budget: the default budget of every call: an ``int`` counts tokens per image, a ``float`` in ``(0, 1]`` is a
            share of each image's tokens. LLaVA without one takes the budget on each call, as ``ArrcocLlava`` does.
        **kwargs: passed to the adapter.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in QWEN_MODEL_TYPES:
        return ArrcocQwen(model, processor, method=method, budget=budget, **kwargs)
    if model_type == "llava":
        if budget is None:
            return ArrcocLlava(model, processor, method=method, **kwargs)
        return _BudgetedLlava(model, processor, budget, method=method, **kwargs)
    raise InvalidTypeError(
        f"no arrcoc adapter for {type(model).__name__} (model_type {model_type!r}); covered: "
        f"{sorted(QWEN_MODEL_TYPES | {'llava'})}"
    )
