"""What a new user meets first (issue 20): the console script's errors, warnings, help and pictures."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from arrcoc.world.samples import demo_scene

ARRCOC = shutil.which("arrcoc") or pytest.skip("the arrcoc console script is not installed", allow_module_level=True)


def _arrcoc(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ARRCOC, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def street(tmp_path):
    path = tmp_path / "street.png"
    demo_scene(320, 240, seed=1).save(path)
    return path


# --- imports and --version ------------------------------------------------------------------------------------
def test_importing_the_cli_loads_no_torch() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import arrcoc.cli, sys; assert 'torch' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'timm')))",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_the_package_loads_its_public_names_lazily() -> None:
    code = (
        "import sys, arrcoc; assert 'torch' not in sys.modules; "
        "from arrcoc import Pipeline, BudgetError, GraphCache; "
        "assert all(getattr(arrcoc, n) is not None for n in arrcoc.__all__); "
        "assert set(arrcoc.__all__) <= set(dir(arrcoc)); "
        "assert Pipeline.__module__ == 'arrcoc.pipeline' and issubclass(BudgetError, arrcoc.ArrcocError); "
        "import torch; assert not torch.cuda.is_initialized(); print(arrcoc.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import arrcoc

    assert done.stdout.strip() == arrcoc.__version__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        arrcoc.Nope  # noqa: B018


def test_version() -> None:
    import arrcoc

    done = _arrcoc("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"arrcoc {arrcoc.__version__}"


# --- help -----------------------------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from arrcoc.cli import MODULE_COMMANDS, _parser

    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in action.choices.items() if name not in MODULE_COMMANDS}


@pytest.mark.parametrize("name", ["compress", "score", "demo", "generate"])
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    parser = _subparsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest} has no help"
        if action.option_strings and action.default is not None and not action.required:
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


@pytest.mark.parametrize("name", ["bench", "eval", "compress-dataset"])
def test_module_commands_show_their_defaults(name: str) -> None:
    from arrcoc.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([name, "--help"]) == 0
    text = out.getvalue()
    assert text.startswith("usage:") and "(default: " in text
    if name == "bench":
        assert "--graphs" in text and "(default: arrcoc-results)" in " ".join(text.split())
    if name == "compress-dataset":  # a default once, and none where the help says what happens
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default 64) (default: 64)" not in flat
        assert "images per pipeline call (default 64)" in flat and "(default: float32)" in flat


def test_help_through_the_console_script() -> None:
    done = _arrcoc("generate", "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and "--max-new-tokens" in text and "longest answer, in tokens (default: 64)" in text
    assert "(default: auto)" in text
    bench = _arrcoc("bench", "--help")
    assert bench.returncode == 0 and "--graphs" in bench.stdout


@pytest.mark.parametrize("module", ["bench", "bench_dataset", "bench_generation", "bench_graphs", "evaluation"])
def test_benchmarks_never_write_the_committed_results_by_default(module: str) -> None:
    import importlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(f"arrcoc.tools.{module}").main(["--help"])
    text = " ".join(out.getvalue().split())
    assert "(default: arrcoc-results)" in text and "(default: bench/results)" not in text


# --- queries --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_query_is_its_own_error(street, tmp_path, query: str) -> None:
    done = _arrcoc("compress", str(street), "--budget", "8", "--out", str(tmp_path / "o"), "--query", query, "--quiet")
    assert done.returncode == 2 and done.stderr.startswith("arrcoc: error: --query is empty"), done.stderr
    assert "NaN" not in done.stderr and "Traceback" not in done.stderr


def test_the_text_query_encoder_refuses_an_empty_question() -> None:
    from arrcoc.errors import InvalidInputError
    from arrcoc.stages.text_query import TextQueryConfig, TextQueryEncoder

    encoder = TextQueryEncoder(TextQueryConfig(width=8, dim=8, layers=1, heads=1))
    with pytest.raises(InvalidInputError, match="query 1 is empty"):
        encoder(["What color is the circle?", " \n"])


def test_unknown_words_are_named_in_a_warning(tmp_path, caplog) -> None:
    from arrcoc.stages.text_query import TextQueryConfig, TextQueryEncoder

    encoder = TextQueryEncoder(TextQueryConfig(width=8, dim=8, layers=1, heads=1), words=["What", "color", "is", "the"])
    with caplog.at_level(logging.WARNING, logger="arrcoc.stages.text_query"):
        encoder("what color is the circle?")
        encoder("what color is the circle?")  # once per question
        encoder("What color is the?")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'circle'" in warnings[0] and "generated world's vocabulary" in warnings[0]
    encoder.save_pretrained(tmp_path)
    assert TextQueryEncoder.from_pretrained(tmp_path).words == {"what", "color", "is", "the"}


def test_the_shipped_encoder_knows_every_generated_question(caplog) -> None:
    from arrcoc.config import DEFAULT_WEIGHTS_DIR
    from arrcoc.stages.text_query import TEXT_QUERY_FILE, TextQueryEncoder
    from arrcoc.world.data import QUESTION_FAMILIES, make_sample

    if not (DEFAULT_WEIGHTS_DIR / TEXT_QUERY_FILE).is_file():
        pytest.skip("no trained text query encoder shipped")
    encoder = TextQueryEncoder.from_pretrained(DEFAULT_WEIGHTS_DIR)
    assert encoder.words
    questions = [make_sample(seed, 224, family).question for seed in range(6) for family in QUESTION_FAMILIES]
    assert not [q for q in questions if encoder.unknown_words(q)]
    assert encoder.unknown_words("Where is the red sign?") == ["Where", "sign"]


def test_a_query_with_unknown_words_warns_through_the_cli(street, tmp_path) -> None:
    from arrcoc.config import DEFAULT_WEIGHTS_DIR
    from arrcoc.stages.text_query import TEXT_QUERY_FILE

    if not (DEFAULT_WEIGHTS_DIR / TEXT_QUERY_FILE).is_file():
        pytest.skip("no trained text query encoder shipped")
    done = _arrcoc(
        "compress",
        str(street),
        "--budget",
        "8",
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--query",
        "where is the red sign?",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    warning = next(line for line in done.stderr.splitlines() if "never saw" in line)
    assert "'where', 'sign'" in warning and "generated world's vocabulary" in warning


# --- files and names ------------------------------------------------------------------------------------------
def test_failures_name_the_file_once_and_skipped_files_are_counted(tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    demo_scene(320, 240, seed=1).save(folder / "street.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (folder / "notes.txt").write_text("not a picture")
    (folder / "data.csv").write_text("1,2")
    (folder / ".DS_Store").write_bytes(b"\0")
    argv = ["compress", str(folder), "--preset", "tiny", "--budget", "8", "--out", str(tmp_path / "o"), "--quiet"]
    done = _arrcoc(*argv)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if line.startswith("arrcoc: failed:")]
    assert len(failed) == 1 and failed[0].count("broken.png") == 1, failed
    skipped = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "skipped 2 files" in skipped[0] and "not images" in skipped[0]
    assert "notes.txt" not in done.stderr and "--verbose" in skipped[0]
    verbose = _arrcoc(*argv, "--verbose")
    assert "notes.txt" in verbose.stderr and "data.csv" in verbose.stderr and ".DS_Store" not in verbose.stderr


def test_messages_about_a_file_name_the_file(street, tmp_path) -> None:
    done = _arrcoc(
        "compress", str(street), "--preset", "tiny", "--budget", "100000", "--out", str(tmp_path / "o"), "--quiet"
    )
    assert done.returncode == 1
    line = next(line for line in done.stderr.splitlines() if line.startswith("arrcoc: failed:"))
    assert "(Tensor)" not in line and line.count(os.fspath(street)) == 1 and "100000" in line, line


def test_the_pipeline_is_told_the_file_names(street, tmp_path, monkeypatch) -> None:
    import arrcoc
    from arrcoc.cli import main

    names = []
    forward = arrcoc.Pipeline.forward
    monkeypatch.setattr(
        arrcoc.Pipeline,
        "forward",
        lambda self, images, *a, **k: (names.extend(images.names), forward(self, images, *a, **k))[1],
    )
    assert (
        main(["compress", str(street), "--preset", "tiny", "--budget", "8", "--out", str(tmp_path / "o"), "--quiet"])
        == 0
    )
    assert names == [os.fspath(street)]


# --- generate -------------------------------------------------------------------------------------------------
def test_generate_with_a_folder_that_is_no_model_is_a_clear_error(street, tmp_path) -> None:
    done = _arrcoc("generate", str(street), "--prompt", "What color is the circle?", "--model", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("arrcoc: error: --model must be") and "vlm.json" in done.stderr


def test_generate_serves_the_shipped_vlm(tmp_path) -> None:
    pytest.importorskip("transformers")
    from arrcoc.world.data import make_sample
    from arrcoc.world.vlm import DEFAULT_VLM_DIR

    if not (DEFAULT_VLM_DIR / "vlm.safetensors").is_file():
        pytest.skip("no trained VLM in weights/")
    sample = make_sample(600_000, 384, "color")
    sample.image.save(tmp_path / "scene.png")
    done = _arrcoc(
        "generate",
        str(tmp_path / "scene.png"),
        "--prompt",
        sample.question,
        "--model",
        os.fspath(DEFAULT_VLM_DIR),
        "--budget",
        "64",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == sample.answer


# --- pictures -------------------------------------------------------------------------------------------------
def test_compress_writes_the_kept_patches_and_their_positions(street, tmp_path) -> None:
    out = tmp_path / "o"
    done = _arrcoc("compress", str(street), "--preset", "tiny", "--budget", "12", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "street.json").read_text())
    tokens = report["tokens"]
    assert tokens["fields"] == ["row", "col", "height", "width"] and tokens["unit"] == "patches"
    positions = np.array(tokens["positions"])
    assert positions.shape == (12, 4) and len({tuple(p) for p in positions.tolist()}) == 12
    side = tokens["patch_pixels"]
    height, width = report["source_size"]
    assert (positions[:, 0] * side < height).all() and (positions[:, 1] * side < width).all()  # never padding

    source = np.asarray(Image.open(street).convert("RGB"), dtype=int)
    kept = np.asarray(Image.open(out / "street-tokens.png").convert("RGB"), dtype=int)
    assert kept.shape == source.shape
    inside = np.zeros(source.shape[:2], bool)
    for row, col, h, w in positions:
        y0, x0 = round(row * side), round(col * side)
        inside[y0 + 1 : round((row + h) * side) - 1, x0 + 1 : round((col + w) * side) - 1] = True
    assert (kept[inside] == source[inside]).all()  # the kept patches as they are
    assert (kept[~inside].sum(-1) < source[~inside].sum(-1) * 0.7 + 3).mean() > 0.95  # the rest dimmed


def test_the_overlay_has_a_colour_bar_and_small_labels(tiny_pipe) -> None:
    from arrcoc.tools.overlay import heat_colors, render_overlay

    image = Image.new("RGB", (448, 448), (128, 128, 128))
    result = tiny_pipe(image, budget=40)
    plain = np.asarray(render_overlay(image, result, alpha=0.0, legend=False), dtype=int)
    labelled = np.asarray(render_overlay(image, result, alpha=0.0), dtype=int)
    assert labelled.shape[1] == 448 and labelled.shape[0] > 448 and (labelled[:448] == plain).all()

    strip = labelled[448:]
    row = max(range(strip.shape[0]), key=lambda y: len({tuple(p) for p in strip[y]}))  # the colour bar's row
    colours = strip[row]
    ramp = heat_colors(np.linspace(0, 1, 64))
    assert min(np.abs(colours - ramp[0]).sum(-1)) < 12 and min(np.abs(colours - ramp[-1]).sum(-1)) < 12

    cell = result.patch_pixels(0) * result.region_size
    rh, rw = (int(v) for v in result.region_grid[0])
    for r in range(rh):
        for c in range(rw):  # each count sits in its cell's corner: the middle of every cell stays untouched
            y0, x0 = round((r + 0.3) * cell), round((c + 0.3) * cell)
            y1, x1 = round((r + 0.7) * cell), round((c + 0.7) * cell)
            assert (plain[y0:y1, x0:x1] == 128).all(), (r, c)
    assert (plain != 128).any(axis=-1).mean() < 0.2  # lines and labels cover little of the picture


def test_demo_writes_the_kept_patches(tmp_path) -> None:
    from arrcoc.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--preset", "tiny", "--out", str(tmp_path), "--no-question", "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "scene-tokens.png").size == Image.open(tmp_path / "scene.png").size


def test_compress_cap_budget_caps_an_over_large_budget_and_says_so(tmp_path) -> None:
    """Through the console script: a budget above a wide image's real patches fails that image without
    --cap-budget, and with it is capped at the real patches, the JSON giving the budget used."""
    import json

    import numpy as np
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 400, 3), dtype=np.uint8)).save(wide)
    failed = _arrcoc("compress", str(wide), "--budget", "500", "--out", str(tmp_path / "a"), "--quiet")
    assert failed.returncode == 1 and "real patches" in failed.stderr and "budget_policy='cap'" in failed.stderr
    done = _arrcoc("compress", str(wide), "--budget", "500", "--cap-budget", "--out", str(tmp_path / "b"), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "b" / "wide.json").read_text())
    rows, cols = report["patch_grid"]  # the 512 px bucket: the image spans every column and a quarter of the rows
    real = cols * -(-rows * 100 // 400)
    assert report["budget"] == real < 500 and len(report["tokens"]["positions"]) == real
