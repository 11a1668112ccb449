"""Qwen-VL generation benchmark: time to first token and decode tokens/s, every image token vs arrcoc's share.

``python -m arrcoc.tools.bench_qwen --out DIR`` builds a Qwen2.5-VL-7B-shaped model (its vision tower with window
attention and patch merger, its 28-layer language model; bf16, random weights made directly on the GPU from a
config: nothing is downloaded) and, on 1,280 x 960 images (34 x 46 = 1,564 merged tokens each), measures at
batch 1 and 8:

- the unmodified model reading every merged token (``model.generate(**inputs)``, the 100% row);
- :class:`arrcoc.integrations.qwen.ArrcocQwen` keeping 25% and 11% of each image's tokens, the question
  steering the reducer (``adapter.generate``, transformers' own ``generate`` underneath).

``--decode graphed`` runs every row, the 100% row included (:meth:`ArrcocQwen.unreduced`), through the graphed
decoder instead (a static KV cache, the prefill and each step replayed as CUDA graphs): transformers' eager
forward is launch-bound at batch 1, so there the language model's time barely follows the token count.

Time to first token is ``generate(max_new_tokens=1)`` from pixel values on the device to the first token id,
synchronised: vision tower, arrcoc's reduction (for the reduced rows), prefill. Each row first runs every call it
times once (compiles and graph captures happen there) and counts the graphs compiled while timing (0 expected).
Decode tokens/s per sequence is ``new / (t(1 + new) - t(1))``. arrcoc's own time is the adapter's ``prepare`` minus
the model's own vision tower (tokenising, the query, the reduction, positions, slot filling), the two timed
interleaved: the median of their call-by-call differences. Wall-clock medians after a warm-up; image preprocessing
(the processor's resize) is excluded from every row alike. ``--tiny`` runs a two-layer model on small images on any
device (a CPU test runs it end to end). Writes ``generation-qwen-<device>.json`` and ``.md`` under ``--out``, with
the reducer-graph captures a corpus of 100 photo sizes costs under the adapter's grid bucketing.

Vision tower. Without flash-attn, transformers runs Qwen2.5-VL's windowed vision attention as one call per
window; ``--vision-tower packed`` (the default) runs every row, the 100% row included, with
:func:`arrcoc.integrations.vision_tower.pack_vision_tower` (one attention call per layer, the patch embedding as
one matrix product), so each row is the same model and the ratios compare token counts alone. The unpacked
model's batch-1 time to first token at 100% is measured first, in the same process, as a reference, and the
vision tower alone with the attention packed and then with the patch embedding too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..integrations.hf import word_tokenizer
from ..integrations.qwen import ArrcocQwen, graph_buckets, kept_units, merged_grid
from ..integrations.vision_tower import pack_vision_tower
from ..runtime.device import device_name
from .bench_generation import random_model
from .timing import paired_wall_times_ms, wall_times_ms, write_report

__all__ = ["main", "build_qwen", "qwen_adapter", "PRESETS", "corpus_captures"]

logger = logging.getLogger(__name__)

WORDS = "USER ASSISTANT : what is written on the sign left of the red car and which way does it point ?".split()
TEMPLATE = "USER: {image} {question} ASSISTANT:"
QUESTION = "what is written on the sign left of the red car and which way does it point ?"
SHARES = (1.0, 0.25, 0.11)
#: Qwen2.5-VL-7B-Instruct's processor bounds (``min_pixels``, ``max_pixels``).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384
_IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8)

#: name -> (vision config, text config, image (height, width), batches)
PRESETS: dict[str, tuple[dict, dict, tuple[int, int], tuple[int, ...]]] = {
    "qwen2.5-vl-7b": (
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        (960, 1280),
        (1, 8),
    ),
    "tiny": (
        dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        dict(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        (240, 320),
        (1, 2),
    ),
}


def build_qwen(preset: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Qwen2.5-VL of the preset's shape, built directly on ``device`` in ``dtype``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision, text, _, _ = PRESETS[preset]
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config={**text, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, **_IDS
    )
    model = random_model(lambda: Qwen2_5_VLForConditionalGeneration(config), device, dtype)
    model.generation_config.eos_token_id = None  # random weights: always generate the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model


def qwen_adapter(
    model: torch.nn.Module,
    method: str = "arrcoc",
    grid_multiple: int = 8,
    prune_after: int | str | None = None,
    score_width: int | str | None = "auto",
    compile_reducer: bool = False,
    tower_graphs: str = "off",
) -> ArrcocQwen:
    """The benchmark's adapter: a word tokenizer built offline and Qwen2.5-VL-7B-Instruct's released processor
    settings, the image at its own resolution up to 12.8 MP (transformers' class default caps at 1 MP, which would
    read 1,280 x 960 at 30 x 41 tokens, not 34 x 46); ``prune_after``, ``score_width``, ``compile_reducer`` and
    ``tower_graphs`` as in :class:`ArrcocQwen`."""
    import transformers

    images = transformers.Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    tokenizer = word_tokenizer(WORDS, image_token_id=_IDS["image_token_id"], image_token="<|image_pad|>")
    processor = argparse.Namespace(tokenizer=tokenizer, image_processor=images)
    return ArrcocQwen(
        model,
        processor,
        method=method,
        template=TEMPLATE,
        grid_multiple=grid_multiple,
        prune_after=prune_after,
        score_width=score_width,
        compile_reducer=compile_reducer,
        tower_graphs=tower_graphs,
    )


def corpus_captures(multiple: int, count: int = 100, seed: int = 0) -> dict[str, Any]:
    """Reducer-graph captures for ``count`` photo sizes (long side 640-1,600 px, common aspect ratios, either
    orientation) under Qwen's default resize, with grid sides rounded up to ``multiple`` (1: no bucketing)."""
    rng = random.Random(seed)
    ratios = (4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4)
    sizes = []
    for _ in range(count):
        long = rng.randint(640, 1600)
        short = round(long / rng.choice(ratios))
        sizes.append((long, short) if rng.random() < 0.5 else (short, long))
    grids = [merged_grid(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for h, w in sizes]
    return {
        "sizes": count,
        "distinct_grids": len(set(grids)),
        "multiple": multiple,
        "captures_per_budget": len(graph_buckets(grids, multiple)),
    }


class _Timer:
    """Median wall milliseconds of a synchronised call (:func:`arrcoc.tools.timing.wall_times_ms`); :meth:`pair`
    times two calls interleaved."""

    def __init__(self, device: torch.device, warmups: int, repeats: int) -> None:
        self.device, self.warmups, self.repeats = device, warmups, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        return statistics.median(wall_times_ms(fn, self.device, self.warmups, self.repeats))

    def pair(self, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[float, float]:
        """(median of ``first``, median of ``second`` minus ``first`` call pair by call pair): what ``second`` adds
        to ``first``, without the drift between two separate runs of medians."""
        a, b = paired_wall_times_ms([first, second], self.device, self.warmups, self.repeats)
        return statistics.median(a), statistics.median([y - x for x, y in zip(a, b)])


def _images(size: tuple[int, int], batch: int) -> list[torch.Tensor]:
    """``batch`` uint8 images: smooth colour fields with a few bright boxes, different per image."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    out = []
    for _ in range(batch):
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(h, w), mode="bilinear")[0]
        for _ in range(4):
            y, x = (
                int(torch.randint(0, h - h // 6, (1,), generator=gen)),
                int(torch.randint(0, w - w // 6, (1,), generator=gen)),
            )
            base[:, y : y + h // 6, x : x + w // 6] = torch.rand(3, 1, 1, generator=gen)
        out.append((base * 255).to(torch.uint8))
    return out


def _row(
    adapter: ArrcocQwen,
    images: list[torch.Tensor],
    share: float,
    new: int,
    measure: _Timer,
    decode: bool = True,
    engine: str = "hf",
) -> dict[str, Any]:
    model = adapter.model
    prompts = [QUESTION] * len(images)
    inputs = adapter.image_processor(images=images, return_tensors="pt")
    device = model.get_input_embeddings().weight.device
    pixels = {"pixel_values": inputs["pixel_values"].to(device), "image_grid_thw": inputs["image_grid_thw"].to(device)}
    full = share == 1.0
    if engine == "graphed":  # the same static-cache decoder for every row, 100% included

        def run(n: int) -> Any:
            prepared = adapter.unreduced(pixels, prompts) if full else adapter.prepare(pixels, prompts, share)
            return adapter.generate_prepared(prepared, decode="graphed", max_new_tokens=n)
    elif full:
        reference = adapter.reference_inputs(pixels, prompts)

        def run(n: int) -> Any:
            return model.generate(**reference, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    else:

        def run(n: int) -> Any:
            return adapter.generate(pixels, prompts, share, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    pruned = adapter.prune_after is not None and not full
    with torch.inference_mode():
        grids = adapter.merged_grids(pixels["image_grid_thw"])
        budgets = adapter.budgets(None if full else share, grids)
        tokens = budgets[0]
        if pruned:  # the units prepare keeps: a windowed tail's cost depends on how they spread over the windows
            units = kept_units(adapter.prepare(pixels, prompts, share).reduced, grids)
            tower = lambda: _pruned_tower(adapter, pixels["pixel_values"], grids, budgets, units)  # noqa: E731
        else:
            tower = lambda: adapter.merged_features(pixels["pixel_values"], pixels["image_grid_thw"])  # noqa: E731
        calls = [lambda: run(1), tower] + ([lambda: run(1 + new)] if decode else [])
        calls += [] if full else [lambda: adapter.prepare(pixels, prompts, share)]
        for call in calls:  # every shape this row times compiles (and captures) here, before any timing
            call()
        compiled = _compiles()
        ttft = measure(lambda: run(1))
        total = measure(lambda: run(1 + new)) if decode else ttft
        if full:
            vision, own = measure(tower), 0.0
        else:  # prepare and the tower alone interleaved: their difference is taken call by call
            vision, own = measure.pair(tower, lambda: adapter.prepare(pixels, prompts, share))
            own = max(0.0, own)
        compiled = _compiles() - compiled
    if compiled:
        logger.warning("%d graphs compiled while timing a row (share %s, batch %d)", compiled, share, len(images))
    elapsed = total - ttft  # a non-positive difference (noise on a tiny run) gives no rate
    rate = new * 1e3 / elapsed if elapsed > 0 else None
    return {
        "share": share,
        "batch": len(images),
        "path": "every token" if full else "pruned" if pruned else "post-tower",
        "tower_graphs": pruned and adapter.tower_graphs != "off",
        "decode": engine,
        "prune_after": adapter.prune_after if pruned else None,
        "image_tokens": tokens,
        "merged_tokens": grids[0][0] * grids[0][1],
        "ttft_ms": ttft,
        "vision_ms": vision,
        "arrcoc_ms": own,
        "arrcoc_share_of_ttft": own / ttft,
        "decode_tok_s": rate,
        "decode_tok_s_batch": None if rate is None else len(images) * rate,
        "compiles_while_timing": compiled,
    }


def _compiles() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _pruned_tower(
    adapter: ArrcocQwen,
    pixel_values: torch.Tensor,
    grids: list[tuple[int, int]],
    budgets: list[int],
    units: torch.Tensor,
) -> torch.Tensor:
    """The vision tower's own work when pruning after ``adapter.prune_after`` keeping ``units``
    (:func:`~arrcoc.integrations.qwen.kept_units` of a ``prepare``: in windowed blocks the tail's cost depends on
    how the kept units spread over the windows): its plan, every patch up to the pruning block, the rest and the
    merger on the kept units. No merger at the pruning block, no head: those are arrcoc's. The plan is the
    adapter's (:meth:`ArrcocQwen.plan`, kept per shape), as in its ``prepare``."""
    plan = adapter.plan(grids, budgets, pixel_values.device)
    state = adapter.tower_head_graphed(pixel_values, plan)  # the adapter's replays with tower_graphs, else direct
    return adapter.tower_tail_graphed(state, plan, units, tuple(budgets))[0]


def _vision_ms(adapter: ArrcocQwen, images: list[torch.Tensor], measure: Callable) -> float:
    """Median milliseconds of the vision tower alone (patch embedding to merged tokens) on ``images``."""
    inputs = adapter.image_processor(images=images, return_tensors="pt")
    device = adapter.model.get_input_embeddings().weight.device
    pixels, grid = inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device)
    with torch.inference_mode():
        return measure(lambda: adapter.merged_features(pixels, grid))


def _path(row: dict[str, Any]) -> str:
    """How a row reduced: after the tower, or pruning inside it after block ``L``."""
    if row.get("path") == "pruned":
        return f"pruned after block {row['prune_after']}" + (", tower graphed" if row.get("tower_graphs") else "")
    return "post-tower" if row["share"] < 1.0 else "every token"  # reports from before the pruned path: no path


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Qwen-VL generation, every image token vs arrcoc — {report['device']}",
        "",
        f"{report['date']}; torch {report['torch']}, transformers {report['transformers']}; model "
        f"`{report['preset']}` ({report['dtype']}, random weights), reducer `{report['method']}`, image "
        f"{report['image'][1]} x {report['image'][0]} px, {report['new_tokens']} new tokens, median of "
        f"{report['repeats']}, attention `{report['attention']}`, vision tower `{report['vision_tower']}`, relevance head width "
        f"{report.get('score_width') or 'full'}. "
        + (
            'Every row decodes with the graphed decoder (`decode="graphed"`: a static KV cache, the prefill and '
            "each step replayed as CUDA graphs), the 100% row too (`ArrcocQwen.unreduced`: every merged token, no "
            "reducer); "
            if report.get("decode") == "graphed"
            else "100% is the model reading every token through its own generate; "
        )
        + "arrcoc's own time (in the time to first token) is the adapter's prepare minus the vision tower, the two timed interleaved and differenced call by call (median). Pruned rows reduce inside the tower "
        "(`ArrcocQwen(prune_after=L)`): their vision ms is the tower's own work at that budget (every patch up to "
        "block L, the rest and the merger on the units prepare keeps, with the index plan, kept per shape as in "
        "prepare), and their arrcoc ms all the adapter adds to it (the merger at block L, the query, the head, "
        "positions, slot filling). Rows marked *tower graphed* replay the pruned tower's parts as CUDA graphs "
        '(`ArrcocQwen(tower_graphs="auto")`): their vision ms is the replays of the blocks up to L and of the '
        "tail, the merger at block L a replay of its own among arrcoc's.",
        "",
    ]
    if report.get("unpacked_ttft_ms") is not None:
        wide_batch = report.get("steps_batch", "-")  # batch 1 alone: no second column measuring the same thing
        lines += [
            "Every row runs the vision tower packed (`arrcoc.integrations.vision_tower`: one attention call per "
            "layer, the patch embedding as one matrix product, the gated MLP's gate and up as one product padded "
            "to an aligned width"
            + (", each block compiled with torch.compile" if report.get("compiled") else "")
            + ("; the reducer compiled before its graph is captured" if report.get("compiled_reducer") else "")
            + "). The model's own vision tower, same process, batch "
            f"1, 100%: time to first token {report['unpacked_ttft_ms']:.1f} ms, vision tower "
            f"{report['unpacked_vision_ms']:.1f} ms. What each step buys (each row adds to the one above):",
            "",
            "| vision tower | vision ms, batch 1 "
            + (f"| vision ms, batch {wide_batch} " if wide_batch != 1 else "")
            + "| TTFT ms, batch 1, 100% | decode tok/s, batch 1 |",
            "|---|---:|---:|---:|" + ("---:|" if wide_batch != 1 else ""),
            *(
                f"| {name} | {v['vision_ms']:.1f} | "
                + (f"{v['vision_ms_wide']:.1f} | " if wide_batch != 1 else "")
                + f"{v['ttft_ms']:.1f} | {_num(v['decode_tok_s'])} |"
                for name, v in report.get("vision_steps", {}).items()
            ),
            "",
        ]
    lines += [
        "| batch | share | path | image tokens | TTFT ms | vs 100% | vision ms | arrcoc ms | arrcoc / TTFT "
        "| decode tok/s (per seq) | decode tok/s (batch) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["batch"]: r["ttft_ms"] for r in report["rows"] if r["share"] == 1.0}  # every token, per batch
    for r in report["rows"]:
        speed = base.get(r["batch"], float("nan")) / r["ttft_ms"]
        lines.append(
            f"| {r['batch']} | {r['share']:.0%} | {_path(r)} | {r['image_tokens']} | {r['ttft_ms']:.1f} | {speed:.2f}x | "
            f"{r['vision_ms']:.1f} | {r['arrcoc_ms']:.1f} | {r['arrcoc_share_of_ttft']:.1%} | "
            f"{_num(r['decode_tok_s'])} | {_num(r['decode_tok_s_batch'])} |"
        )
    targets = []
    for path, graphed in (("post-tower", False), ("pruned", False), ("pruned", True)):
        rows = [
            r
            for r in report["rows"]
            if r.get("path", "post-tower") == path and r["share"] < 1.0 and bool(r.get("tower_graphs")) == graphed
        ]
        for batch, wanted in ((8, 3.0), (1, 1.5)):  # issue 23's two targets
            row = next((r for r in rows if r["share"] == 0.11 and r["batch"] == batch), None)
            if row is not None and batch in base:
                speed = base[batch] / row["ttft_ms"]
                verdict = "met" if speed >= wanted else "not met"
                targets.append(
                    f"{_path(row)}: TTFT at 11%, batch {batch}: {speed:.2f}x (target >= {wanted}x: {verdict})"
                )
        unpacked = report.get("unpacked_ttft_ms")
        row = next((r for r in rows if r["share"] == 0.11 and r["batch"] == 1), None)
        if unpacked is not None and row is not None:
            targets.append(
                f"{_path(row)}: against the model's own unpacked 100% at batch 1: {unpacked / row['ttft_ms']:.2f}x"
            )
        steps = list(report.get("vision_steps", {}).values())
        if report.get("decode") == "graphed" and steps and row is not None:  # the same tower, transformers' generate
            targets.append(
                f"{_path(row)}: against every token through transformers' generate (same vision tower) at batch 1: "
                f"{steps[-1]['ttft_ms'] / row['ttft_ms']:.2f}x"
            )
        own = [r["arrcoc_share_of_ttft"] for r in rows]
        if own:
            targets.append(
                f"{path}{', tower graphed' if graphed else ''}: arrcoc's own share of the reduced TTFT at most {max(own):.1%} (target <= 5%: "
                f"{'met' if max(own) <= 0.05 else 'not met'})"
            )
    if targets:
        lines += ["", "Issue 23's targets: " + "; ".join(targets) + "."]
    late = [f"{r['share']:.0%} x {r['batch']} ({_path(r)})" for r in report["rows"] if r.get("compiles_while_timing")]
    lines += [
        "",
        "Each row runs every call it times once before timing it (compiles and graph captures happen there); "
        + (
            f"graphs still compiled while timing: {', '.join(late)}." if late else "no graph was compiled while timing."
        ),
    ]
    c = report["captures"]
    lines += [
        "",
        f"Reducer-graph captures for {c['sizes']} photo sizes (640-1,600 px long side, "
        f"{c['distinct_grids']} distinct merged grids), per batch size and question-length bucket: "
        f"{c['captures_per_budget']} with grid sides rounded up to {c['multiple']} (without bucketing: "
        f"{report['captures_unbucketed']}). arrcoc's reducers read the budget as a tensor, so that count holds "
        "for every budget and share at once; a baseline reducer needs it for each budget. This run captured "
        f"{report.get('reducer_captures', '-')}.",
    ]
    if report["skipped"]:
        lines.append(f"\nSkipped past the time limit: {', '.join(report['skipped'])}.")
    for name, text in report["errors"].items():
        lines.append(f"\n**{name} failed**: {text}")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arrcoc.tools.bench_qwen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and markdown reports")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model on small images (any device)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--method", default="arrcoc", help="reducer name (default arrcoc)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode tokens timed (default 32, tiny 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--grid-multiple", type=int, default=8, help="graph buckets: grid sides rounded up to this")
    parser.add_argument(
        "--attn",
        default="auto",
        help="attention kernel (auto: flash_attention_2 where flash-attn is installed, else sdpa; under sdpa "
        "Qwen2.5-VL's vision tower runs one attention call per window, a cost both paths share)",
    )
    parser.add_argument(
        "--vision-tower",
        choices=("packed", "model"),
        default="packed",
        help="packed: one attention call per vision layer and the patch embedding as one matrix product, for every "
        "row (pack_vision_tower); model: the model's own vision tower",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --vision-tower packed: also compile each vision block (pack_vision_tower(compile=True))",
    )
    parser.add_argument(
        "--static-shapes",
        action="store_true",
        help="with --compile: compile each token count on its own (torch.compile dynamic=False), no dynamic kernels",
    )
    parser.add_argument(
        "--prune-after",
        default=None,
        help="also time reducing inside the vision tower after this block (an index, or auto), as rows of their own",
    )
    parser.add_argument(
        "--score-width",
        default="auto",
        help="the relevance head's width (ArrcocQwen(score_width=)): a number, auto (the default) or full",
    )
    parser.add_argument(
        "--compile-reducer",
        action="store_true",
        help="torch.compile the reducer before its CUDA graph is captured (ArrcocQwen(compile_reducer=True))",
    )
    parser.add_argument(
        "--tower-graphs",
        action="store_true",
        help="with --prune-after: also the pruned rows with the tower's parts replayed as CUDA graphs "
        "(ArrcocQwen(tower_graphs='auto'))",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: the preset's); one per process keeps other batches' shapes out of the compiles",
    )
    parser.add_argument(
        "--decode",
        choices=("hf", "graphed"),
        default="hf",
        help="hf: transformers' generate (the 100%% row the model's own); graphed: every row, 100%% included, through "
        "the static-cache decoder with its prefill and steps replayed as CUDA graphs (ArrcocQwen decode='graphed')",
    )
    parser.add_argument("--time-limit", type=float, default=130.0, help="seconds; rows past it are skipped")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every (share, batch) row; returns 0 when all ran without error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = "tiny" if args.tiny else "qwen2.5-vl-7b"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = args.new_tokens or (4 if args.tiny else 32)
    _, _, size, batches = PRESETS[preset]
    batches = tuple(args.batches or batches)
    start = time.perf_counter()
    model = build_qwen(preset, device, dtype)
    attn = args.attn
    if attn == "auto":
        attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    model.set_attn_implementation(attn)
    width = {"auto": "auto", "full": None}[args.score_width] if args.score_width in ("auto", "full") else None
    width = int(args.score_width) if width is None and args.score_width != "full" else width
    fused = args.compile_reducer
    adapter = qwen_adapter(model, args.method, args.grid_multiple, score_width=width, compile_reducer=fused)
    prune = args.prune_after
    pruning = graphed = None
    if prune is not None:
        prune = prune if prune == "auto" else int(prune)
        options = dict(prune_after=prune, score_width=width, compile_reducer=fused)
        pruning = qwen_adapter(model, args.method, args.grid_multiple, **options)
        if args.tower_graphs:
            backend = "auto" if device.type == "cuda" else "eager"  # elsewhere the graph chain's host path
            graphed = qwen_adapter(model, args.method, args.grid_multiple, tower_graphs=backend, **options)
    if args.static_shapes:  # each token count its own compile: the batches' and budgets' counts in one process
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    report: dict[str, Any] = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "method": args.method,
        "image": list(size),
        "new_tokens": new,
        "repeats": args.repeats,
        "grid_multiple": args.grid_multiple,
        "attention": attn,
        "vision_tower": args.vision_tower,
        "decode": args.decode,
        "compiled": False,
        "static_shapes": args.static_shapes,
        "prune_after": None if pruning is None else pruning.prune_after,
        "score_width": adapter.score_width,
        "unpacked_ttft_ms": None,
        "skipped": [],
        "rows": [],
        "errors": {},
        "captures": corpus_captures(args.grid_multiple),
        "captures_unbucketed": corpus_captures(1)["captures_per_budget"],
    }
    name = "generation-qwen-" + ("cpu" if device.type == "cpu" else report["device"])
    name += "-graphed" if args.decode == "graphed" else ""
    measure = _Timer(device, warmups=args.warmups, repeats=args.repeats)
    if args.vision_tower == "packed":
        # the reference first: the model's own vision tower, every token, batch 1; then what each change buys
        reference = _row(adapter, _images(size, 1), 1.0, 1, measure, decode=False)
        report["unpacked_ttft_ms"] = reference["ttft_ms"]
        report["unpacked_vision_ms"] = reference["vision_ms"]
        # what each step buys, vision tower alone at batch 1 and the largest batch
        steps = {
            "attention packed": dict(patch_embed=False, mlp=False),
            "+ patch embedding": dict(mlp=False),
            "+ MLP aligned": {},
        }
        if args.compile:
            steps["+ blocks compiled"] = dict(compile=True, dynamic=False if args.static_shapes else None)
        report["steps_batch"] = batches[-1]
        report["vision_steps"] = {}
        for step, options in steps.items():
            pack_vision_tower(model, **options)
            start_step = time.perf_counter()
            wide = _vision_ms(adapter, _images(size, batches[-1]), measure)  # compiles both shapes first
            one = _row(adapter, _images(size, 1), 1.0, new, measure)  # every token, batch 1
            report["vision_steps"][step] = {
                "vision_ms": one["vision_ms"],
                "vision_ms_wide": wide,
                "ttft_ms": one["ttft_ms"],
                "decode_tok_s": one["decode_tok_s"],
                "seconds": time.perf_counter() - start_step,
            }
        report["compiled"] = args.compile
        report["compiled_reducer"] = args.compile_reducer
    runs = [(adapter, share, "") for share in SHARES]
    if pruning is not None:  # the pruned rows beside the post-tower ones (the 100% row is the same model's)
        runs += [(pruning, share, " pruned") for share in SHARES if share < 1.0]
    if graphed is not None:
        runs += [(graphed, share, " tower graphed") for share in SHARES if share < 1.0]
    for batch in batches:
        for reducer, share, kind in runs:
            label = f"{share:.0%} x {batch}{kind}"
            if time.perf_counter() - start > args.time_limit:
                report["skipped"].append(label)
                continue
            try:
                report["rows"].append(_row(reducer, _images(size, batch), share, new, measure, engine=args.decode))
            except Exception as err:  # recorded, and the next row still runs
                logger.exception("row %s failed", label)
                report["errors"][label] = f"{type(err).__name__}: {err}"[:500]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write_report(report, _markdown(report), args.out, name)
    report["reducer_captures"] = sum(a.captures for a in (adapter, pruning, graphed) if a is not None)
    report["seconds"] = time.perf_counter() - start
    write_report(report, _markdown(report), args.out, name)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
