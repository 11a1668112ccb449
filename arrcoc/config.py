"""Typed, validated configuration of a pipeline, with named presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError

__all__ = ["BalanceConfig", "PipelineConfig", "SCORER_NAMES"]

#: The three relevance scorers, in the order their maps are stacked everywhere.
SCORER_NAMES: tuple[str, ...] = ("propositional", "perspectival", "participatory")

CONFIG_VERSION = 1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidInputError(message)


@dataclass(frozen=True)
class BalanceConfig:
    """Opponent processing: how the three relevance maps become one.

    Attributes:
        weights: base weight of each scorer, in ``SCORER_NAMES`` order. The participatory weight is used
            only for images that have a query; the weights actually used are reported per image.
        exploit: exploit <-> explore, in [0, 1]. 1 concentrates tokens on the peaks of relevance (low
            softmax temperature), 0 spreads them (high temperature). Scaled per image by how much the
            scorers agree: agreement earns exploitation.
        diversify: focus <-> diversify, in [0, 1]. How much a region's relevance is discounted when it is
            similar to a more relevant region (redundancy), so near-duplicates do not all get tokens.
        particularize: compress <-> particularize, in [0, 1]. 0 gives every region the same share (uniform
            pooling); 1 follows relevance fully, allowing the most uneven allocation.
        temperature_range: softmax temperature at full exploitation and at full exploration, on relevance
            normalised to [0, 1].
    """

    weights: tuple[float, float, float] = (1.0, 1.0, 2.0)
    exploit: float = 0.5
    diversify: float = 0.3
    particularize: float = 0.8
    temperature_range: tuple[float, float] = (0.15, 2.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "temperature_range", tuple(float(t) for t in self.temperature_range))
        _check(len(self.weights) == 3 and all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
               f"balance.weights must be 3 non-negative numbers with a positive sum; got {self.weights}")
        for name in ("exploit", "diversify", "particularize"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"balance.{name} must be in [0, 1]; got {value}")
        low, high = self.temperature_range
        _check(0 < low <= high, f"balance.temperature_range must be 0 < low <= high; got {self.temperature_range}")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a pipeline, apart from weights.

    Attributes:
        encoder: a timm model name; any ViT or ConvNet that yields a spatial grid.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``{"depth": 2}``).
        buckets: square input sizes; each image goes to the smallest that holds its long side.
        region_size: side of a region, in patches; allocation hands out tokens per region.
        min_tokens: tokens every region with image content gets (when the budget allows one per region).
        max_tokens: most tokens a region may get; ``None`` means all of its patches (full detail).
        token_capacity: the fixed token dimension ``T`` of the output; ``None`` uses the largest budget of
            the call. Budgets may not exceed it.
        encoder_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; scoring always runs in float32.
        seed: seed for the deterministic initialisation of untrained weights.
        balance: opponent-processing settings.
    """

    encoder: str = "vit_small_patch16_224"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    buckets: tuple[int, ...] = (224, 384, 512, 768, 1024)
    region_size: int = 4
    min_tokens: int = 1
    max_tokens: int | None = None
    token_capacity: int | None = None
    encoder_dtype: str = "float32"
    seed: int = 0
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.balance, dict):
            object.__setattr__(self, "balance", BalanceConfig(**self.balance))
        object.__setattr__(self, "buckets", tuple(sorted(set(int(b) for b in self.buckets))))
        object.__setattr__(self, "encoder_kwargs", dict(self.encoder_kwargs))
        _check(isinstance(self.encoder, str) and bool(self.encoder), f"encoder must be a timm model name; got {self.encoder!r}")
        _check(len(self.buckets) > 0 and all(b > 0 for b in self.buckets), f"buckets must be positive sizes; got {self.buckets}")
        _check(self.region_size >= 1, f"region_size must be >= 1 patch; got {self.region_size}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0; got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.max_tokens >= max(1, self.min_tokens),
                   f"max_tokens must be >= max(1, min_tokens={self.min_tokens}); got {self.max_tokens}")
            _check(self.max_tokens <= self.region_size**2,
                   f"max_tokens must be <= region_size**2 = {self.region_size**2} patches; got {self.max_tokens}")
        if self.token_capacity is not None:
            _check(self.token_capacity >= 1, f"token_capacity must be >= 1; got {self.token_capacity}")
        _check(self.encoder_dtype in ("float32", "bfloat16", "float16"),
               f"encoder_dtype must be 'float32', 'bfloat16' or 'float16'; got {self.encoder_dtype!r}")
        _check(self.version == CONFIG_VERSION, f"config version {self.version} is not supported (this is {CONFIG_VERSION})")

    # --- presets and serialisation -------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> PipelineConfig:
        """A named preset (``"default"``, ``"tiny"``), with any field overridden."""
        if name not in _PRESETS:
            raise InvalidInputError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        if "balance" in data:
            data["balance"] = BalanceConfig(**data["balance"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        return cls.from_dict(json.loads(text))


_PRESETS: dict[str, PipelineConfig] = {
    # A small ViT at patch 16: the embedded default.
    "default": PipelineConfig(),
    # Two transformer blocks of ViT-Tiny: the same code paths at a fraction of the cost, for tests and CI.
    "tiny": PipelineConfig(encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 2}),
}
