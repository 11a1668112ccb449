"""The host front end of a call: images, budgets and queries checked and made tensors; results made an output.

The only part of a call that reads Python values. ``Pipeline`` runs preprocess, then these checks, then the
chain (eagerly or as a graph), then :func:`build_output`.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SCORER_NAMES, PipelineConfig
from .errors import BudgetError, InvalidInputError, InvalidTypeError, MissingWeightsError
from .outputs import CompressionOutput, ScoreOutput
from .runtime.graphs import ChainResult, lazy_output
from .stages.preprocess import PreprocessedBatch
from .stages.regions import capacity_of

__all__ = [
    "BUDGET_POLICIES",
    "CAPACITY_STEP",
    "token_capacity",
    "prepare_query",
    "asks_every_image",
    "check_budgets",
    "budget_tensor",
    "build_output",
    "StageTimer",
    "UNTIMED",
]

#: What a budget above an image's real patches does: raise a BudgetError, or cap it at them.
BUDGET_POLICIES = ("exact", "cap")

#: Token capacities are rounded up to a multiple of this, so a new budget rarely means a new capture.
CAPACITY_STEP = 64


def token_capacity(budget: int) -> int:
    """The token capacity ``T`` that serves ``budget``: rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-budget // CAPACITY_STEP) * CAPACITY_STEP


_UNTIMED_CONTEXT = contextlib.nullcontext()


class StageTimer:
    """Wall time per stage in milliseconds; synchronises the device only when profiling is on."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.times: dict[str, float] = {}

    def __call__(self, stage: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(stage) if self.enabled else _UNTIMED_CONTEXT  # off: no generator per stage and call

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[stage] = self.times.get(stage, 0.0) + (time.perf_counter() - start) * 1e3


UNTIMED = StageTimer(False, torch.device("cpu"))  # profiling off: one shared timer that records nothing


def asks_every_image(query: Any, query_mask: Tensor | None) -> bool:
    """Whether ``query`` (as :func:`prepare_query` takes it) gives every image a question, known on the host:
    text (the text encoder's slots are all real) or an embedding with at least one token and no mask. A given
    mask is not read (that would sync with the device): such a call counts as not every image asked."""
    if isinstance(query, str):
        return True
    if isinstance(query, (list, tuple)):
        return bool(query) and all(isinstance(q, str) for q in query)
    if isinstance(query, Tensor) and query_mask is None:
        return query.ndim == 1 or (query.ndim in (2, 3) and query.shape[-2] > 0)
    return False


def prepare_query(
    query: Any,
    query_mask: Tensor | None,
    batch: int,
    width: int,
    device: torch.device,
    text_encoder: Callable[[Any], tuple[Tensor, Tensor]] | None,
) -> tuple[Tensor, Tensor]:
    """Normalise a query to ``(B, L, D)`` float32 plus a ``(B, L)`` bool mask of its real tokens.

    Args:
        query: ``None``; an embedding of width ``D`` shaped ``(D,)``, ``(L, D)`` or ``(B, L, D)``; or a
            string or list of strings (needs a trained text encoder). An empty embedding (``L = 0``)
            or one whose mask is all False is no query.
        query_mask: ``(L,)`` or ``(B, L)`` bool, True on real query tokens.
        batch: ``B``, the number of images.

    Raises:
        InvalidTypeError: a query or mask of the wrong type or dtype.
        InvalidInputError: a wrong shape or width, NaN or infinite values, a batch below 1.
        MissingWeightsError: a text query with no text encoder loaded.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidInputError(f"batch must be a whole number >= 1; got {batch!r}")
    if query is None:
        return torch.zeros(batch, 1, width, device=device), torch.zeros(batch, 1, dtype=torch.bool, device=device)
    if isinstance(query, str) or (
        isinstance(query, (list, tuple)) and query and all(isinstance(q, str) for q in query)
    ):
        if text_encoder is None:
            raise MissingWeightsError(
                "a text query needs a trained text encoder, and none is loaded: the embedded default ships "
                "no trained weights yet. Pass the query as an embedding tensor of width "
                f"{width} ((D,), (L, D) or (B, L, D)), or query=None for relevance without a query."
            )
        query, query_mask = text_encoder(query)
    query = dense_tensor(query, "query", f"None, a string, or a float tensor of width {width}")
    if query.is_complex() or not query.is_floating_point():
        raise InvalidTypeError(f"query must be a floating-point tensor; got dtype {query.dtype}")
    if query.ndim not in (1, 2, 3):
        raise InvalidInputError(f"query must have shape (D,), (L, D) or (B, L, D); got {tuple(query.shape)}")
    query = query.reshape((1,) * (3 - query.ndim) + tuple(query.shape))
    if query.shape[-1] != width:
        raise InvalidInputError(f"query embedding width must equal the encoder width {width}; got {query.shape[-1]}")
    if query.shape[0] not in (1, batch):
        raise InvalidInputError(f"query batch size must be 1 or the number of images {batch}; got {query.shape[0]}")
    tokens = query.shape[1]
    if query_mask is None:  # made where it is used: a copy from the host would sync with the device
        query_mask = torch.ones(query.shape[:2], dtype=torch.bool, device=device)
    else:
        query_mask = dense_tensor(query_mask, "query_mask", f"a bool tensor of shape (L,) or (B, L) with L = {tokens}")
        if (
            query_mask.dtype != torch.bool
            or query_mask.ndim not in (1, 2)
            or query_mask.shape[-1] != tokens
            or (query_mask.ndim == 2 and query_mask.shape[0] not in (1, batch))
        ):
            raise InvalidInputError(
                f"query_mask must be a bool tensor of shape (L,), (1, L) or ({batch}, L) with "
                f"L = {tokens}; got {query_mask.dtype} {tuple(query_mask.shape)}"
            )
    if tokens == 0:  # an empty query is no query
        return prepare_query(None, None, batch, width, device, text_encoder)
    query = query.to(device, torch.float32)  # check after the cast: a float64 1e300 is inf in float32
    if not bool(torch.isfinite(query).all()):  # ok-sync: host-side validation before the stages
        raise InvalidInputError("query embedding must be finite (in float32); it holds NaN or infinite values")
    return query.expand(batch, -1, -1), query_mask.reshape(-1, tokens).to(device).expand(batch, -1)


def check_budgets(
    budget: Any,
    groups: list[PreprocessedBatch],
    batch: int,
    grid_of: Callable[[int], tuple[int, int]],
    config: PipelineConfig,
    policy: str = "exact",
) -> tuple[list[int], int]:
    """Validate budgets on the host; returns one whole number per image and the token capacity ``T``.

    A budget is a whole number (``int`` or a numpy integer, not ``bool``), a sequence of them, or a 0-D/1-D
    integer tensor or array; one value serves every image. An image can yield at most its real patches
    (those its content touches; ``grid_of(bucket)`` gives a bucket's patch grid): above that, ``policy="exact"`` raises and ``"cap"`` lowers the budget.
    """
    if policy not in BUDGET_POLICIES:
        raise InvalidInputError(f"budget_policy must be one of {BUDGET_POLICIES}; got {policy!r}")
    values = [budget] * batch if type(budget) is int else budget_values(budget, batch)  # a plain int: no detours
    cfg = config
    for group in groups:
        grid = grid_of(group.bucket)
        patch = (group.bucket // grid[0], group.bucket // grid[1])
        for (height, width), i, name in zip(group.content_size.tolist(), group.indices, group.names):  # ok-sync: CPU
            rows, cols = -(-height // patch[0]), -(-width // patch[1])
            limit = capacity_of((rows, cols), cfg.region_size, cfg.max_tokens)
            if values[i] > limit and policy == "cap":
                values[i] = limit
            elif not 1 <= values[i] <= limit:
                raise BudgetError(
                    f"budget for {label(i, name)} must be between 1 and {limit}, the tokens its content can "
                    f"yield ({rows}x{cols} real patches of its {group.bucket}px bucket's {grid[0]}x{grid[1]}; "
                    f"a token never stands for padding); got {values[i]}. budget_policy='cap' caps it"
                )
    most = max(values)
    capacity = cfg.token_capacity or token_capacity(most)
    if most > capacity:
        raise BudgetError(f"budget {most} exceeds the configured token_capacity {capacity}")
    return values, capacity


def budget_tensor(budgets: list[int] | None, device: torch.device) -> Tensor | None:
    """``(B,)`` int64 budgets on ``device``; one shared by the batch is a fill on the device, which unlike a
    copy from the host does not wait for the device."""
    if budgets is None:
        return None
    if budgets.count(budgets[0]) == len(budgets):
        return torch.full((len(budgets),), budgets[0], dtype=torch.long, device=device)
    return torch.tensor(budgets, dtype=torch.long, device=device)


#: The chain's results an output reads.
RESULT_KEYS = ("scores", "relevance", "balance", "prefix", "allocation", "tokens", "positions", "mask", "weights")
#: Per-image facts of a call, from preprocessing (built together on the first read of any of them).
_INFO_FIELDS = ("region_grid", "patch_grid", "bucket", "scale", "source_size")
#: The output fields built on first read (the rest are set at once: names, region_size, timings).
_SCORE_FIELDS = frozenset(("scores", "relevance", "balance", *_INFO_FIELDS))
_COMPRESSION_FIELDS = _SCORE_FIELDS | {"tokens", "positions", "mask", "weights", "allocation", "prefix", "budget"}
#: The fields that view graph buffers: a zero-copy output checks them on every read.
_SCORE_CHECKED = _SCORE_FIELDS.intersection(RESULT_KEYS)
_COMPRESSION_CHECKED = _COMPRESSION_FIELDS.intersection(RESULT_KEYS)


def label(index: int, name: str) -> str:
    """How a message names image ``index``: ``image 3 (street.jpg)``; preprocessing already names non-files so."""
    return name if name.startswith(f"image {index} ") else f"image {index} ({name})"


def budget_values(budget: Any, batch: int) -> list[int]:
    """Any accepted form of a budget -> one whole number per image (not yet checked against the buckets)."""
    if isinstance(budget, (Tensor, np.ndarray)):
        kind = budget.dtype
        if (
            (budget.is_floating_point() or budget.is_complex() or kind == torch.bool)
            if isinstance(budget, Tensor)
            else kind.kind not in "iu"
        ):
            raise BudgetError(f"budget must hold whole numbers; got a {kind} {type(budget).__name__}")
        if budget.ndim > 1 or (isinstance(budget, Tensor) and budget.device.type == "meta"):
            raise BudgetError(
                f"budget must be a number or a 1-D sequence of one per image; got shape {tuple(budget.shape)}"
            )
        values = budget.reshape(-1).tolist()  # ok-sync: host-side validation before the stages
    elif isinstance(budget, Sequence) and not isinstance(budget, (str, bytes)):
        values = list(budget)
    else:
        values = [budget]
    for position, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            where = "" if len(values) == 1 else f" (value {position})"
            raise BudgetError(
                f"budget must be a positive whole number of tokens{where}; got {value!r} ({type(value).__name__})"
            )
    values = [int(v) for v in values]
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise BudgetError(f"budget must be one number or one per image ({batch}); got {len(values)} values")
    return values


class OutputSource:
    """Builds an output's fields on first read: results from the chain (or the merged buckets), the per-image
    facts from preprocessing, the budgets from the validated values."""

    __slots__ = ("results", "groups", "grids", "batch", "budgets", "_info")

    def __init__(
        self,
        results: Mapping[str, Any],
        groups: list[PreprocessedBatch],
        grids: Callable[[int], tuple[tuple[int, int], tuple[int, int]]],
        batch: int,
        budgets: list[int] | None,
    ) -> None:
        self.results, self.groups, self.grids, self.batch, self.budgets = results, groups, grids, batch, budgets
        self._info: dict[str, Tensor] | None = None

    def __call__(self, name: str) -> Any:
        results = self.results
        get = results.get_unchecked if isinstance(results, ChainResult) else results.__getitem__  # the output checks
        if name == "scores":
            return dict(zip(SCORER_NAMES, get("scores").unbind(1)))
        if name in _INFO_FIELDS:
            if self._info is None:
                self._info = self._image_info()
            return self._info[name]
        if name == "budget":
            return torch.tensor(self.budgets, dtype=torch.long)
        return get(name)

    def _image_info(self) -> dict[str, Tensor]:
        """Region and patch grids, bucket, scale and source size of every image, in the caller's order (CPU)."""
        region, patch, bucket = [(0, 0)] * self.batch, [(0, 0)] * self.batch, [0] * self.batch
        scale, source = [0.0] * self.batch, [[0, 0]] * self.batch
        for group in self.groups:
            sizes, scales = group.source_size.tolist(), group.scale.tolist()  # ok-sync: CPU tensors
            regions, patches = self.grids(group.bucket)
            for row, i in enumerate(group.indices):
                region[i], patch[i], bucket[i] = regions, patches, group.bucket
                scale[i], source[i] = scales[row], sizes[row]
        return {
            "region_grid": torch.tensor(region, dtype=torch.long),
            "patch_grid": torch.tensor(patch, dtype=torch.long),
            "bucket": torch.tensor(bucket, dtype=torch.long),
            "scale": torch.tensor(scale, dtype=torch.float32),
            "source_size": torch.tensor(source, dtype=torch.long),
        }


def scatter_into(
    merged: dict[str, Any], result: dict[str, Any], index: Tensor, batch: int, region_shape: tuple[int, int]
) -> None:
    """Write one bucket's results into the whole call's tensors, padding region grids to ``region_shape``."""
    for key, value in result.items():
        if isinstance(value, dict):
            scatter_into(merged.setdefault(key, {}), value, index, batch, region_shape)
            continue
        if key in ("scores", "relevance", "allocation", "redundancy"):
            pad_h, pad_w = region_shape[0] - value.shape[-2], region_shape[1] - value.shape[-1]
            value = F.pad(value, (0, pad_w, 0, pad_h))
        if key == "prefix" and key in merged and merged[key].shape[1] != value.shape[1]:
            raise InvalidInputError("prefix token counts differ between buckets")
        if key not in merged:
            merged[key] = value.new_zeros((batch, *value.shape[1:]))
        merged[key][index] = value


def dense_tensor(value: Any, name: str, expected: str) -> Tensor:
    """``value`` if it is a dense tensor holding data, else an error naming ``name`` and ``expected``."""
    if not isinstance(value, Tensor):
        raise InvalidTypeError(f"{name} must be {expected}; got {type(value).__name__}")
    if value.layout != torch.strided or value.device.type == "meta":
        raise InvalidTypeError(
            f"{name} must be a dense tensor holding data; got layout {value.layout} on {value.device}"
        )
    return value


def build_output(
    merged: Mapping[str, Any],
    groups: list[PreprocessedBatch],
    grids: Callable[[int], tuple[tuple[int, int], tuple[int, int]]],
    batch: int,
    budgets: list[int] | None,
    names: list[str],
    region_size: int,
    timings: dict[str, float],
) -> ScoreOutput:
    """The call's output; its tensors are built when first read (most callers read a few of its 17 results)."""
    source = OutputSource(merged, groups, grids, batch, budgets)
    values = {"names": names, "region_size": region_size, "timings": timings}
    if budgets is None:
        cls, lazy, checked = ScoreOutput, _SCORE_FIELDS, _SCORE_CHECKED
    else:
        cls, lazy, checked = CompressionOutput, _COMPRESSION_FIELDS, _COMPRESSION_CHECKED
    if isinstance(merged, ChainResult) and not merged.owned:  # zero-copy: reads check the entry's generation
        return lazy_output(cls, values, source, lazy, check=merged.check, checked=checked)
    return lazy_output(cls, values, source, lazy)
