"""The command line and its pictures: folders with broken files, JSON contents, the overlay, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import arrcoc
from arrcoc.cli import main
from arrcoc.overlay import render_overlay
from arrcoc.samples import demo_scene


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    demo_scene(320, 240, seed=1).save(photos / "street.png")
    demo_scene(300, 120, seed=2).save(photos / "wide.jpg")
    demo_scene(100, 200, seed=3).convert("L").save(photos / "tall.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return photos


def test_compress_folder_with_a_broken_file(folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["compress", str(folder), "--preset", "tiny", "--budget", "16", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["street.png", "street.json", "wide.png", "wide.json", "tall.png", "tall.json"])
    assert "broken.png" in captured.err and "wrote 3 of 4" in captured.out
    for name in ("street", "wide", "tall"):
        report = json.loads((out / f"{name}.json").read_text())
        allocation = np.array(report["allocation"])
        assert allocation.sum() == 16 and report["budget"] == 16
        assert list(allocation.shape) == report["region_grid"]
        assert report["source"].endswith(name + (".jpg" if name == "wide" else ".png"))
        assert set(report["timings_ms"]) >= {"encode", "compress"}


def test_score_writes_maps_without_allocation(folder, tmp_path) -> None:
    out = tmp_path / "maps"
    assert main(["score", str(folder / "street.png"), "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "street.json").read_text())
    assert "allocation" not in report and len(report["relevance"]) == report["region_grid"][0]
    assert (out / "street.png").is_file()


def test_overlay_picture(folder, tmp_path) -> None:
    out = tmp_path / "out"
    main(["compress", str(folder / "wide.jpg"), "--preset", "tiny", "--budget", "12", "--out", str(out), "--quiet"])
    source = Image.open(folder / "wide.jpg").convert("RGB")
    picture = Image.open(out / "wide.png").convert("RGB")
    assert abs(picture.width / picture.height - source.width / source.height) < 1 / source.height + 1e-9
    report = json.loads((out / "wide.json").read_text())
    # A vertical region border: region side in source pixels = bucket / grid * region_size / scale.
    side = report["bucket"] / report["patch_grid"][1] * report["region_size"] * source.width / report["bucket"]
    x = round(side)
    a = np.asarray(picture, dtype=int)
    b = np.asarray(source.resize(picture.size), dtype=int)
    assert (a[:, x] == 255).all(axis=-1).mean() > 0.5  # the border is drawn in white down the column
    assert np.abs(a - b).mean() > 3  # the heat map changes the whole picture


def test_render_overlay_directly(tiny_pipe: arrcoc.Pipeline) -> None:
    scene = demo_scene(400, 300)
    result = tiny_pipe(scene, budget=20)
    picture = render_overlay(scene, result)
    assert picture.size == scene.size and picture.mode == "RGB"
    scored = render_overlay(torch.rand(3, 300, 400), tiny_pipe.score(scene))
    assert scored.size == (400, 300)
    small = render_overlay(scene, result, max_side=200)
    assert small.size == (200, 150)


def test_text_query_is_a_usage_error(folder, tmp_path, capsys) -> None:
    code = main(["compress", str(folder / "street.png"), "--preset", "tiny", "--budget", "8", "--out", str(tmp_path / "o"),
                 "--query", "the red sign", "--quiet"])
    assert code == 2 and "text encoder" in capsys.readouterr().err


def test_budget_above_capacity_fails_that_image(folder, tmp_path, capsys) -> None:
    code = main(["compress", str(folder / "street.png"), "--preset", "tiny", "--budget", "100000",
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1 and "100000" in capsys.readouterr().err


def test_missing_input_is_reported_and_others_written(folder, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    code = main(["compress", str(folder / "street.png"), str(folder / "nope.png"), "--preset", "tiny", "--budget", "8",
                 "--out", str(out), "--quiet"])
    assert code == 1 and "nope.png" in capsys.readouterr().err
    assert (out / "street.json").is_file()


def test_query_embedding_file(folder, tmp_path, tiny_pipe: arrcoc.Pipeline) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "q.safetensors"
    save_file({"query": torch.randn(2, tiny_pipe.width)}, path)
    out = tmp_path / "o"
    assert main(["compress", str(folder / "street.png"), "--preset", "tiny", "--budget", "8", "--out", str(out),
                 "--query-embedding", str(path), "--quiet"]) == 0
    assert json.loads((out / "street.json").read_text())["balance"]["has_query"] is True


def test_demo(tmp_path, capsys) -> None:
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo")]) == 0
    assert "tokens kept" in capsys.readouterr().out
    assert (tmp_path / "demo" / "scene-overlay.png").is_file()


def test_help_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "arrcoc", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for word in ("compress", "score", "demo", "bench"):
        assert word in done.stdout
