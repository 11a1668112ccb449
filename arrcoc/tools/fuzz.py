"""Fuzzing the public API: every case returns an output whose contract holds, or raises an ``ArrcocError``.

Each *family* is a hypothesis strategy of :class:`Case` s over one kind of input (image sizes, PIL modes,
broken files, decompression bombs, tensors, budgets, queries, the allocator, configs, reducers).
:func:`run_case` runs a case and sorts it into ``ok`` (the output's contract holds: the mask and the
allocation sum to the budget, every token and map is finite), ``rejected`` (an ``ArrcocError`` whose message
names the argument at fault) or ``bug`` (anything else). The tests run a short profile of every family;

    python -m arrcoc.tools.fuzz --cases 10000 [--seed S] [--out bench/results]

runs the long one on the tiny preset and writes the figures (cases per family, outcomes, distinct error
types, seconds) as JSON and markdown.
"""

from __future__ import annotations

import argparse
import io
import logging
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor

from ..config import BalanceConfig, PipelineConfig
from ..errors import ArrcocError, InvalidInputError
from ..outputs import CompressionOutput, ScoreOutput
from ..stages.allocation import allocate

__all__ = ["FUZZ_BUCKETS", "Case", "Outcome", "families", "run_case", "check_output", "fuzz", "main"]

logger = logging.getLogger(__name__)

#: Largest image area the size family builds (an 8192 x 512 uint8 image; 8192 x 8192 would take seconds).
MAX_AREA = 1 << 22
#: Buckets of the fuzz pipeline: every code path of the five, at a cost a CPU can repeat thousands of times.
FUZZ_BUCKETS = (224, 384)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
#: A mode each format can store, for the broken-file family.
_FORMAT_MODES = {
    "PNG": ("RGB", "RGBA", "L", "P", "I;16"),
    "JPEG": ("RGB", "L", "CMYK"),
    "GIF": ("P", "L"),
    "BMP": ("RGB", "L", "1"),
    "TIFF": ("RGB", "RGBA", "L", "I;16", "F", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
}


@dataclass
class Case:
    """One fuzz input: a call on a pipeline, and the arguments a rejection must name.

    Attributes:
        family: the family that drew it.
        describe: a short description (shown when it is a bug).
        call: ``call(pipe)`` runs it and returns the output.
        arguments: words one of which a rejection's message must contain (the argument at fault).
        expect: what a returned output must satisfy: ``{"images": B, "budget": [..]}`` or ``{"allocation": ...}``.
    """

    family: str
    describe: str
    call: Callable[[Any], Any]
    arguments: tuple[str, ...]
    expect: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.family}: {self.describe})"


@dataclass
class Outcome:
    """How a case ended: ``kind`` is ``ok``, ``rejected`` or ``bug``; ``error`` the exception's type name."""

    kind: str
    error: str = ""
    message: str = ""


# --- contracts ---------------------------------------------------------------------------------------------
def check_output(out: Any, expect: dict[str, Any]) -> str:
    """The first broken promise of an output, or ``""`` when its contract holds."""
    if "allocation" in expect:
        budget, low, high = expect["allocation"]
        got = out.reshape(out.shape[0], -1)
        if out.dtype != torch.int64 or out.shape != expect["shape"]:
            return f"allocation has dtype {out.dtype} and shape {tuple(out.shape)}"
        if got.sum(1).tolist() != budget:  # ok-sync: checking a result
            return f"allocation sums to {got.sum(1).tolist()} instead of {budget}"  # ok-sync: report
        if bool((out < low).any()) or bool((out > high).any()):  # ok-sync: checking a result
            return "allocation leaves its bounds"
        return ""
    if "config" in expect:
        return "" if isinstance(out, (PipelineConfig, BalanceConfig)) else f"returned {type(out).__name__}"
    if "reduced" in expect:
        if out.tokens.shape[1] != expect["reduced"] or not bool(torch.isfinite(out.tokens).all()):  # ok-sync: check
            return (
                f"reducer returned {tuple(out.tokens.shape)} tokens for budget {expect['reduced']}, or non-finite ones"
            )
        return ""
    if not isinstance(out, ScoreOutput):
        return f"returned {type(out).__name__}, not a ScoreOutput"
    if len(out.names) != expect["images"]:
        return f"{len(out.names)} results for {expect['images']} images"
    maps = [out.relevance, *out.scores.values()]
    if not all(bool(torch.isfinite(m).all()) for m in maps):  # ok-sync: checking a result
        return "a relevance map holds NaN or inf"
    if "budget" not in expect:
        return "" if not isinstance(out, CompressionOutput) else "score returned tokens"
    if not isinstance(out, CompressionOutput):
        return "compression returned no tokens"
    budget = expect["budget"]
    if out.mask.sum(1).tolist() != budget or out.budget.tolist() != budget:  # ok-sync: checking a result
        return f"mask sums to {out.mask.sum(1).tolist()} for budgets {budget}"  # ok-sync: report
    if out.allocation.flatten(1).sum(1).tolist() != budget:  # ok-sync: checking a result
        return f"allocation sums to {out.allocation.flatten(1).sum(1).tolist()} for budgets {budget}"  # ok-sync
    if not bool(torch.isfinite(out.tokens).all()) or not bool(torch.isfinite(out.weights).all()):  # ok-sync
        return "a token or weight is NaN or inf"
    return ""


def run_case(case: Case, pipe: Any) -> Outcome:
    """Run ``case`` on ``pipe`` and sort the result; never raises for the case's own failures."""
    try:
        out = case.call(pipe)
    except ArrcocError as err:
        message = str(err)
        if not any(word.lower() in message.lower() for word in case.arguments):
            return Outcome("bug", type(err).__name__, f"message names none of {case.arguments}: {message}")
        return Outcome("rejected", type(err).__name__, message)
    except Exception as err:  # noqa: BLE001 - any other escape is what the fuzzer looks for
        return Outcome("bug", type(err).__name__, str(err)[:500])
    try:
        broken = check_output(out, case.expect)
    except Exception as err:  # noqa: BLE001 - an output too odd to check is broken too
        broken = f"the output cannot be checked: {type(err).__name__}: {err}"
    return Outcome("bug", "ContractBroken", broken) if broken else Outcome("ok")


# --- strategies --------------------------------------------------------------------------------------------
def _budget_values(capacity: int = 196) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, 64), st.integers(1, capacity), st.sampled_from([1, capacity]))


def _compress(
    images: Any, budget: Any, query: Any = None, query_mask: Any = None, score: bool = False
) -> Callable[[Any], Any]:
    """``pipe(images, ...)``, or ``pipe.score`` with ``score``, as a call on a pipeline."""
    if score:
        return lambda pipe: pipe.score(images, query=query, query_mask=query_mask)
    return lambda pipe: pipe(images, query=query, query_mask=query_mask, budget=budget)


def _expect(count: int, budget: Any, score: bool = False) -> dict[str, Any]:
    if score:
        return {"images": count}
    values = budget if isinstance(budget, list) else [budget] * count
    return {"images": count, "budget": [int(v) for v in values]}


@st.composite
def _sizes(draw: st.DrawFn) -> Case:
    """Image sizes 1..8192 per side (area capped), uint8, channel-first or -last, one or two images."""
    count = draw(st.integers(1, 2))
    images, shapes = [], []
    for _ in range(count):
        h = draw(st.one_of(st.integers(1, 8192), st.integers(1, 64), st.sampled_from([1, 2, 8191, 8192])))
        w = draw(st.one_of(st.integers(1, max(1, min(8192, MAX_AREA // h))), st.sampled_from([1, 2])))
        last = draw(st.booleans())
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        image = torch.randint(0, 256, (h, w, 3) if last else (3, h, w), dtype=torch.uint8, generator=g)
        images.append(image)
        shapes.append(f"{h}x{w}{' HWC' if last else ''}")
    budget = draw(_budget_values())
    return Case(
        "sizes", f"{shapes} budget {budget}", _compress(images, budget), ("image", "budget"), _expect(count, budget)
    )


@st.composite
def _pil_modes(draw: st.DrawFn) -> Case:
    """Every PIL mode, random bytes (so "F" images hold NaN, inf and out-of-range values too)."""
    mode = draw(st.sampled_from(Image.MODES))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    length = len(Image.new(mode, size).tobytes())
    random_bytes = st.integers(0, 2**31).map(lambda s: np.random.default_rng(s).bytes(length))
    # hypothesis-chosen bytes where they fit its buffer (they find edge values), seeded random bytes beyond
    data = draw(
        st.one_of(st.binary(min_size=length, max_size=length), random_bytes) if length <= 1024 else random_bytes
    )
    image = Image.frombytes(mode, size, data)
    if mode == "P" and draw(st.booleans()):
        image.info["transparency"] = draw(st.integers(0, 255))
    budget = draw(_budget_values())
    return Case("pil_modes", f"{mode} {size} budget {budget}", _compress(image, budget), ("image",), _expect(1, budget))


def _encoded(fmt: str, mode: str, size: tuple[int, int], seed_: int) -> bytes:
    rng = np.random.default_rng(seed_)
    base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = (
        base.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
        if mode == "I;16"
        else (
            Image.fromarray(rng.random((size[1], size[0]), dtype=np.float32), mode="F")
            if mode == "F"
            else base.convert(mode)
        )
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def _files(draw: st.DrawFn, workdir: Path) -> Case:
    """Files of each format: whole, truncated, with flipped bytes, a zeroed header, garbage, empty."""
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(_FORMAT_MODES[fmt]))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    data = bytearray(_encoded(fmt, mode, size, draw(st.integers(0, 2**31))))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "header", "append", "empty", "garbage"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "header":
        data[: min(len(data), 16)] = bytes(min(len(data), 16))
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=256))
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(draw(st.binary(min_size=1, max_size=512)))
    budget = draw(_budget_values())
    path = workdir / f"fuzz-{zlib.crc32(bytes(data)):08x}-{len(data)}.{fmt.lower()}"

    def call(pipe: Any) -> Any:
        path.write_bytes(bytes(data))
        return pipe(str(path), budget=budget)

    return Case(
        "files",
        f"{fmt} {mode} {size} {damage} ({len(data)} bytes) budget {budget}",
        call,
        (path.name,),
        _expect(1, budget),
    )


def _png_header(width: int, height: int, color: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def _bombs(draw: st.DrawFn, workdir: Path) -> Case:
    """PNG headers declaring more pixels than Pillow's limit (warning zone and error zone) or just under it."""
    limit = Image.MAX_IMAGE_PIXELS or 2**31
    pixels = draw(st.one_of(st.integers(limit + 1, 2 * limit), st.integers(2 * limit + 1, (2**31 - 1) ** 2)))
    width = draw(st.integers(max(1, -(-pixels // (2**31 - 1))), min(2**31 - 1, pixels)))
    height = max(1, min(2**31 - 1, pixels // width))
    color = draw(st.sampled_from([0, 2, 6]))
    path = workdir / f"bomb-{width}x{height}-{color}.png"

    def call(pipe: Any) -> Any:
        path.write_bytes(_png_header(width, height, color))
        return pipe(str(path), budget=16)

    return Case("bombs", f"{width}x{height} color type {color} (limit {limit})", call, (path.name,), _expect(1, 16))


_SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -0.5, "above": 1.5}


@st.composite
def _tensors(draw: st.DrawFn) -> Case:
    """Tensors and arrays of every dtype and layout, with NaN/inf/negative/out-of-range pixels."""
    dtype = draw(
        st.sampled_from(
            [
                "uint8",
                "uint16",
                "float16",
                "float32",
                "float64",
                "bfloat16",
                "int8",
                "int32",
                "int64",
                "bool",
                "complex64",
            ]
        )
    )
    h, w = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    channels = draw(st.sampled_from([1, 2, 3, 4, 5]))
    layout = draw(st.sampled_from(["CHW", "HWC", "HW", "1HW-batch", "CHW-batch", "5D", "1D"]))
    shape = {
        "CHW": (channels, h, w),
        "HWC": (h, w, channels),
        "HW": (h, w),
        "1HW-batch": (2, channels, h, w),
        "CHW-batch": (1, channels, h, w),
        "5D": (1, 1, channels, h, w),
        "1D": (h,),
    }[layout]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype in ("uint8", "uint16", "int8", "int32", "int64"):
        high = {"uint8": 256, "uint16": 65536, "int8": 128}.get(dtype, 1000)
        data = torch.randint(
            0, high, shape, generator=g, dtype=torch.int64 if dtype == "uint16" else getattr(torch, dtype)
        )
        data = data.to(torch.uint16) if dtype == "uint16" else data
    elif dtype == "bool":
        data = torch.rand(shape, generator=g) > 0.5
    else:
        data = torch.rand(shape, generator=g).to(getattr(torch, dtype))
        special = draw(st.sampled_from([None, *_SPECIALS]))
        if special is not None:
            data.view(-1)[draw(st.integers(0, data.numel() - 1))] = _SPECIALS[special]
    as_numpy = draw(st.booleans()) and dtype not in ("bfloat16", "uint16")
    strided = draw(st.booleans()) and data.ndim >= 2
    image: Any = data
    if strided:  # a non-contiguous view of the same pixels
        image = data.transpose(-1, -2).contiguous().transpose(-1, -2)
    if as_numpy:
        image = image.numpy()
    batch = shape[0] if layout in ("1HW-batch", "CHW-batch") else 1
    budget = draw(_budget_values())
    return Case(
        "tensors",
        f"{dtype} {layout} {tuple(shape)}{' numpy' if as_numpy else ''} budget {budget}",
        _compress(image, budget),
        ("image",),
        _expect(batch, budget),
    )


def _small_image(seed_: int, side: int = 48) -> Tensor:
    return torch.randint(
        0, 256, (3, side, side + 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed_)
    )


@st.composite
def _budgets(draw: st.DrawFn) -> Case:
    """Budgets: negative, zero, fractional, bool, above capacity, huge, numpy, tensors, lists, strings."""
    count = draw(st.integers(1, 2))
    images = [_small_image(i, draw(st.sampled_from([16, 48, 300]))) for i in range(count)]
    scalar = st.one_of(
        st.integers(-10, 0),
        st.integers(1, 200),
        st.integers(197, 10**6),
        st.integers(2**62, 2**80),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([8.0, 0.5, True, False, None, "8", b"8"]),
        st.integers(-5, 300).map(np.int64),
        st.integers(1, 50).map(np.uint8),
        st.just(np.bool_(True)),
    )
    kind = draw(st.sampled_from(["scalar", "list", "tensor", "array"]))
    if kind == "scalar":
        budget: Any = draw(scalar)
    elif kind == "list":
        budget = draw(st.lists(scalar, min_size=0, max_size=3))
    else:
        values = draw(st.lists(st.integers(-3, 300), min_size=0, max_size=3))
        dims = draw(st.sampled_from([0, 1, 2])) if len(values) == 1 else 1
        dtype = draw(st.sampled_from(["int64", "int32", "uint8", "float32", "bool"]))
        array = np.array(values, dtype=np.int64).reshape((1,) * dims if dims != 1 else (-1,))
        array = np.asarray(np.clip(array, 0, 255) if dtype in ("uint8", "bool") else array).astype(
            dtype
        )  # 0-D stays an array
        budget = torch.from_numpy(array) if kind == "tensor" else array
    whole = _whole(budget, count)
    expect = _expect(count, whole) if whole is not None else {"images": count, "budget": [None]}
    return Case("budgets", f"{count} images, budget {budget!r}", _compress(images, budget), ("budget",), expect)


def _whole(budget: Any, count: int) -> list[int] | None:
    """The budgets a returned output must have, or None for a budget that must be rejected."""
    if isinstance(budget, (Tensor, np.ndarray)):
        if budget.ndim > 1 or str(budget.dtype).rsplit(".", 1)[-1] in ("bool", "float32"):
            return None
        values = budget.reshape(-1).tolist()  # ok-sync: building a test case on the CPU
    else:
        values = list(budget) if isinstance(budget, list) else [budget]
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in values):
        return None
    values = [int(v) for v in values] * (count if len(values) == 1 else 1)
    return values if len(values) == count else None


@st.composite
def _queries(draw: st.DrawFn, width: int) -> Case:
    """Queries: empty, 100k characters, non-ASCII, padding only, wrong width or dtype, NaN, huge, masks."""
    count = draw(st.integers(1, 2))
    images = [_small_image(i) for i in range(count)]
    kind = draw(st.sampled_from(["text", "texts", "embedding", "embedding", "embedding", "other"]))
    query_mask: Any = None
    if kind == "text":
        query: Any = draw(
            st.one_of(
                st.just(""),
                st.just(" " * 64),
                st.text(max_size=40),
                st.just("é" * 100_000),
                st.just("a photo of 猫 🐈" * 7_000),
            )
        )
    elif kind == "texts":
        query = draw(st.lists(st.text(max_size=20), min_size=0, max_size=3))
    elif kind == "other":
        query = draw(st.sampled_from([0, 1.5, b"query", [1.0, 2.0], {"q": 1}, np.zeros(width, np.float32)]))
    else:
        d = draw(st.sampled_from([width] * 6 + [width - 1, width + 1, 1, 0]))
        length = draw(st.integers(0, 6))
        lead = draw(st.sampled_from([(), (1,), (count,), (count + 1,)])) if length else ()
        shape = (*lead, length, d) if draw(st.booleans()) or lead else ((d,) if length == 1 else (length, d))
        dtype = draw(
            st.sampled_from(
                [torch.float32] * 4 + [torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.bool]
            )
        )
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        query = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 0.0, 1e-30, 1e30]))
        if draw(st.integers(0, 3)) == 0 and query.numel():
            query.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e300, -1e300]))
        query = query.to(dtype) if dtype != torch.bool else query > 0
        tokens = query.shape[-2] if query.ndim >= 2 else 1
        mask_kind = draw(
            st.sampled_from([None, None, None, "all", "none", "random", "wrong-length", "float", "list", "batch"])
        )
        if mask_kind is not None:
            length_ = tokens + (1 if mask_kind == "wrong-length" else 0)
            lead_ = (count,) if mask_kind == "batch" else ()
            mask = torch.rand((*lead_, length_), generator=g) > 0.5
            mask = {
                "all": torch.ones_like(mask),
                "none": torch.zeros_like(mask),
                "float": mask.float(),
                "list": mask.tolist(),  # ok-sync: a test case
            }.get(mask_kind, mask)
            query_mask = mask
    score = draw(st.booleans())
    budget = 16
    return Case(
        "queries",
        f"{count} images, query {_short(query)} mask {_short(query_mask)}{' score' if score else ''}",
        _compress(images, budget, query, query_mask, score),
        ("query",),
        _expect(count, budget, score),
    )


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    text = repr(value)
    return text if len(text) < 60 else f"{text[:40]}... ({len(text)} chars)"


@st.composite
def _allocations(draw: st.DrawFn) -> Case:
    """``arrcoc.stages.allocation.allocate``: relevance of any finite or broken value, budgets and bounds."""
    b, r = draw(st.sampled_from([1, 2, 3] * 3 + [0])), draw(st.integers(0, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.float32, torch.int64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    relevance = torch.rand(b, r, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 1e-300, 1e300, 0.0]))
    if draw(st.integers(0, 3)) == 0 and relevance.numel():
        relevance.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 1e308]))
    relevance = relevance.to(dtype)
    if draw(st.booleans()):  # well-formed bounds and a budget between them: the contract must hold
        low, high = draw(st.integers(0, 2)), draw(st.integers(2, 16))
        budget: Any = draw(st.integers(low * r, high * r))
    else:
        low = draw(
            st.one_of(st.integers(-1, 3), st.just(torch.zeros(b, r, dtype=torch.long)), st.sampled_from([0.5, True]))
        )
        high = draw(
            st.one_of(
                st.integers(0, 20),
                st.just(torch.full((r,), 4, dtype=torch.long)),
                st.just(torch.ones(2, 3, dtype=torch.long)),
            )
        )
        budget = draw(
            st.one_of(
                st.integers(-2, 5 * max(r, 1)),
                st.integers(2**62, 2**70),
                st.just(torch.full((b,), 3, dtype=torch.long)),
                st.sampled_from([2.5, None]),
            )
        )
    expect: dict[str, Any] = {"shape": relevance.shape}
    if isinstance(budget, int) and isinstance(low, (int, Tensor)) and isinstance(high, (int, Tensor)):
        expect["allocation"] = ([budget] * b, low, high)
    elif isinstance(budget, Tensor):
        expect["allocation"] = (budget.tolist(), low, high)  # ok-sync: test case
    else:
        expect["allocation"] = (None, low, high)
    return Case(
        "allocate",
        f"relevance {tuple(relevance.shape)} {dtype}, budget {_short(budget)}, bounds {_short(low)}..{_short(high)}",
        lambda pipe: allocate(relevance, budget, low, high),
        ("relevance", "budget", "min_tokens", "max_tokens"),
        expect,
    )


_FIELD_VALUES = st.one_of(
    st.integers(-3, 2000),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-1, 1100), max_size=3),
    st.just({"depth": 1}),
)


@st.composite
def _configs(draw: st.DrawFn) -> Case:
    """``PipelineConfig.from_dict`` / ``from_json`` / ``BalanceConfig`` with fields of any value and type."""
    kind = draw(st.sampled_from(["pipeline", "balance", "json"]))
    if kind == "json":
        text = draw(st.one_of(st.text(max_size=60), st.just("[]"), st.just("{"), st.just('{"region_size": "4"}')))
        fields = tuple(PipelineConfig.__dataclass_fields__)  # a rejection may name the field at fault
        return Case(
            "configs",
            f"from_json({text!r})",
            lambda pipe: PipelineConfig.from_json(text),
            ("config", "json", "field", *fields),
            {"config": True},
        )
    cls = PipelineConfig if kind == "pipeline" else BalanceConfig
    # from_dict checks field names; a direct BalanceConfig(bogus=...) is Python's own TypeError for an unknown keyword
    names = list(cls.__dataclass_fields__) + (["bogus"] if cls is PipelineConfig else [])
    name = draw(st.sampled_from(names))
    value = draw(_FIELD_VALUES)
    if cls is PipelineConfig:
        return Case(
            "configs",
            f"PipelineConfig.from_dict({{{name!r}: {value!r}}})",
            lambda pipe: PipelineConfig.from_dict({name: value}),
            (name,),
            {"config": True},
        )
    return Case(
        "configs",
        f"BalanceConfig({name}={value!r})",
        lambda pipe: BalanceConfig(**{name: value}),
        (name,),
        {"config": True},
    )


@st.composite
def _reducers(draw: st.DrawFn) -> Case:
    """``create_reducer("arrcoc")`` on feature grids of any shape and value, with budgets of any kind."""
    from ..reducers import ArrcocReducer, VisualInput

    gh, gw, d = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 16))
    features = torch.randn(1, gh, gw, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    if draw(st.booleans()):
        features.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    shape = draw(st.sampled_from(["ok", "3d", "query"]))
    visual = VisualInput(
        features if shape != "3d" else features[0],
        query=torch.randn(1, 2, draw(st.sampled_from([d, d + 1]))) if shape == "query" else None,
    )
    budget = draw(st.one_of(st.integers(-1, gh * gw + 2), st.sampled_from([2.5, True])))
    reducer = ArrcocReducer(PipelineConfig(region_size=2))
    return Case(
        "reducers",
        f"features {tuple(visual.features.shape)} {shape} budget {budget!r}",
        lambda pipe: reducer(visual, budget),
        ("budget", "features", "query", "visual"),
        {"reduced": budget},
    )


def families(width: int, workdir: Path) -> dict[str, st.SearchStrategy[Case]]:
    """Every fuzz family by name, for a pipeline of encoder width ``width``; files are written under ``workdir``."""
    return {
        "sizes": _sizes(),
        "pil_modes": _pil_modes(),
        "files": _files(workdir),
        "bombs": _bombs(workdir),
        "tensors": _tensors(),
        "budgets": _budgets(),
        "queries": _queries(width),
        "allocate": _allocations(),
        "configs": _configs(),
        "reducers": _reducers(),
    }


# --- the long run --------------------------------------------------------------------------------------------
class _TimeUp(BaseException):
    """Ends a family's run at its time share (a BaseException, so hypothesis does not take it for a failure)."""


def _run_family(
    pipe: Any, strategy: st.SearchStrategy[Case], count: int, seed_: int, bar: Any, seconds: float | None = None
) -> dict[str, Any]:
    """Up to ``count`` hypothesis-generated cases of one family, for at most ``seconds`` (no shrinking)."""
    figures: dict[str, Any] = {"cases": 0, "outcomes": Counter(), "errors": Counter(), "bugs": []}
    start = time.perf_counter()
    stop = start + seconds if seconds else float("inf")

    @seed(seed_)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def body(case: Case) -> None:
        outcome = run_case(case, pipe)
        figures["cases"] += 1
        figures["outcomes"][outcome.kind] += 1
        if outcome.error:
            figures["errors"][outcome.error] += 1
        if outcome.kind == "bug" and len(figures["bugs"]) < 20:
            figures["bugs"].append({"case": case.describe, "error": outcome.error, "message": outcome.message})
        bar.update(1)
        if time.perf_counter() > stop:
            raise _TimeUp

    figures["time_limited"] = False
    try:
        body()
    except _TimeUp:
        figures["time_limited"] = True
    except Exception as err:  # noqa: BLE001 - a fault of the fuzzer itself: record it, go on with the others
        logger.error("fuzz family stopped by a harness error: %r", err)
        figures["harness_error"] = f"{type(err).__name__}: {err}"[:500]
    figures.update(
        seconds=round(time.perf_counter() - start, 2),
        outcomes=dict(figures["outcomes"]),
        errors=dict(figures["errors"]),
    )
    return figures


def fuzz(
    pipe: Any,
    cases: int,
    *,
    seed_: int = 0,
    names: list[str] | None = None,
    progress: bool = True,
    workdir: Path | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Run about ``cases`` cases spread evenly over the families; returns the figures.

    With ``max_seconds``, each family gets an equal share of the time left when it starts and stops when
    that is spent (its figures then say ``time_limited``), so a slow machine still covers every family.

    Returns:
        ``{"families": {name: {"cases", "outcomes", "errors", "seconds", "bugs"}}, "cases", "bugs", "seconds"}``.
    """
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="arrcoc-fuzz-") as tmp:
        strategies = families(pipe.width, Path(workdir or tmp))
        chosen = names or list(strategies)
        unknown = sorted(set(chosen) - set(strategies))
        if unknown:
            raise InvalidInputError(f"names: unknown fuzz families {unknown}; known: {sorted(strategies)}")
        per_family = max(1, cases // len(chosen))
        report: dict[str, Any] = {"families": {}}
        start = time.perf_counter()
        with tqdm(total=per_family * len(chosen), unit="case", disable=not progress, file=sys.stderr) as bar:
            for name in chosen:
                bar.set_description(name)
                left = len(chosen) - len(report["families"])  # time a fast family leaves goes to the rest
                share = (max_seconds - (time.perf_counter() - start)) / left if max_seconds else None
                report["families"][name] = _run_family(pipe, strategies[name], per_family, seed_, bar, share)
        report["cases"] = sum(f["cases"] for f in report["families"].values())
        report["bugs"] = sum(f["outcomes"].get("bug", 0) for f in report["families"].values())
        report["harness_errors"] = sum("harness_error" in f for f in report["families"].values())
        report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# arrcoc fuzz: {report['cases']} cases, {report['bugs']} bugs, {report['seconds']} s",
        "",
        f"{report['preset']} preset (buckets {report['buckets']}) on {report['device']}, torch {report['torch']}, Pillow {report['pillow']} "
        f"(Image.MAX_IMAGE_PIXELS = {report['max_image_pixels']}), seed {report['seed']}, {report['date']}",
        "",
        f"{report['cases']} of {report['requested_cases']} requested cases ran"
        + (f" (time limit {report['max_seconds']} s, shared equally by the families)" if report["max_seconds"] else ""),
        "",
        "| family | cases | ok | rejected | bug | distinct error types | seconds |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, f in report["families"].items():
        o = f["outcomes"]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(f["errors"].items()))
        lines.append(
            f"| {name} | {f['cases']} | {o.get('ok', 0)} | {o.get('rejected', 0)} | {o.get('bug', 0)} | "
            f"{errors} | {f['seconds']} |"
        )
    harness = [
        f"- {n}: stopped by a fault of the fuzzer: {f['harness_error']}"
        for n, f in report["families"].items()
        if "harness_error" in f
    ]
    if harness:
        lines += ["", "## harness errors", "", *harness]
    bugs = [(n, b) for n, f in report["families"].items() for b in f["bugs"]]
    if bugs:
        lines += ["", "## bugs (first 20 per family)", ""]
        lines += [f"- {n}: `{b['case']}` -> {b['error']}: {b['message'][:200]}" for n, b in bugs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m arrcoc.tools.fuzz``: run the long fuzz profile and write its figures; exit 1 if a bug was found."""
    import datetime

    import PIL

    from ..pipeline import Pipeline
    from .timing import write_report

    parser = argparse.ArgumentParser(prog="python -m arrcoc.tools.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="cases in all, spread over the families")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--families", nargs="*", default=None, help="run only these families")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop each family at an equal share of this time (the figures say so)",
    )
    parser.add_argument("--out", default=None, help="write fuzz-<device>.json/.md here (e.g. bench/results)")
    parser.add_argument("--preset", default="tiny", help="pipeline preset (default tiny)")
    parser.add_argument(
        "--buckets",
        type=int,
        nargs="+",
        default=list(FUZZ_BUCKETS),
        help="bucket sizes (default 224 384: images up to 8192 px still resize into them, and "
        "the encoder stays cheap on a CPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    pipe = Pipeline(PipelineConfig.from_name(args.preset, buckets=tuple(args.buckets)))
    report = fuzz(
        pipe, args.cases, seed_=args.seed, names=args.families, progress=not args.quiet, max_seconds=args.max_seconds
    )
    report["requested_cases"] = args.cases
    report.update(
        max_seconds=args.max_seconds,
        preset=args.preset,
        buckets=list(pipe.config.buckets),
        device=str(pipe.device),
        torch=torch.__version__,
        pillow=PIL.__version__,
        max_image_pixels=Image.MAX_IMAGE_PIXELS,
        seed=args.seed,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    table = _markdown(report)
    if args.out:
        write_report(report, table, args.out, "fuzz", str(pipe.device))
    else:
        print(table)
    return 1 if report["bugs"] or report["harness_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
