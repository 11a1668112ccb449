"""Fuzzing: every family of bad and odd inputs ends in a valid output or an ArrcocError naming the argument.

A short, derandomised hypothesis profile of each family of :mod:`arrcoc.tools.fuzz` (``ARRCOC_FUZZ_EXAMPLES``
cases each, default 8); ``python -m arrcoc.tools.fuzz --cases 10000`` runs the long one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import arrcoc
from arrcoc.errors import InvalidInputError
from arrcoc.tools.fuzz import FUZZ_BUCKETS, Case, families, fuzz, main, run_case

EXAMPLES = int(os.environ.get("ARRCOC_FUZZ_EXAMPLES", "8"))
FAMILIES = list(families(1, ".").keys())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fuzz_pipe(tiny_config: arrcoc.PipelineConfig) -> arrcoc.Pipeline:
    return arrcoc.Pipeline(tiny_config.replace(buckets=FUZZ_BUCKETS))


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name: str, fuzz_pipe: arrcoc.Pipeline, tmp_path_factory: pytest.TempPathFactory) -> None:
    strategy = families(fuzz_pipe.width, tmp_path_factory.mktemp(name))[name]

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(case=strategy)
    def check(case: Case) -> None:
        outcome = run_case(case, fuzz_pipe)
        assert outcome.kind != "bug", f"{case!r}: {outcome.error}: {outcome.message}"

    check()


def _case(call: Callable, expect: dict | None = None, arguments: tuple[str, ...] = ("budget",)) -> Case:
    return Case("test", "hand-made", call, arguments, expect or {"images": 1, "budget": [4]})


def test_run_case_sorts_outcomes(fuzz_pipe: arrcoc.Pipeline) -> None:
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert run_case(_case(lambda p: p(image, budget=4)), fuzz_pipe).kind == "ok"
    rejected = run_case(_case(lambda p: p(image, budget=0)), fuzz_pipe)
    assert (rejected.kind, rejected.error) == ("rejected", "BudgetError")

    def unclear(pipe: arrcoc.Pipeline) -> None:
        raise InvalidInputError("something is wrong")

    def escapes(pipe: arrcoc.Pipeline) -> None:
        raise IndexError("index 5 is out of bounds")

    assert run_case(_case(unclear), fuzz_pipe).kind == "bug"  # names no argument
    assert run_case(_case(escapes), fuzz_pipe).error == "IndexError"
    wrong_budget = run_case(_case(lambda p: p(image, budget=5)), fuzz_pipe)  # the mask sums to 5, not 4
    assert (wrong_budget.kind, wrong_budget.error) == ("bug", "ContractBroken")
    scored = run_case(_case(lambda p: p.score(image)), fuzz_pipe)  # no tokens where tokens were promised
    assert scored.kind == "bug" and "no tokens" in scored.message

    def not_finite(pipe: arrcoc.Pipeline) -> arrcoc.CompressionOutput:
        out = pipe(image, budget=4)
        out.tokens = out.tokens.clone()
        out.tokens[0, 0, 0] = float("nan")
        return out

    assert "NaN" in run_case(_case(not_finite), fuzz_pipe).message


def test_long_run_figures(fuzz_pipe: arrcoc.Pipeline, tmp_path) -> None:
    report = fuzz(fuzz_pipe, 16, names=["bombs", "allocate"], progress=False, workdir=tmp_path)
    assert report["cases"] == sum(f["cases"] for f in report["families"].values()) > 0
    bombs = report["families"]["bombs"]
    assert bombs["outcomes"] == {"rejected": bombs["cases"]} and set(bombs["errors"]) == {"ImageLoadError"}
    assert main(["--cases", "6", "--families", "bombs", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (written,) = (tmp_path / "out").glob("fuzz-*.json")
    figures = json.loads(written.read_text())
    assert figures["max_image_pixels"] and figures["families"]["bombs"]["cases"] > 0
    assert "| bombs |" in written.with_suffix(".md").read_text()


def test_huge_finite_features_are_rejected() -> None:
    """Finite but huge features would overflow the scorers' float32 statistics: a clear error, not garbage."""
    from arrcoc.reducers import VisualInput, create_reducer

    features = torch.randn(1, 6, 9, 5, generator=torch.Generator().manual_seed(1))
    reducer = create_reducer("arrcoc")
    large = reducer(VisualInput(features * 1e6), 8)  # large but usable magnitudes still work
    assert torch.isfinite(large.tokens).all() and large.tokens.shape[1] == 8
    features[0, 0, 0, 0] = 1e20
    with pytest.raises(arrcoc.InvalidInputError, match="overflowing"):
        reducer(VisualInput(features), 8)
