"""The background probe's oracles (bench/background_probe.py): what each one keeps first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from arrcoc.world.data import make_sample

_PATH = Path(__file__).resolve().parent.parent / "bench" / "background_probe.py"
_spec = importlib.util.spec_from_file_location("background_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_oracles_rank_what_they_keep_above_everything_else() -> None:
    sample = make_sample(700_002, 224, "count")
    grid = 14
    drawn = probe.priorities(sample, 224, grid, torch.Generator().manual_seed(0))
    objects = probe._patches_of([box for kind, _, box in sample.layout if kind != "glyph"], 224, grid) > 0
    answer = probe._patches_of(list(sample.boxes), 224, grid) > 0
    assert objects.any() and (~objects).any() and answer.any()
    assert (answer & ~objects).sum() == 0  # the answer's shapes are among the scene's objects
    for name, kept in (("objects+background", objects), ("answer+random", answer)):
        priority = drawn[name]
        assert priority[kept].min() > priority[~kept].max()  # every kept patch before any other
    assert drawn["random"].min() >= 0 and drawn["random"].max() < 1


def test_signed_error_of_numeric_and_other_answers() -> None:
    assert probe.signed_error("3", "2") == "+1" and probe.signed_error(" 1", "3") == "-2"
    assert probe.signed_error("red", "2") == "other"
