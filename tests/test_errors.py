"""One error family: every public entry point rejects bad input with an ArrcocError naming the argument.

A table of bad inputs per entry point. Each row says which error it must raise (a subclass of
``ArrcocError``, and of ``ValueError`` or ``TypeError`` where that is the natural base) and words the message
must contain: the argument's name, and where useful what was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import arrcoc
from arrcoc import BalanceConfig, Pipeline, PipelineConfig
from arrcoc.errors import (
    ArrcocError,
    BudgetError,
    EncoderError,
    ImageLoadError,
    InvalidInputError,
    InvalidTypeError,
    MissingWeightsError,
)
from arrcoc.reducers import VisualInput, create_reducer
from arrcoc.stages.allocation import allocate

IMAGE = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
WIDTH = 192  # vit_tiny


def _bad_png(tmp: Any) -> str:
    path = tmp / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return str(path)


def _bad_json_folder(tmp: Any) -> str:
    (tmp / "config.json").write_text("{")
    return str(tmp)


# (id, call(pipe, tmp_path), error class, words the message must contain)
Row = tuple[str, Callable[[Pipeline, Any], Any], type[ArrcocError], tuple[str, ...]]
ROWS: list[Row] = [
    # --- Pipeline(...) and from_pretrained ------------------------------------------------------------------
    (
        "pipeline-encoder",
        lambda p, t: Pipeline(PipelineConfig(encoder="no_such_model")),
        EncoderError,
        ("encoder", "no_such_model"),
    ),
    (
        "pipeline-weights",
        lambda p, t: Pipeline(p.config, weights=t / "none.safetensors"),
        MissingWeightsError,
        ("weights", "none.safetensors"),
    ),
    ("pipeline-config-type", lambda p, t: Pipeline({"region_size": 4}), InvalidTypeError, ("config", "dict")),
    ("pipeline-device", lambda p, t: Pipeline(p.config, device="bogus"), InvalidInputError, ("device", "bogus")),
    (
        "from-pretrained-missing",
        lambda p, t: Pipeline.from_pretrained(t / "nothing"),
        MissingWeightsError,
        ("path", "nothing"),
    ),
    (
        "from-pretrained-json",
        lambda p, t: Pipeline.from_pretrained(_bad_json_folder(t)),
        InvalidInputError,
        ("config.json",),
    ),
    ("from-pretrained-override", lambda p, t: Pipeline.from_pretrained(bogus=1), InvalidInputError, ("bogus",)),
    # --- __call__ / forward: images ----------------------------------------------------------------------------
    ("images-none", lambda p, t: p(None, budget=8), InvalidTypeError, ("image 0", "NoneType")),
    ("images-empty-list", lambda p, t: p([], budget=8), InvalidInputError, ("images", "empty")),
    (
        "images-empty-batch",
        lambda p, t: p(torch.zeros(0, 3, 8, 8), budget=8),
        InvalidInputError,
        ("images", "(0, 3, 8, 8)"),
    ),
    (
        "images-5d",
        lambda p, t: p(torch.zeros(1, 1, 3, 8, 8), budget=8),
        InvalidInputError,
        ("images", "(1, 1, 3, 8, 8)"),
    ),
    (
        "images-missing-file",
        lambda p, t: p(str(t / "nope.png"), budget=8),
        ImageLoadError,
        ("nope.png", "no such file"),
    ),
    ("images-corrupt-file", lambda p, t: p(_bad_png(t), budget=8), ImageLoadError, ("broken.png",)),
    (
        "images-nan",
        lambda p, t: p([IMAGE, torch.full((3, 4, 4), float("nan"))], budget=8),
        InvalidInputError,
        ("image 1", "NaN"),
    ),
    ("images-negative", lambda p, t: p(torch.full((3, 4, 4), -0.5), budget=8), InvalidInputError, ("image 0", "-0.5")),
    (
        "images-two-channels",
        lambda p, t: p(torch.zeros(8, 8, 2), budget=8),
        InvalidInputError,
        ("image 0", "(8, 8, 2)"),
    ),
    (
        "images-int64",
        lambda p, t: p(torch.zeros(3, 8, 8, dtype=torch.int64), budget=8),
        InvalidTypeError,
        ("image 0", "int64"),
    ),
    ("images-bool-array", lambda p, t: p(np.zeros((8, 8), bool), budget=8), InvalidTypeError, ("image 0", "bool")),
    (
        "images-sparse",
        lambda p, t: p(torch.zeros(3, 8, 8).to_sparse(), budget=8),
        InvalidTypeError,
        ("image 0", "sparse"),
    ),
    (
        "images-meta",
        lambda p, t: p(torch.zeros(3, 8, 8, device="meta"), budget=8),
        InvalidInputError,
        ("image 0", "meta"),
    ),
    ("images-bytes", lambda p, t: p(b"\x89PNG", budget=8), InvalidTypeError, ("image 0", "bytes")),
    # --- budget ------------------------------------------------------------------------------------------------
    ("budget-zero", lambda p, t: p(IMAGE, budget=0), BudgetError, ("budget", "got 0")),
    ("budget-negative", lambda p, t: p(IMAGE, budget=-3), BudgetError, ("budget", "got -3")),
    ("budget-fraction", lambda p, t: p(IMAGE, budget=2.5), BudgetError, ("budget", "2.5")),
    ("budget-bool", lambda p, t: p(IMAGE, budget=True), BudgetError, ("budget", "True")),
    ("budget-string", lambda p, t: p(IMAGE, budget="8"), BudgetError, ("budget", "'8'")),
    ("budget-above-capacity", lambda p, t: p(IMAGE, budget=197), BudgetError, ("budget", "140", "197", "padding")),
    ("budget-count", lambda p, t: p(IMAGE, budget=[8, 8]), BudgetError, ("budget", "got 2 values")),
    ("budget-float-tensor", lambda p, t: p(IMAGE, budget=torch.tensor(8.0)), BudgetError, ("budget", "float32")),
    ("budget-2d-tensor", lambda p, t: p(IMAGE, budget=torch.tensor([[8]])), BudgetError, ("budget", "(1, 1)")),
    ("budget-list-item", lambda p, t: p([IMAGE, IMAGE], budget=[8, None]), BudgetError, ("budget", "value 1", "None")),
    ("budget-none", lambda p, t: p(IMAGE, budget=None), BudgetError, ("budget", "None")),
    # --- query -------------------------------------------------------------------------------------------------
    (
        "query-width",
        lambda p, t: p(IMAGE, query=torch.randn(5), budget=8),
        InvalidInputError,
        ("query", f"{WIDTH}", "5"),
    ),
    ("query-type", lambda p, t: p(IMAGE, query=3, budget=8), InvalidTypeError, ("query", "int")),
    (
        "query-int-tensor",
        lambda p, t: p(IMAGE, query=torch.ones(WIDTH, dtype=torch.long), budget=8),
        InvalidTypeError,
        ("query", "int64"),
    ),
    (
        "query-nan",
        lambda p, t: p(IMAGE, query=torch.full((WIDTH,), float("nan")), budget=8),
        InvalidInputError,
        ("query", "NaN"),
    ),
    (
        "query-overflow",
        lambda p, t: p(IMAGE, query=torch.full((WIDTH,), 1e300, dtype=torch.float64), budget=8),
        InvalidInputError,
        ("query", "float32"),
    ),
    (
        "query-rank",
        lambda p, t: p(IMAGE, query=torch.zeros(1, 1, 1, WIDTH), budget=8),
        InvalidInputError,
        ("query", "(1, 1, 1, 192)"),
    ),
    (
        "query-batch",
        lambda p, t: p([IMAGE, IMAGE], query=torch.zeros(3, 1, WIDTH), budget=8),
        InvalidInputError,
        ("query", "got 3"),
    ),
    ("query-text", lambda p, t: p(IMAGE, query="a red sign", budget=8), MissingWeightsError, ("query", "text encoder")),
    (
        "query-mask-list",
        lambda p, t: p(IMAGE, query=torch.zeros(2, WIDTH), query_mask=[True, False], budget=8),
        InvalidTypeError,
        ("query_mask", "list"),
    ),
    (
        "query-mask-length",
        lambda p, t: p(IMAGE, query=torch.zeros(2, WIDTH), query_mask=torch.ones(3, dtype=torch.bool), budget=8),
        InvalidInputError,
        ("query_mask", "(3,)"),
    ),
    (
        "query-mask-batch",
        lambda p, t: p(IMAGE, query=torch.zeros(2, WIDTH), query_mask=torch.ones(3, 2, dtype=torch.bool), budget=8),
        InvalidInputError,
        ("query_mask", "(3, 2)"),
    ),
    (
        "query-mask-float",
        lambda p, t: p(IMAGE, query=torch.zeros(2, WIDTH), query_mask=torch.ones(2), budget=8),
        InvalidInputError,
        ("query_mask", "float32"),
    ),
    # --- score and prepare_query ---------------------------------------------------------------------------------
    ("score-images", lambda p, t: p.score([IMAGE, "nope.png"]), ImageLoadError, ("image 1", "nope.png")),
    (
        "score-query",
        lambda p, t: p.score(IMAGE, query=np.zeros(WIDTH, np.float32)),
        InvalidTypeError,
        ("query", "ndarray"),
    ),
    ("prepare-query-batch", lambda p, t: p.prepare_query(None, None, 0), InvalidInputError, ("batch", "got 0")),
    ("prepare-query-batch-type", lambda p, t: p.prepare_query(None, None, "2"), InvalidInputError, ("batch", "'2'")),
    # --- allocate -----------------------------------------------------------------------------------------------
    ("allocate-relevance-type", lambda p, t: allocate([[1.0, 2.0]], 1), InvalidTypeError, ("relevance", "list")),
    (
        "allocate-relevance-int",
        lambda p, t: allocate(torch.ones(1, 4, dtype=torch.long), 1),
        InvalidTypeError,
        ("relevance", "int64"),
    ),
    ("allocate-relevance-1d", lambda p, t: allocate(torch.ones(4), 1), InvalidInputError, ("relevance", "(4,)")),
    (
        "allocate-relevance-empty",
        lambda p, t: allocate(torch.ones(0, 4), 1),
        InvalidInputError,
        ("relevance", "(0, 4)"),
    ),
    (
        "allocate-relevance-nan",
        lambda p, t: allocate(torch.tensor([[1.0, float("nan")]]), 1),
        InvalidInputError,
        ("relevance", "NaN"),
    ),
    (
        "allocate-relevance-negative",
        lambda p, t: allocate(torch.tensor([[1.0, -2.0]]), 1),
        InvalidInputError,
        ("relevance", "-2"),
    ),
    ("allocate-budget-fraction", lambda p, t: allocate(torch.ones(1, 4), 1.5), BudgetError, ("budget", "1.5")),
    ("allocate-budget-range", lambda p, t: allocate(torch.ones(1, 4), 100, 1, 4), BudgetError, ("budget", "100", "16")),
    ("allocate-budget-huge", lambda p, t: allocate(torch.ones(1, 4), 10**30), BudgetError, ("budget", "2**62")),
    (
        "allocate-budget-shape",
        lambda p, t: allocate(torch.ones(2, 4), torch.tensor([1, 2, 3])),
        BudgetError,
        ("budget", "(3,)"),
    ),
    ("allocate-min-type", lambda p, t: allocate(torch.ones(1, 4), 2, 0.5), InvalidTypeError, ("min_tokens", "0.5")),
    (
        "allocate-max-shape",
        lambda p, t: allocate(torch.ones(1, 4), 2, 0, torch.ones(3, dtype=torch.long)),
        InvalidInputError,
        ("max_tokens", "(3,)"),
    ),
    (
        "allocate-bounds-order",
        lambda p, t: allocate(torch.ones(1, 4), 2, 3, 1),
        InvalidInputError,
        ("min_tokens", "max_tokens"),
    ),
    # --- configs ------------------------------------------------------------------------------------------------
    ("config-region", lambda p, t: PipelineConfig(region_size=0), InvalidInputError, ("region_size", "0")),
    ("config-buckets", lambda p, t: PipelineConfig(buckets=()), InvalidInputError, ("buckets",)),
    ("config-dtype", lambda p, t: PipelineConfig(encoder_dtype="int8"), InvalidInputError, ("encoder_dtype", "int8")),
    ("config-preset", lambda p, t: PipelineConfig.from_name("huge"), InvalidInputError, ("preset", "huge")),
    (
        "config-unknown-field",
        lambda p, t: PipelineConfig.from_dict({"regions": 4}),
        InvalidInputError,
        ("fields", "regions"),
    ),
    ("balance-exploit", lambda p, t: BalanceConfig(exploit=2.0), InvalidInputError, ("exploit", "2.0")),
    ("balance-weights", lambda p, t: BalanceConfig(weights=(1.0, 2.0)), InvalidInputError, ("weights",)),
    ("config-region-type", lambda p, t: PipelineConfig(region_size="4"), InvalidTypeError, ("region_size", "'4'")),
    ("config-buckets-type", lambda p, t: PipelineConfig(buckets=224), InvalidTypeError, ("buckets", "224")),
    ("config-json-syntax", lambda p, t: PipelineConfig.from_json("{"), InvalidInputError, ("JSON",)),
    ("config-json-list", lambda p, t: PipelineConfig.from_json("[]"), InvalidTypeError, ("object", "list")),
    (
        "config-balance-field",
        lambda p, t: PipelineConfig.from_dict({"balance": {"foo": 1}}),
        InvalidInputError,
        ("foo",),
    ),
    ("balance-exploit-type", lambda p, t: BalanceConfig(exploit="a"), InvalidTypeError, ("exploit", "'a'")),
    ("balance-scarcity", lambda p, t: BalanceConfig(scarcity=1.5), InvalidInputError, ("scarcity", "1.5")),
    ("balance-scarcity-type", lambda p, t: BalanceConfig(scarcity=None), InvalidTypeError, ("scarcity", "None")),
    (
        "balance-temperature",
        lambda p, t: BalanceConfig(temperature_range=(1.0,)),
        InvalidInputError,
        ("temperature_range",),
    ),
    # --- reducers -----------------------------------------------------------------------------------------------
    ("reducer-name", lambda p, t: create_reducer("no-such-reducer"), InvalidInputError, ("reducer", "no-such-reducer")),
    (
        "reducer-budget-fraction",
        lambda p, t: create_reducer("arrcoc")(VisualInput(torch.randn(1, 8, 8, 16)), 2.5),
        BudgetError,
        ("budget", "2.5"),
    ),
    (
        "reducer-budget-zero",
        lambda p, t: create_reducer("arrcoc")(VisualInput(torch.randn(1, 8, 8, 16)), 0),
        BudgetError,
        ("budget", "0"),
    ),
    (
        "reducer-features-rank",
        lambda p, t: create_reducer("arrcoc")(VisualInput(torch.randn(8, 8, 16)), 4),
        InvalidInputError,
        ("features", "(8, 8, 16)"),
    ),
    (
        "reducer-visual-type",
        lambda p, t: create_reducer("arrcoc")(torch.randn(1, 8, 8, 16), 4),
        InvalidTypeError,
        ("visual", "Tensor"),
    ),
    (
        "reducer-query-width",
        lambda p, t: create_reducer("arrcoc")(VisualInput(torch.randn(1, 8, 8, 16), query=torch.randn(1, 2, 5)), 4),
        InvalidInputError,
        ("query", "5"),
    ),
    (
        "reducer-features-nan",
        lambda p, t: create_reducer("arrcoc")(VisualInput(torch.full((1, 8, 8, 16), float("nan"))), 4),
        InvalidInputError,
        ("features", "NaN"),
    ),
]


@pytest.mark.parametrize("name, call, error, words", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input_raises_a_named_arrcoc_error(
    name: str, call: Callable, error: type[ArrcocError], words: tuple[str, ...], tiny_pipe: Pipeline, tmp_path
) -> None:
    with pytest.raises(ArrcocError) as caught:
        call(tiny_pipe, tmp_path)
    assert isinstance(caught.value, error), f"{name}: {type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"


def test_every_error_has_a_natural_base() -> None:
    """Bad values are ValueErrors and bad types TypeErrors, so existing ``except`` clauses keep working."""
    for cls in (InvalidInputError, ImageLoadError, BudgetError, EncoderError):
        assert issubclass(cls, ValueError) and issubclass(cls, ArrcocError)
    assert issubclass(InvalidTypeError, TypeError) and issubclass(MissingWeightsError, RuntimeError)
    assert set(arrcoc.errors.__all__) <= set(arrcoc.__all__)  # every error is importable from arrcoc


def test_errors_pickle_and_keep_their_message() -> None:
    """Errors cross process boundaries (data loaders, torchrun workers) intact."""
    import pickle

    for cls in (BudgetError, ImageLoadError, InvalidTypeError, MissingWeightsError):
        err = pickle.loads(pickle.dumps(cls("budget must be positive; got -1")))
        assert type(err) is cls and str(err) == "budget must be positive; got -1"
