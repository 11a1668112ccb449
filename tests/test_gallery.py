"""``python -m arrcoc.tools.gallery``: the drawing helpers, and one photo end to end on a tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import arrcoc
from arrcoc.tools.gallery import kept_patches, load_photo, main, render, run


def test_kept_patches_marks_each_real_tokens_area() -> None:
    positions = torch.tensor([[0, 1, 1, 1], [2, 0, 1, 2], [0, 0, 0, 0]])
    kept = kept_patches(positions, torch.tensor([True, True, False]), (3, 3))
    assert kept.tolist() == [[False, True, False], [False, False, False], [True, True, False]]


def test_render_tints_kept_patches_and_dims_the_rest() -> None:
    image = np.full((4, 6, 3), 200, np.uint8)
    kept = torch.tensor([[True, False, False]])
    shown = render(image, kept, 2, dim=0.5, tint=0.0)
    assert shown.shape == image.shape and shown.dtype == np.uint8
    assert (shown[:2, :2] == 200).all() and (shown[:2, 2:] == 100).all()  # kept as is, others halved
    assert (shown[2:] == 100).all()  # rows past the grid's last kept row


def test_photos_load_as_rgb() -> None:
    pytest.importorskip("skimage")
    for name in ("camera", "motorcycle"):
        photo = load_photo(name)
        assert photo.ndim == 3 and photo.shape[-1] == 3 and photo.dtype == np.uint8


def test_gallery_end_to_end(tmp_path: Path, tiny_pipe: arrcoc.Pipeline) -> None:
    pytest.importorskip("skimage")
    record = run(tmp_path, ["coins"], [4, 100000], pipeline=tiny_pipe)
    photo = record["photos"]["coins"]
    assert (tmp_path / "coins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "gallery.json").read_text()) == record
    small, capped = photo["budgets"]["4"], photo["budgets"]["100000"]
    assert small["tokens"] == 4 and len(small["arrcoc"]) == 4 and len(small["divprune"]) == 4  # exact budgets
    assert capped["tokens"] == photo["real_patches"] == len(capped["arrcoc"])  # capped at the real patches
    gh, gw = photo["grid"]
    assert all(0 <= r < gh and 0 <= c < gw for r, c in small["arrcoc"] + small["divprune"])
    assert "exploit" in small["balance"]


def test_an_unknown_photo_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("skimage")
    assert main(["--out", str(tmp_path), "--photos", "no_such_photo"]) == 2
    assert "no_such_photo" in capsys.readouterr().err
