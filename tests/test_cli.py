"""The command line and its pictures: folders with broken files, JSON contents, the overlay, errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import arrcoc
from arrcoc.cli import MODULE_COMMANDS, main
from arrcoc.tools.overlay import render_overlay
from arrcoc.world.samples import demo_scene


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
        f"{name}{suffix}" for name in ("street", "wide", "tall") for suffix in (".png", "-tokens.png", ".json")
    )
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
    whole = Image.open(out / "wide.png").convert("RGB")
    picture = whole.crop((0, 0, source.width, source.height))  # the legend strip lies below the picture
    assert whole.width == source.width and whole.height > source.height
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
    picture = render_overlay(scene, result, legend=False)
    assert picture.size == scene.size and picture.mode == "RGB"
    scored = render_overlay(torch.rand(3, 300, 400), tiny_pipe.score(scene), legend=False)
    assert scored.size == (400, 300)
    small = render_overlay(scene, result, max_side=200, legend=False)
    assert small.size == (200, 150)
    assert render_overlay(scene, result, max_side=200).width == 200  # the legend adds height only


def test_text_query_is_a_usage_error(folder, tmp_path, capsys) -> None:
    code = main(
        [
            "compress",
            str(folder / "street.png"),
            "--preset",
            "tiny",
            "--budget",
            "8",
            "--out",
            str(tmp_path / "o"),
            "--query",
            "the red sign",
            "--quiet",
        ]
    )
    assert code == 2 and "text encoder" in capsys.readouterr().err


def test_budget_above_capacity_fails_that_image(folder, tmp_path, capsys) -> None:
    code = main(
        [
            "compress",
            str(folder / "street.png"),
            "--preset",
            "tiny",
            "--budget",
            "100000",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 1 and "100000" in capsys.readouterr().err


def test_missing_input_is_reported_and_others_written(folder, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    code = main(
        [
            "compress",
            str(folder / "street.png"),
            str(folder / "nope.png"),
            "--preset",
            "tiny",
            "--budget",
            "8",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 1 and "nope.png" in capsys.readouterr().err
    assert (out / "street.json").is_file()


def test_query_embedding_file(folder, tmp_path, tiny_pipe: arrcoc.Pipeline) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "q.safetensors"
    save_file({"query": torch.randn(2, tiny_pipe.width)}, path)
    out = tmp_path / "o"
    assert (
        main(
            [
                "compress",
                str(folder / "street.png"),
                "--preset",
                "tiny",
                "--budget",
                "8",
                "--out",
                str(out),
                "--query-embedding",
                str(path),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "street.json").read_text())["balance"]["has_query"] is True


def test_demo(tmp_path, capsys) -> None:
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--no-question"]) == 0
    out = capsys.readouterr().out
    assert "tokens kept" in out and "question" not in out
    assert (tmp_path / "demo" / "scene-overlay.png").is_file()


def test_demo_asks_the_shipped_vlm_with_all_and_with_few_tokens(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    from arrcoc.world.vlm import DEFAULT_VLM_DIR

    if not (DEFAULT_VLM_DIR / "vlm.safetensors").is_file():
        pytest.skip("no trained VLM in weights/")
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--question-share", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "What color is the" in out
    assert "all 576 visual tokens" in out and "arrcoc's 115 tokens (20%)" in out
    for name in ("question.png", "question-tokens.png"):
        assert (tmp_path / "demo" / name).is_file()


def test_help_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "arrcoc", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for word in ("compress", "score", "demo", "bench"):
        assert word in done.stdout


def _folder_job(root, count: int, broken: tuple[int, ...]):
    """``count`` small images (PNG and JPEG), with the ones at ``broken`` damaged in three different ways."""
    folder = root / "job"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (24 + i % 5, 32, 3), dtype=np.uint8))
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        if i in broken:
            data = path.read_bytes()
            path.write_bytes([data[: len(data) // 3], b"", bytes(64) + data[64:]][broken.index(i) % 3])
    return folder


KILLER = """
import os, signal, sys
import arrcoc.cli as cli

original, saved = cli._write_atomic, [0]

def write(path, fn):
    def fault(temporary):  # the 21st report: write its temporary file, then die before the rename
        fn(temporary)
        if path.suffix == ".json" and saved[0] == 20:
            os.kill(os.getpid(), signal.SIGKILL)
    original(path, fault)
    saved[0] += path.suffix == ".json"

cli._write_atomic = write
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_folder_job_killed_midway_resumes_without_recomputing(tmp_path, monkeypatch, capsys) -> None:
    broken = (7, 30, 52)
    folder, out = _folder_job(tmp_path, 60, broken), tmp_path / "out"
    argv = [
        "compress",
        str(folder),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--budget",
        "8",
        "--batch-size",
        "8",
        "--quiet",
    ]
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    reports = sorted(out.glob("*.json"))
    assert len(reports) == 20 and len(list(out.glob(".*.tmp"))) == 1  # the interrupted write left its temporary
    done = {p.name: p.stat().st_mtime_ns for p in reports}

    processed = []
    forward = arrcoc.Pipeline.forward
    monkeypatch.setattr(
        arrcoc.Pipeline,
        "forward",
        lambda self, images, *a, **k: (processed.extend(images.names), forward(self, images, *a, **k))[1],
    )
    assert main([*argv, "--resume"]) == 1  # the broken files still fail
    captured = capsys.readouterr()
    assert len(processed) == 60 - len(broken) - 20  # nothing complete is computed again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name in done} == done
    good = [p.stem for p in sorted(folder.iterdir()) if int(p.stem[3:]) not in broken]
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(p.stem for p in out.glob("img???.png")) == good
    assert sorted(p.stem.removesuffix("-tokens") for p in out.glob("*-tokens.png")) == good
    assert not list(out.glob(".*.tmp"))
    assert "20 already complete, 3 failed; 37 processed" in captured.out
    for i in broken:
        line = next(line for line in captured.err.splitlines() if f"img{i:03d}" in line)
        assert line.startswith("arrcoc: failed:") and len(line.split(": ", 3)[-1]) > 10  # each with its reason
    for report in out.glob("*.json"):
        assert np.array(json.loads(report.read_text())["allocation"]).sum() == 8

    processed.clear()
    assert main([*argv, "--resume"]) == 1 and processed == []
    assert "57 already complete" in capsys.readouterr().out


def test_resume_only_keeps_valid_outputs_of_the_same_job(folder, tmp_path) -> None:
    from arrcoc.cli import _complete

    out = tmp_path / "o"
    main(["compress", str(folder / "street.png"), "--preset", "tiny", "--budget", "8", "--out", str(out), "--quiet"])
    report = json.loads((out / "street.json").read_text())
    source, key = folder / "street.png", report["job"]
    assert _complete(out, "street", source, key)
    assert not _complete(out, "street", folder / "other.png", key)  # another source
    assert not _complete(out, "street", source, "0" * 16)  # another budget, query or model
    picture = (out / "street.png").read_bytes()
    (out / "street.png").write_bytes(picture[: len(picture) // 2])  # truncated picture
    assert not _complete(out, "street", source, key)
    (out / "street.png").write_bytes(picture)
    assert _complete(out, "street", source, key, compress=True)
    (out / "street-tokens.png").unlink()  # the kept-patches picture is part of a compression's outputs
    assert not _complete(out, "street", source, key, compress=True)
    (out / "street.json").write_text('{"source": ')  # half-written report
    assert not _complete(out, "street", source, key)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--budget", "0"], ("--budget", "got 0")),
        (["--budget", "8", "--batch-size", "0"], ("--batch-size", "got 0")),
        (["--budget", "8", "--device", "bogus"], ("--device", "bogus")),
        (
            ["--budget", "8", "--device", "cuda:0"]
            if not torch.cuda.is_available()
            else ["--budget", "8", "--device", "meta"],
            ("--device",),
        ),
        (["--budget", "8", "--preset", "huge"], ("preset", "huge")),
        (["--budget", "8", "--pretrained", "/nonexistent/folder"], ("/nonexistent/folder", "config.json")),
        (["--budget", "8", "--query-embedding", "/nonexistent.pt"], ("--query-embedding", "no such file")),
        (["--budget", "8", "--query", "a red sign"], ("query", "text encoder")),
        (["--budget", "8", "--query-embedding", "GARBAGE"], ("--query-embedding", "cannot be read")),
        (["--budget", "8", "--query-embedding", "LIST"], ("--query-embedding", "tensor named 'query'", "list")),
        (["--budget", "8", "--out", "FILE"], ("--out", "output folder")),
    ],
)
def test_usage_errors_exit_2_and_name_the_option(
    folder, tmp_path, capsys, extra: list[str], words: tuple[str, ...]
) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "file").write_text("x")
    names = {"GARBAGE": str(tmp_path / "garbage.pt"), "LIST": str(tmp_path / "list.pt"), "FILE": str(tmp_path / "file")}
    extra = [names.get(a, a) for a in extra]
    out = ["--out", str(tmp_path / "o")] if "--out" not in extra else []
    preset = ["--preset", "tiny"] if "--pretrained" not in extra else []
    code = main(["compress", str(folder / "street.png"), *preset, "--quiet", *out, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("arrcoc: error:"), err
    for word in words:
        assert word in err, err


def test_an_unwritable_output_is_listed_and_the_job_goes_on(folder, tmp_path, monkeypatch, capsys) -> None:
    import arrcoc.cli as cli

    original = cli._write_atomic

    def full_disk(path, write):
        if path.stem == "wide":
            raise OSError(28, "No space left on device")
        original(path, write)

    monkeypatch.setattr(cli, "_write_atomic", full_disk)
    out = tmp_path / "o"
    assert main(["compress", str(folder), "--preset", "tiny", "--budget", "8", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "wide.jpg: cannot write its outputs" in err and "No space left" in err and "broken.png" in err
    assert sorted(p.stem for p in out.glob("*.json")) == ["street", "tall"]


@pytest.mark.parametrize("name", sorted(MODULE_COMMANDS))
def test_every_module_command_has_a_main_and_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`arrcoc NAME --help` reaches the module's own parser: the module imports and its main() prints usage."""
    module = importlib.import_module(MODULE_COMMANDS[name][0])
    assert callable(module.main)
    assert main([name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_token_boxes_keep_the_read_areas_and_dim_the_rest() -> None:
    import numpy as np
    from PIL import Image

    from arrcoc.tools.overlay import render_token_boxes

    image = Image.new("RGB", (64, 64), (200, 100, 50))
    out = np.asarray(render_token_boxes(image, [(16, 16, 48, 32)]))
    assert out[24, 30].tolist() == [200, 100, 50]  # inside a box: the image as it is
    assert out[16, 30].tolist() == [255, 255, 255]  # the box's outline
    assert (out[5, 5] < np.array([200, 100, 50])).all()  # outside: dimmed
