"""Generation benchmark: time to first token, decode tokens/s and end-to-end latency, full vs arrcoc tokens.

``python -m arrcoc.tools.bench_generation --out DIR`` builds a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336 tower,
Llama-2-7B-shaped language model, bf16, random weights made directly on the GPU: no 7B host copy) and measures

- time to first token (image tensor -> first token id on the device, synchronised) for the unmodified model
  reading 576 image tokens and for arrcoc at each budget, arrcoc's own cost included (vision tower,
  reduction with the prompt's query, projector, prefill), at batch 1 and 8, with the breakdown;
- decode tokens/s at batch 1 and 8: transformers' ``generate`` (dynamic cache, eager), arrcoc's static-cache
  decoder run eagerly, and the same decoder with the step replayed as a CUDA graph;
- end to end, image -> 32 new tokens at batch 1: the unmodified model's ``generate`` vs arrcoc (budget 64)
  with the graphed decoder.

Wall-clock medians (``perf_counter`` around a synchronised call) after warm-up. Image preprocessing (the
processor's resize and normalisation) is excluded from every path alike. Each section is guarded: a failure
is recorded with its reason and the others still run; the report is rewritten after each section, and
sections past ``--time-limit`` are skipped. Writes ``generation-<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..integrations.decode import GraphedDecoder
from ..runtime.device import device_name
from .timing import wall_times_ms, write_report

__all__ = ["main", "build_llava", "PRESETS"]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QUESTION = (
    "what is the colour of the small box on the left side of the table and what is written on the sign above it ?"
)

#: name -> (vision config kwargs, text config kwargs, image size)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llava-1.5-7b": (
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        dict(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    "tiny": (  # the same code paths in seconds on a CPU (the smoke test)
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            projection_dim=32,
        ),
        dict(
            vocab_size=32064,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
    ),
}


def build_llava(preset: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised LLaVA of the preset's shape, built directly on ``device`` in ``dtype``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision, text = PRESETS[preset]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, pad_token_id=0),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = random_model(
        lambda: LlavaForConditionalGeneration(config), device, dtype
    )  # already on the device in its dtype; float32 buffers (rotary inv_freq) stay float32
    model.generation_config.eos_token_id = None  # random weights: always generate the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model


def random_model(factory: Callable[[], Any], device: torch.device, dtype: torch.dtype) -> Any:
    """``factory()``'s model with seed-0 random weights, made on ``device`` in ``dtype`` (no full-precision host copy
    of the weights; float32 buffers such as rotary frequencies stay float32), in eval mode."""
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device), torch.no_grad():
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _timer(device: torch.device, warmups: int) -> Callable[..., dict[str, float]]:
    """Median and least wall milliseconds of a synchronised call (:func:`arrcoc.tools.timing.wall_times_ms`)."""

    def measure(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
        times = wall_times_ms(fn, device, warmups, repeats)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}

    return measure


class _Bench:
    """Holds the model, the adapter and the report while the sections run."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..integrations.hf import ArrcocLlava, word_tokenizer

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, args.dtype)
        self.measure = _timer(self.device, args.warmup)
        start = time.perf_counter()
        self.model = build_llava(args.preset, self.device, self.dtype)
        build_s = time.perf_counter() - start
        words = ("USER ASSISTANT : " + QUESTION).split()
        self.adapter = ArrcocLlava(
            self.model,
            word_tokenizer(words, image_token_id=32000),
            method=args.method,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        self.decoder = GraphedDecoder.from_llava(self.model)
        self.eager_decoder = GraphedDecoder.from_llava(self.model, graphs=False)
        self.full = self.adapter.full_tokens
        size = PRESETS[args.preset][0]["image_size"]
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(max(args.batches), 3, size, size, generator=generator).to(self.device, self.dtype)
        import transformers

        self.report: dict[str, Any] = {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "preset": args.preset,
            "dtype": args.dtype,
            "method": args.method,
            "full_image_tokens": self.full,
            "parameters_b": sum(p.numel() for p in self.model.parameters()) / 1e9,
            "build_s": build_s,
            "repeats": args.repeats,
            "sections": {},
            "errors": {},
            "skipped": [],
        }

    def prompts(self, batch: int) -> list[str]:
        return [QUESTION] * batch

    def _full_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, _ = self.adapter._batch_ids(self.prompts(batch), self.full, self.device)
        return ids, mask

    # --- sections -------------------------------------------------------------------------------------
    def ttft(self) -> dict[str, Any]:
        rows = []
        model, adapter, measure, reps = self.model, self.adapter, self.measure, self.args.repeats
        for batch in self.args.batches:
            pixels, prompts = self.pixels[:batch], self.prompts(batch)
            ids, mask = self._full_inputs(batch)

            def full(ids: torch.Tensor = ids, pixels: torch.Tensor = pixels, mask: torch.Tensor = mask) -> torch.Tensor:
                out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, logits_to_keep=1)
                return out.logits[:, -1].argmax(-1)

            with torch.no_grad():
                row = {"batch": batch, "tokens": self.full, "method": "unmodified", **measure(full, reps)}
                row["sequence"] = int(ids.shape[1])
                rows.append(row)
                tower = measure(lambda pixels=pixels: adapter.features(pixels), reps)["median_ms"]
                for budget in [self.full] + list(self.args.budgets):
                    prepared = adapter.prepare(pixels, prompts, budget)

                    def first(
                        budget: int = budget, pixels: torch.Tensor = pixels, prompts: list = prompts
                    ) -> torch.Tensor:
                        p = adapter.prepare(pixels, prompts, budget)
                        out = model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, logits_to_keep=1)
                        return out.logits[:, -1].argmax(-1)

                    def prefill(p: Any = prepared) -> Any:
                        return model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, logits_to_keep=1)

                    total = measure(first, reps)
                    prep = measure(lambda b=budget, x=pixels, q=prompts: adapter.prepare(x, q, b), reps)["median_ms"]
                    rows.append(
                        {
                            "batch": batch,
                            "tokens": budget,
                            "method": self.args.method,
                            **total,
                            "sequence": int(prepared.input_ids.shape[1]),
                            "vision_tower_ms": tower,
                            "arrcoc_ms": prep - tower,
                            "prefill_ms": measure(prefill, reps)["median_ms"],
                        }
                    )
                budget = min(self.args.budgets)  # the same, first token from arrcoc's graphed prefill

                def graphed(
                    budget: int = budget, pixels: torch.Tensor = pixels, prompts: list = prompts
                ) -> torch.Tensor:
                    return self.adapter.generate(pixels, prompts, budget, decode="graphed", max_new_tokens=1)

                row = {
                    "batch": batch,
                    "tokens": budget,
                    "method": f"{self.args.method} + graphed prefill",
                    **measure(graphed, reps),
                }
                row["sequence"] = int(adapter.prepare(pixels, prompts, budget).input_ids.shape[1])
                rows.append(row)
        base = {r["batch"]: r["median_ms"] for r in rows if r["method"] == "unmodified"}
        for r in rows:
            r["speedup_vs_unmodified"] = base[r["batch"]] / r["median_ms"]
        graphs = [key for key, chain in self.adapter._chains.items() if chain is not False]
        return {
            "rows": rows,
            "reducer_graphs": len(graphs),
            "reducer_graph_fallbacks": sum(1 for c in self.adapter._chains.values() if c is False),
        }

    def decode(self) -> dict[str, Any]:
        rows = []
        n, reps = self.args.decode_tokens, max(1, self.args.repeats // 3)
        budget = min(self.args.budgets)
        for batch in self.args.batches:
            with torch.no_grad():
                p = self.adapter.prepare(self.pixels[:batch], self.prompts(batch), budget)
            embeds, mask = p.inputs_embeds, p.attention_mask

            def hf(count: int, embeds: torch.Tensor = embeds, mask: torch.Tensor = mask) -> Any:
                return self.model.generate(
                    inputs_embeds=embeds, attention_mask=mask, max_new_tokens=count, do_sample=False
                )

            def ours(
                decoder: GraphedDecoder, embeds: torch.Tensor = embeds, mask: torch.Tensor = mask
            ) -> Callable[[int], torch.Tensor]:
                return lambda count: decoder.generate(embeds, mask, max_new_tokens=count)

            graphed = "arrcoc decoder, CUDA graph" if self.decoder.graphs else "arrcoc decoder (no CUDA: eager)"
            cases = {
                "transformers generate (eager)": hf,
                "arrcoc decoder, eager": ours(self.eager_decoder),
                graphed: ours(self.decoder),
            }
            for name, run in cases.items():
                with torch.no_grad():
                    produced = run(n + 1)
                    assert produced.shape[1] == n + 1, f"{name} stopped early ({produced.shape[1]} tokens)"
                    prefill = self.measure(lambda run=run: run(1), reps)["median_ms"]
                    whole = self.measure(lambda run=run: run(n + 1), reps)["median_ms"]
                per_token = (whole - prefill) / n
                rows.append(
                    {
                        "batch": batch,
                        "case": name,
                        "ms_per_step": per_token,
                        "tokens_per_s": batch * 1e3 / per_token,
                        "prompt_tokens": int(embeds.shape[1]),
                    }
                )
            eager = next(r for r in rows if r["batch"] == batch and r["case"].startswith("transformers"))
            for r in rows:
                if r["batch"] == batch:
                    r["speedup_vs_transformers"] = r["tokens_per_s"] / eager["tokens_per_s"]
        return {
            "rows": rows,
            "new_tokens": n,
            "image_tokens": budget,
            "captures": self.decoder.captures,
            "capture_failures": [s.failed for s in self.decoder._states.values() if s.failed],
        }

    def end_to_end(self) -> dict[str, Any]:
        n, reps, budget = self.args.new_tokens, max(1, self.args.repeats // 3), min(self.args.budgets)
        pixels, prompts = self.pixels[:1], self.prompts(1)
        ids, mask = self._full_inputs(1)
        with torch.no_grad():
            full = self.measure(
                lambda: self.model.generate(
                    input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n, do_sample=False
                ),
                reps,
            )
            eager = self.measure(
                lambda: self.adapter.generate(pixels, prompts, budget, max_new_tokens=n, do_sample=False), reps
            )
            graphed = self.measure(
                lambda: self.adapter.generate(pixels, prompts, budget, decode="graphed", max_new_tokens=n), reps
            )
        rows = [
            {"case": f"unmodified, {self.full} tokens, transformers generate", **full},
            {"case": f"arrcoc {budget} tokens, transformers generate", **eager},
            {"case": f"arrcoc {budget} tokens, graphed decoder", **graphed},
        ]
        for r in rows:
            r["speedup"] = full["median_ms"] / r["median_ms"]
        return {"rows": rows, "new_tokens": n}


def _targets(report: dict[str, Any]) -> list[str]:
    lines = []
    sections = report["sections"]
    if "ttft" in sections:
        for r in sections["ttft"]["rows"]:
            if r["method"] != "unmodified" and r["tokens"] == min(report["budgets"]):
                s = r["speedup_vs_unmodified"]
                lines.append(
                    f"TTFT, batch {r['batch']}, {r['method']} at {r['tokens']} tokens vs unmodified at "
                    f"{report['full_image_tokens']}: {s:.2f}x (target >= 4x: {'met' if s >= 4 else 'missed'})"
                )
    if "decode" in sections:
        for r in sections["decode"]["rows"]:
            if r["batch"] == 1 and "CUDA graph" in r["case"]:
                s = r["speedup_vs_transformers"]
                lines.append(
                    f"graphed decode vs transformers eager, batch 1: {s:.2f}x (target >= 2x: "
                    f"{'met' if s >= 2 else 'missed'})"
                )
    if "end_to_end" in sections:
        s = sections["end_to_end"]["rows"][-1]["speedup"]
        lines.append(
            f"end to end (image -> {sections['end_to_end']['new_tokens']} tokens): {s:.2f}x "
            f"(target >= 3x: {'met' if s >= 3 else 'missed'})"
        )
    return lines


def _markdown(report: dict[str, Any]) -> str:
    out = [
        f"# arrcoc generation benchmark — {report['device']}",
        "",
        f"{report['preset']} shape, random weights, {report['dtype']}, {report['parameters_b']:.2f} B parameters; "
        f"torch {report['torch']}, transformers {report['transformers']}, {report['date']}. Reducer "
        f"`{report['method']}`. Wall-clock medians of {report['repeats']} runs (decode and end to end: a third "
        "of that) after warm-up; image preprocessing excluded from every path.",
        "",
    ]
    out += ["## Targets", ""] + [f"- {line}" for line in _targets(report)] + [""]
    sections = report["sections"]
    if "ttft" in sections:
        out += [
            "## Time to first token",
            "",
            "| batch | image tokens | method | sequence | TTFT ms | speed-up | vision tower ms | arrcoc ms | prefill ms |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sections["ttft"]["rows"]:
            extra = (
                f"{r['vision_tower_ms']:.2f} | {r['arrcoc_ms']:.2f} | {r['prefill_ms']:.2f}"
                if "prefill_ms" in r
                else "— | — | —"
            )
            out.append(
                f"| {r['batch']} | {r['tokens']} | {r['method']} | {r['sequence']} | {r['median_ms']:.2f} | "
                f"{r['speedup_vs_unmodified']:.2f}x | {extra} |"
            )
        out += [
            "",
            "arrcoc ms = adapter input preparation (tower, query, reduction, projector, embedding) minus the "
            "tower alone. Reducer CUDA graphs: "
            f"{sections['ttft']['reducer_graphs']}, fallbacks: {sections['ttft']['reducer_graph_fallbacks']}.",
            "",
        ]
    if "decode" in sections:
        d = sections["decode"]
        out += [
            f"## Decode ({d['new_tokens']} new tokens after a prompt with {d['image_tokens']} image tokens)",
            "",
            "| batch | case | ms / step | tokens/s | vs transformers |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in d["rows"]:
            out.append(
                f"| {r['batch']} | {r['case']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
                f"{r['speedup_vs_transformers']:.2f}x |"
            )
        out += [
            "",
            f"Decode graphs captured: {d['captures']}; capture failures: {d['capture_failures'] or 'none'}.",
            "",
        ]
    if "end_to_end" in sections:
        e = sections["end_to_end"]
        out += [
            f"## End to end (image -> {e['new_tokens']} new tokens, batch 1)",
            "",
            "| case | ms | speed-up |",
            "|---|---:|---:|",
        ]
        out += [f"| {r['case']} | {r['median_ms']:.1f} | {r['speedup']:.2f}x |" for r in e["rows"]] + [""]
    if report["errors"]:
        out += ["## Failures", ""] + [f"- {k}: `{v}`" for k, v in report["errors"].items()] + [""]
    if report["skipped"]:
        out += [f"Skipped past the time limit: {', '.join(report['skipped'])}.", ""]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arrcoc.tools.bench_generation",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="arrcoc-results",
        help="folder for generation-<device>.json and .md (pass bench/results to update the committed ones)",
    )
    parser.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--method", default="arrcoc", help="reducer name")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 128, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=270.0, help="seconds; later sections are skipped")
    parser.add_argument("--tag", default="", help="suffix of the report's file name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every section that fits in the time limit; returns 0 when all ran without error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    start = time.perf_counter()
    bench = _Bench(args)
    report = bench.report
    report["budgets"] = list(args.budgets)
    name = "generation-" + ("cpu" if bench.device.type == "cpu" else report["device"])
    for section in ("ttft", "decode", "end_to_end"):
        if time.perf_counter() - start > args.time_limit:
            report["skipped"].append(section)
            continue
        begun = time.perf_counter()
        try:
            report["sections"][section] = getattr(bench, section)()
            report["sections"][section]["seconds"] = time.perf_counter() - begun
        except Exception as err:  # recorded, and the next section still runs
            logger.exception("section %s failed", section)
            report["errors"][section] = f"{type(err).__name__}: {err}"[:500]
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        write_report(report, _markdown(report), args.out, name, args.tag)
    report["seconds"] = time.perf_counter() - start
    write_report(report, _markdown(report), args.out, name, args.tag)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
