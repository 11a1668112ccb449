"""Typed, validated configuration of a pipeline, with named presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, InvalidTypeError

__all__ = ["BalanceConfig", "PipelineConfig", "SCORER_NAMES", "PICK_METHODS", "DEFAULT_WEIGHTS_DIR"]

#: The three relevance scorers, in the order their maps are stacked everywhere.
SCORER_NAMES: tuple[str, ...] = ("propositional", "perspectival", "participatory")

#: How ``BalanceConfig.pick`` chooses an image's patches without a question (``"off"``: it does not).
PICK_METHODS: tuple[str, ...] = ("off", "novelty", "maxmin", "peaks")

CONFIG_VERSION = 1


def _shipped_weights() -> Path:
    """The shipped weights: ``arrcoc/weights/`` in an installed wheel, the top-level ``weights/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "weights", here.parent / "weights"):
        if (folder / "config.json").is_file():
            return folder
    return here / "weights"


#: The embedded default: the trained encoder, text query encoder and small VLM the project ships.
DEFAULT_WEIGHTS_DIR = _shipped_weights()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidInputError(message)


def _number(value: Any, name: str) -> float:
    """A real number (not a bool), as float; anything else is an ``InvalidTypeError`` naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    return float(value)


def _whole(value: Any, name: str, optional: bool = False) -> int | None:
    """A whole number (not a bool), or ``None`` where ``optional``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "a whole number or None" if optional else "a whole number"
        raise InvalidTypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    return int(value)


def _numbers(value: Any, name: str, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidTypeError(f"{name} must be a sequence of {length} numbers; got {value!r}")
    _check(len(value) == length, f"{name} must hold {length} numbers; got {len(value)}: {value!r}")
    return tuple(_number(v, f"{name}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class BalanceConfig:
    """Opponent processing: how the three relevance maps become one.

    Attributes:
        weights: base weight of each scorer, in ``SCORER_NAMES`` order. The participatory weight is used
            only for images that have a query; the weights actually used are reported per image.
        exploit: exploit <-> explore, in [0, 1]. 1 concentrates tokens on the peaks of relevance (low
            softmax temperature), 0 spreads them (high temperature). Scaled per image by how much the
            scorers agree: agreement earns exploitation.
        scarcity: how the budget moves exploit <-> explore: ``exploit`` grows by ``scarcity`` each time the
            budget halves below an eighth of the image's patches (and shrinks likewise above it), so a scarce
            budget concentrates on the peaks and a generous one spreads. 0 ignores the budget.
        diversify: focus <-> diversify, in [0, 1]. How much a region's relevance is discounted when it is
            similar to a more relevant region (redundancy), so near-duplicates do not all get tokens.
        particularize: compress <-> particularize, in [0, 1]. 0 gives every region the same share (uniform
            pooling); 1 follows relevance fully, allowing the most uneven allocation.
        temperature_range: softmax temperature at full exploitation and at full exploration, on relevance
            normalised to [0, 1].
        cover: for images without a question only, in [0, 1]: the share of the relevance that follows how many
            distinct things each region holds (``arrcoc.stages.balance.novelty``), linearly, instead of the
            scorers' peaks. 0 treats images without a question like the others.
        query_cover: for images with a question, in [0, 1]: the share of the relevance that follows the same cover
            (novelty, or the pick), a hedge against a question whose words do not point at its evidence. 0 (the
            default) lets the scorers' balance decide alone.
        pick: for images without a question, given a budget, how the image's ``budget`` patches are picked
            (``arrcoc.stages.balance.pick_patches``): ``"maxmin"`` (the default) greedily the farthest from those
            kept, ``"peaks"`` the same after the peaks of a learned objectness probe (``pick_peaks``), ``"novelty"``
            the most novel, ``"off"`` none (the cover then sums novelty per region). With a pick the cover counts
            the picked patches per region, and compression shows them (with ``cover`` 1, exactly them). ``"peaks"``
            needs the probe trained on the encoder's own features (``weights/objectness.safetensors`` for the
            shipped encoder, ``arrcoc.stages.objectness``); any other encoder is refused.
        pick_salience: in [0, 1], how much the query-free scorers' map weights each candidate's pick score
            (``1 - pick_salience + pick_salience * salience``); 0 picks by distinctness alone.
        pick_colour: non-negative, weight of the patches' Lab colour distance beside their feature distance
            (``"maxmin"``), so that colour differences count.
        pick_spatial: non-negative, weight of the patches' distance on the grid (in units of its longer side)
            added to their feature distance (``"maxmin"``), so that alike objects in different places both count;
            0 (off) by default: it trades text answers for count answers (docs/decisions.md).
        pick_peaks: in [0, 1], for ``pick="peaks"``: the objectness above which a 3x3 local maximum of the probe's
            map is picked first (in max-min order among the peaks), before max-min fills the budget.
        pick_frame: for ``"maxmin"`` and ``"peaks"``: keep an artificial border's patches (a constant fill reaching
            in from the image's edge, such as a fundus photo's black mask, and its rim;
            ``arrcoc.stages.balance.frame_patches``) until every other patch is kept. Images without such a
            fill, the generated world's among them, pick the same either way.
    """

    # Each default was chosen on validation seeds of the generated world; the figures: docs/decisions.md.
    weights: tuple[float, float, float] = (1.0, 1.0, 8.0)  # with a question, the participatory map leads
    exploit: float = 0.6  # chosen with PipelineConfig.query_detail
    scarcity: float = 0.2
    diversify: float = 0.0  # near-duplicate regions of one object (a label's glyphs) are what small budgets need
    particularize: float = 0.9
    temperature_range: tuple[float, float] = (0.15, 2.0)
    cover: float = 1.0
    query_cover: float = 0.0  # a hedge with a question read less on validation seeds at 224 px
    pick: str = "maxmin"  # without a question: greedy max-min, level with DivPrune on validation seeds
    pick_salience: float = 0.0
    pick_colour: float = 0.5
    pick_spatial: float = 0.0
    pick_peaks: float = 0.3  # bench/results/validation/peaks-noquery-cpu-224-seed700000.md (peaks-best-0.3)
    pick_frame: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _numbers(self.weights, "balance.weights", 3))
        object.__setattr__(self, "temperature_range", _numbers(self.temperature_range, "balance.temperature_range", 2))
        _check(
            all(0 <= w < float("inf") for w in self.weights) and sum(self.weights) > 0,
            f"balance.weights must be 3 finite non-negative numbers with a positive sum; got {self.weights}",
        )
        if not isinstance(self.pick_frame, bool):
            raise InvalidTypeError(f"balance.pick_frame must be True or False; got {self.pick_frame!r}")
        if not isinstance(self.pick, str):
            raise InvalidTypeError(f"balance.pick must be a string; got {self.pick!r}")
        _check(self.pick in PICK_METHODS, f"balance.pick must be one of {PICK_METHODS}; got {self.pick!r}")
        for name in ("pick_colour", "pick_spatial"):
            value = _number(getattr(self, name), f"balance.{name}")
            _check(0.0 <= value < float("inf"), f"balance.{name} must be finite and >= 0; got {value}")
            object.__setattr__(self, name, value)
        for name in (
            "exploit",
            "scarcity",
            "diversify",
            "particularize",
            "cover",
            "query_cover",
            "pick_salience",
            "pick_peaks",
        ):
            value = _number(getattr(self, name), f"balance.{name}")
            _check(0.0 <= value <= 1.0, f"balance.{name} must be in [0, 1]; got {value}")
            object.__setattr__(self, name, value)
        low, high = self.temperature_range
        _check(
            0 < low <= high < float("inf"),
            f"balance.temperature_range must be 0 < low <= high, finite; got {self.temperature_range}",
        )


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a pipeline, apart from weights.

    Attributes:
        encoder: a timm model name; any ViT or ConvNet that yields a spatial grid.
        encoder_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``{"depth": 2}``).
        buckets: square input sizes; each image goes to the smallest that holds its long side.
        region_size: side of a region, in patches; allocation hands out tokens per region.
        min_tokens: tokens every region with image content gets (when the budget allows one per region). The
            default 0 lets allocation skip the least relevant regions: on the generated benchmark it read
            1.4 points more at 11% of the tokens than 1 (run-9 weights, 224 px, 600 questions) and the same
            at 33% and 5.5%.
        max_tokens: most tokens a region may get; ``None`` means all of its patches (full detail).
        query_detail: in [0, 1], how much the query's coupling, against distinctness, picks the patches a
            region given fewer tokens than patches shows (``arrcoc.stages.compression``); 0 ignores the query there.
        novelty_detail: in [0, 1], for images without a question: how much each patch's novelty
            (``arrcoc.stages.balance.novelty``), against distinctness, picks the patches a region shows; 0 (the
            default) keeps distinctness alone.
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
    min_tokens: int = 0
    max_tokens: int | None = None
    # chosen with balance.exploit on two validation seed ranges: docs/decisions.md, bench/results/validation/
    query_detail: float = 0.5
    novelty_detail: float = 0.0
    token_capacity: int | None = None
    encoder_dtype: str = "float32"
    seed: int = 0
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.balance, dict):
            object.__setattr__(self, "balance", _balance_from_dict(self.balance))
        if not isinstance(self.balance, BalanceConfig):
            raise InvalidTypeError(
                f"balance must be a BalanceConfig or a dict of its fields; got {type(self.balance).__name__}"
            )
        if isinstance(self.buckets, (str, bytes)) or not isinstance(self.buckets, (list, tuple)):
            raise InvalidTypeError(f"buckets must be a sequence of whole numbers; got {self.buckets!r}")
        buckets = [_whole(b, f"buckets[{i}]") for i, b in enumerate(self.buckets)]
        object.__setattr__(self, "buckets", tuple(sorted(set(buckets))))  # type: ignore[arg-type]
        if not isinstance(self.encoder_kwargs, dict) or not all(isinstance(k, str) for k in self.encoder_kwargs):
            raise InvalidTypeError(f"encoder_kwargs must be a dict with string keys; got {self.encoder_kwargs!r}")
        object.__setattr__(self, "encoder_kwargs", dict(self.encoder_kwargs))
        for name in ("region_size", "min_tokens", "seed", "version"):
            object.__setattr__(self, name, _whole(getattr(self, name), name))
        for name in ("max_tokens", "token_capacity"):
            object.__setattr__(self, name, _whole(getattr(self, name), name, optional=True))
        if not isinstance(self.encoder_dtype, str):
            raise InvalidTypeError(f"encoder_dtype must be a string; got {self.encoder_dtype!r}")
        _check(
            isinstance(self.encoder, str) and bool(self.encoder),
            f"encoder must be a timm model name; got {self.encoder!r}",
        )
        _check(
            len(self.buckets) > 0 and all(b > 0 for b in self.buckets),
            f"buckets must be positive sizes; got {self.buckets}",
        )
        _check(self.region_size >= 1, f"region_size must be >= 1 patch; got {self.region_size}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0; got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(
                self.max_tokens >= max(1, self.min_tokens),
                f"max_tokens must be >= max(1, min_tokens={self.min_tokens}); got {self.max_tokens}",
            )
            _check(
                self.max_tokens <= self.region_size**2,
                f"max_tokens must be <= region_size**2 = {self.region_size**2} patches; got {self.max_tokens}",
            )
        object.__setattr__(self, "query_detail", _number(self.query_detail, "query_detail"))
        _check(0.0 <= self.query_detail <= 1.0, f"query_detail must be in [0, 1]; got {self.query_detail}")
        object.__setattr__(self, "novelty_detail", _number(self.novelty_detail, "novelty_detail"))
        _check(0.0 <= self.novelty_detail <= 1.0, f"novelty_detail must be in [0, 1]; got {self.novelty_detail}")
        if self.token_capacity is not None:
            _check(self.token_capacity >= 1, f"token_capacity must be >= 1; got {self.token_capacity}")
        _check(
            self.encoder_dtype in ("float32", "bfloat16", "float16"),
            f"encoder_dtype must be 'float32', 'bfloat16' or 'float16'; got {self.encoder_dtype!r}",
        )
        _check(
            self.version == CONFIG_VERSION, f"config version {self.version} is not supported (this is {CONFIG_VERSION})"
        )

    # --- presets and serialisation -------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> PipelineConfig:
        """A named preset (``"default"``, ``"tiny"``), with any field overridden."""
        if name not in _PRESETS:
            raise InvalidInputError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return _PRESETS[name].replace(**overrides)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidInputError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """A config from a dict of its fields (as :meth:`to_dict` writes); unknown fields are an error."""
        if not isinstance(data, dict):
            raise InvalidTypeError(f"config must be a JSON object / dict of fields; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """A config from the JSON :meth:`to_json` writes."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise InvalidInputError(f"config JSON cannot be read: {err}") from err
        return cls.from_dict(data)


def _balance_from_dict(data: dict[str, Any]) -> BalanceConfig:
    known = {f.name for f in dataclasses.fields(BalanceConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInputError(f"unknown balance fields {unknown}; known fields are {sorted(known)}")
    return BalanceConfig(**data)


_PRESETS: dict[str, PipelineConfig] = {
    # A small ViT at patch 16: the embedded default.
    "default": PipelineConfig(),
    # Two transformer blocks of ViT-Tiny: the same code paths at a fraction of the cost, for tests and CI.
    "tiny": PipelineConfig(encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 2}),
}
