"""The graph benchmark without a GPU: its compile isolation (it names the stage a compiler fails on and, where that
is the score stage, the scorer), its compiled-vs-plain agreement, its start-up runs and its report."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from typing import Any

import pytest
import torch

import arrcoc
from arrcoc.config import DEFAULT_WEIGHTS_DIR
from arrcoc.tools import bench_graphs


def _fails_on_avg_pool(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
    """A compiler backend that, like inductor of torch 2.11 on the GPU, fails on the perspectival scorer's padded
    pooling (the encoder's unpadded patch pooling compiles)."""
    if any("avg_pool2d" in str(node.target) and node.kwargs.get("padding") for node in gm.graph.nodes):
        raise RuntimeError("injected: The argument '-2 + ((0))' is not comparable.")
    return gm.forward


def test_a_failing_score_stage_is_narrowed_to_its_scorer(tiny_config: arrcoc.PipelineConfig) -> None:
    pipe = arrcoc.Pipeline(tiny_config.replace(buckets=(64,)), cuda_graphs=False)
    with torch.inference_mode():
        (group,) = pipe.preprocessor([torch.rand(3, 50, 64)])
        inputs = {
            "pixels": group.pixels,
            "valid": group.valid,
            "query": torch.zeros(1, 1, pipe.width),
            "query_mask": torch.zeros(1, 1, dtype=torch.bool),
            "budget": torch.tensor([8]),
        }
        result: dict[str, Any] = {}
        bench_graphs._isolate(pipe.stages(64, 64), inputs, result, lambda: None, pipe, backend=_fails_on_avg_pool)
    assert (
        list(result["inductor_stage_errors"]) == ["score"]
        and "not comparable" in result["inductor_stage_errors"]["score"]
    )
    assert result["inductor_stages_ok"] == ["balance", "allocate", "compress", "encode"]
    assert list(result["inductor_scorer_errors"]) == ["perspectival"]
    assert result["inductor_scorers_ok"] == ["propositional", "participatory"]
    table = bench_graphs._markdown(
        {
            "device": "cpu",
            "torch": torch.__version__,
            "encoder": "tiny",
            "encoder_dtype": "float32",
            "date": "now",
            "results": [],
        }
    )
    assert "graphed" in table  # the report renders without results


def test_agreement_counts_the_images_whose_allocation_differs() -> None:
    plain = torch.randint(0, 9, (5, 2, 3), generator=torch.Generator().manual_seed(0))
    compiled = plain.clone()
    compiled[1, 0, 0] += 2  # two tokens move from one region to another
    compiled[1, 1, 2] -= 2
    compiled[3, 0, 1] += 1
    compiled[3, 0, 2] -= 1
    tokens = torch.randn(5, 4, 3)
    other = tokens.clone()
    other[1] += 100.0  # an image whose allocation differs: its slots hold other regions, not compared
    other[4, 2, 1] += 0.5
    a = bench_graphs.allocation_agreement(plain, compiled, tokens, other)
    assert (a["images"], a["equal_images"], a["equal_share"]) == (5, 3, pytest.approx(0.6))
    assert (a["max_region_diff"], a["max_moved_tokens"]) == (2, 2)
    assert a["max_abs_diff_tokens"] == pytest.approx(0.5)
    assert a["token_scale"] == pytest.approx(float(tokens.abs().max()))
    assert bench_graphs.allocation_agreement(plain, plain)["equal_share"] == 1.0
    with pytest.raises(ValueError):
        bench_graphs.allocation_agreement(plain, compiled[:4])


def test_compare_compiled_runs_every_image_through_both_pipelines(tiny_config: arrcoc.PipelineConfig) -> None:
    # on a CPU both pipelines run the same eager stages: every allocation agrees, and no image is lost to batching
    a = bench_graphs.compare_compiled(tiny_config, size=128, batch=4, images=6, device="cpu")
    assert (a["images"], a["equal_images"], a["max_abs_diff_tokens"]) == (6, 6, 0.0)
    assert a["budget"] == 16 and set(a["first_call_s"]) == {"plain", "compiled"} and not a["capture_failures"]
    assert a["mode"] == "compiled" and "compile=True" in "\n".join(bench_graphs._agreement_lines(a))
    head = {**a, "mode": "head"}
    assert 'compile="head"' in "\n".join(bench_graphs._agreement_lines(head))


def test_restart_times_each_fresh_process_from_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    caches: list[str] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        caches.append(kwargs["env"]["TORCHINDUCTOR_CACHE_DIR"])
        if command[command.index("--first-batch") + 1] == "compiled":
            return subprocess.CompletedProcess(command, 1, stdout="", stderr="Traceback: boom")
        now = time.time()
        child = {"entered_at": now + 2.0, "done_at": now + 5.0, "build_s": 1.0, "first_call_s": 2.0, "graphed": True}
        return subprocess.CompletedProcess(
            command, 0, stdout=f"log\n{bench_graphs.FIRST_BATCH_MARK}{json.dumps(child)}\n"
        )

    monkeypatch.setattr(bench_graphs.subprocess, "run", fake_run)
    saved: list[int] = []
    r = bench_graphs.time_restart(
        ["--dtype", "bfloat16", "--preset", "tiny"],
        fresh_cache=True,
        size=224,
        batch=64,
        save=lambda r: saved.append(len(r["runs"])),
    )
    assert [(run["mode"], run["run"]) for run in r["runs"]] == [
        ("plain", 1),
        ("plain", 2),
        ("compiled", 1),
        ("compiled", 2),
    ]
    assert all(4.9 < run["seconds"] < 6.0 and 1.9 < run["start_s"] < 3.0 for run in r["runs"][:2])
    assert all("entered_at" not in run and "done_at" not in run for run in r["runs"])
    assert "boom" in r["runs"][2]["error"] and saved == [1, 2, 3, 4]
    assert len(set(caches)) == 1 and caches[0] == r["cache_dir"] and r["cache_files_before"] == 0
    assert commands[0][-4:] == ["--sizes", "224", "--batches", "64"] and "tiny" in commands[0]
    table = "\n".join(bench_graphs._restart_lines(r))
    assert "| plain | 2 | 5.0 | 2.0 | 1.0 | 2.0 |" in table and "| compiled | 1 | — | — |" in table and "boom" in table
    r["runs"].append({**r["runs"][0], "mode": "background", "compiled_s": 17.25, "compiled_served": True})
    r["runs"].append({**r["runs"][0], "mode": "background", "run": 2, "compiled_s": 9.0, "compiled_served": False})
    table = "\n".join(bench_graphs._restart_lines(r))
    assert "| background | 1 | 5.0 |" in table
    assert (
        "compiled graph's first batch is done: run 1 17.2 s, run 2 9.0 s (not served by the compiled graph)." in table
    )


def _report(**extra: Any) -> dict[str, Any]:
    return {
        "device": "cpu",
        "torch": "x",
        "encoder": "tiny",
        "encoder_dtype": "bfloat16",
        "date": "now",
        "results": [],
        **extra,
    }


def test_the_report_renders_what_was_measured_and_dashes_the_rest() -> None:
    rows = bench_graphs._encoder_rows(
        [
            {"size": 224, "batch": 1, "graphed_ms": 2.0, "encoder_graphed_ms": 1.6, "chain_over_encoder": 1.25},
            {
                "size": 224,
                "batch": 64,
                "graphed_ms": 6.0,
                "encoder_graphed_ms": 5.0,
                "chain_over_encoder": 1.2,
                "graphed_compiled_ms": 5.5,
                "encoder_graphed_compiled_ms": 5.0,
                "compiled_chain_over_encoder": 1.1,
                "graphed_head_compiled_ms": 5.2,
                "head_compiled_chain_over_encoder": 1.04,
            },
            {"size": 512, "batch": 1, "graphed_ms": 3.0},  # neither encoder measured: no row
        ]
    )
    assert rows[-2] == "| 224 | 1 | 1.600 | 2.000 | 1.25x | — | — | — | — | — |"
    assert rows[-1] == "| 224 | 64 | 5.000 | 6.000 | 1.20x | 5.000 | 5.500 | 1.10x | 5.200 | 1.04x |"
    agreement = {
        "size": 224,
        "batch": 64,
        "budget": 49,
        "images": 512,
        "equal_images": 509,
        "equal_share": 509 / 512,
        "max_moved_tokens": 1,
        "max_region_diff": 1,
        "first_call_s": {"plain": 1.0},
        "capture_failures": {},
    }
    restart = {"cache_dir": "/tmp/c", "cache_files_before": 3, "runs": [{"mode": "plain", "run": 1, "error": "x"}]}
    table = bench_graphs._markdown(_report(agreement=agreement, restart=restart, encoder_kwargs={"depth": 6}))
    assert "**99.4%**" in table and "| 512 | 509 | 99.4% | 1 | 1 | — | — | 1.0 / — |" in table
    assert "| plain | 1 | — | — | — |" in table and "`tiny` [depth=6] (bfloat16)" in table
    assert "not measured (`boom`)" in bench_graphs._markdown(_report(agreement={"error": "boom"}))


def test_pretrained_builds_the_shipped_config_and_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_graphs.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--agreement", "--restart", "--pretrained", "--no-reduce-overhead"))
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(dtype="bfloat16", encoder=None, preset="default", pretrained="")
    config, weights, child = bench_graphs._config(parser, args)
    assert config == arrcoc.PipelineConfig.from_json((DEFAULT_WEIGHTS_DIR / "config.json").read_text()).replace(
        encoder_dtype="bfloat16"
    )
    assert weights is not None and weights.endswith("encoder.safetensors") and child[-2:] == ["--pretrained", ""]
    with pytest.raises(SystemExit):
        bench_graphs._config(
            parser, argparse.Namespace(dtype="float32", encoder="vit_base_patch16_224", preset="default", pretrained="")
        )


@pytest.mark.cuda
def test_first_batch_is_graphed_on_a_gpu(tiny_config: arrcoc.PipelineConfig) -> None:
    first = bench_graphs.time_first_batch(tiny_config, size=128, batch=2)
    assert first["graphed"] and first["entered_at"] < first["done_at"] <= time.time() and first["first_call_s"] > 0
    background = bench_graphs.time_first_batch(tiny_config, compile="head", in_background=True, size=128, batch=2)
    assert background["graphed"] and background["compiled_served"]
    assert background["done_at"] < background["compiled_at"] <= time.time()
