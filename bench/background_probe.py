"""Where counting goes wrong under token reduction: selections that keep every object and drop only background.

    python bench/background_probe.py [--size 384] [--share 0.33] [--samples 200] [--family count]
                                     [--device cpu] [--out bench/results/validation]

The shipped model answers the same questions (validation seeds from 700,000) through the same adapter as
``arrcoc eval``, reading ``round(share * patches)`` tokens chosen by:

- ``objects+background``: every patch that shows a shape or a text frame (from the scene's layout), then
  random background patches up to the budget: an oracle that loses nothing but background;
- ``answer+random``: the patches of the answer's boxes first, then random patches;
- ``random``: random patches;
- ``arrcoc`` and ``divprune``: the registered reducers.

The oracles know the scene; no method does. If even ``objects+background`` answers worse than all the tokens,
what is lost is the background itself, and every selection method that drops background loses it too. For
numeric answers the wrong ones are tallied by signed error (answer minus truth).

Writes ``background-probe-<size>-<share>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch

from arrcoc.reducers import ReducedTokens, VisualInput, register_reducer
from arrcoc.reducers.baselines import _select_top
from arrcoc.stages.text_query import TextQueryEncoder
from arrcoc.tools.bench import device_name, write_report
from arrcoc.tools.evaluation import answer_coverage, same_answer
from arrcoc.world.data import QUESTION_FAMILIES, VQASample, make_sample
from arrcoc.world.vlm import DEFAULT_VLM_DIR, load_vlm
from arrcoc.world.vlm_adapter import ask, pixel_values, project_adapter

VALIDATION_SEED = 700_000


class PrioritySelection:
    """A reducer that keeps the patches of highest ``priority`` ``(B, gh, gw)``, set by the caller per batch."""

    needs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.priority: torch.Tensor | None = None

    def __call__(self, visual: VisualInput, budget: int) -> ReducedTokens:
        assert self.priority is not None, "set .priority before each batch"
        return _select_top(visual, self.priority.flatten(1).to(visual.features.device), budget)


def _patches_of(boxes: list[tuple[int, int, int, int]], size: int, grid: int) -> torch.Tensor:
    """``(grid, grid)`` 1.0 on every patch a box touches."""
    if not boxes:
        return torch.zeros(grid, grid)
    return (answer_coverage(boxes, size, (grid, grid)) > 0).float()


def priorities(sample: VQASample, size: int, grid: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each oracle's ``(grid, grid)`` priority for one sample; random tie-breaking below 1."""
    noise = torch.rand(grid, grid, generator=generator)
    objects = [box for kind, _, box in sample.layout if kind != "glyph"]
    return {
        "objects+background": 2 * _patches_of(objects, size, grid) + noise,
        "answer+random": 2 * _patches_of(list(sample.boxes), size, grid) + noise,
        "random": noise,
    }


def signed_error(answer: str, truth: str) -> str:
    """``"+1"``, ``"-2"``, ... for numeric answers; ``"other"`` when the answer is no number."""
    try:
        return f"{int(answer.strip()) - int(truth):+d}"
    except ValueError:
        return "other"


@torch.no_grad()
def run(size: int, share: float, samples: int, family: str, device: torch.device) -> dict[str, Any]:
    model, tokenizer = load_vlm()
    model.to(device).eval()
    text_encoder = TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR).to(device).eval()
    selection = PrioritySelection()
    register_reducer("probe-priority")(lambda **_: selection)
    shared: dict[str, Any] = {}
    oracle = project_adapter(model, tokenizer, "probe-priority", shared, text_encoder, "off")
    methods = {
        name: project_adapter(model, tokenizer, name, shared, text_encoder, "off") for name in ("arrcoc", "divprune")
    }
    grid = size // 16
    patches = grid * grid
    budget = max(1, round(share * patches))
    family_index = QUESTION_FAMILIES.index(family)
    questions = [
        make_sample(VALIDATION_SEED + i * len(QUESTION_FAMILIES) + family_index, size, family) for i in range(samples)
    ]
    names = ["full", "objects+background", "answer+random", "random", *methods]
    right = dict.fromkeys(names, 0)
    errors: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in names}
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for lo in range(0, samples, 50):
        batch = questions[lo : lo + 50]
        pixels = pixel_values(model, [s.image for s in batch], device)
        prompts = [s.question for s in batch]
        drawn = [priorities(s, size, grid, generator) for s in batch]
        for name in names:
            if name in methods:
                answers, _ = ask(methods[name], pixels, prompts, budget)
            else:
                full = name == "full"
                selection.priority = torch.stack([d["random" if full else name] for d in drawn])
                answers, _ = ask(oracle, pixels, prompts, patches if full else budget)
            for answer, sample in zip(answers, batch):
                if same_answer(answer, sample.answer):
                    right[name] += 1
                else:
                    errors[name][signed_error(answer, sample.answer)] += 1
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "model": "weights/",
        "size": size,
        "patches": patches,
        "share": share,
        "tokens": budget,
        "family": family,
        "samples": samples,
        "seed": VALIDATION_SEED,
        "seconds": round(time.perf_counter() - start, 1),
        "results": {
            name: {
                "tokens": patches if name == "full" else budget,
                "right": right[name],
                "accuracy": right[name] / samples,
                "errors": dict(errors[name]),
            }
            for name in names
        },
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Background probe: {report['family']} questions at {report['size']} px, {report['tokens']} of "
        f"{report['patches']} tokens — {report['device']}",
        "",
        f"torch {report['torch']}, model `{report['model']}`, {report['samples']} questions (validation seeds from "
        f"{report['seed']}), greedy answers, exact match. The oracles know the scene's layout; see "
        "`bench/background_probe.py`.",
        "",
        "| selection | tokens | right | accuracy | wrong answers by signed error |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in report["results"].items():
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(row["errors"].items())) or "—"
        lines.append(f"| {name} | {row['tokens']} | {row['right']} | {100 * row['accuracy']:.1f} | {errors} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--share", type=float, default=0.33)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--family", default="count", choices=QUESTION_FAMILIES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/validation")
    args = parser.parse_args()
    report = run(args.size, args.share, args.samples, args.family, torch.device(args.device))
    write_report(report, to_markdown(report), args.out, "background-probe", f"{args.size}-{args.share:g}")


if __name__ == "__main__":
    main()
