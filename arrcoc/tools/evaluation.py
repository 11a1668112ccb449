"""``arrcoc eval``: answer accuracy against visual-token budget, per method and question family.

Every method (a registered reducer: arrcoc's variants and the baselines of :mod:`arrcoc.reducers.baselines`) answers
the same generated questions (:mod:`arrcoc.world.data`) with the same small VLM (:mod:`arrcoc.world.vlm`) through the same
adapter (:class:`arrcoc.integrations.hf.ArrcocLlava`, set up by :mod:`arrcoc.world.vlm_adapter`), at budgets given as shares of
the patch count (100%, 33%, 22%, 11%, 5.5% by default) and at several image sizes. Besides accuracy it
measures where the tokens went: the *box share* of a batch is the mean, over its tokens, of the share of each
token's pooled area that lies inside the answer boxes (a kept patch wholly inside counts 1, a token pooling a
large area counts its overlap). At the full budget every method reads every patch in raster order, so every
method scores the same there; a reference run (the model's own full-token path, no adapter) checks that the
adapter reproduces the model.

Writes ``<out>/eval[-tag].json`` (every number), ``.md`` (tables) and ``.png`` (accuracy against tokens, one
line per method, one panel per image size).

Importing this module imports neither transformers nor matplotlib; :func:`main` and :func:`plot` do.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import SCORER_NAMES
from ..errors import ArrcocError, InvalidInputError, MissingWeightsError
from ..runtime.device import device_name
from ..world.data import QUESTION_FAMILIES, VQASample, make_sample
from ..world.vlm_adapter import ask, pixel_values, project_adapter, rgb_values

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from ..stages.tokenizer import CharTokenizer

__all__ = [
    "EvalConfig",
    "DEFAULT_SHARES",
    "QUERY_FREE",
    "SINGLE_SCORERS",
    "token_budgets",
    "answer_coverage",
    "box_share",
    "same_answer",
    "evaluate",
    "findings",
    "scorer_contest",
    "to_markdown",
    "plot",
    "main",
]

logger = logging.getLogger(__name__)

#: Budgets as shares of the patch count: full, then the LLaVA-1.5 reductions 576 -> 192, 128, 64, 32.
DEFAULT_SHARES: tuple[float, ...] = (1.0, 0.33, 0.22, 0.11, 0.055)
DEFAULT_SIZES: tuple[int, ...] = (224, 384)
#: First sample seed: held out (training draws from ``arrcoc.world.train.TRAIN_SEED_START`` = 1_000_000 upwards, and
#: its own full-token check from 500_000).
DEFAULT_SEED = 600_000
#: The comparison without a question: arrcoc's query-free path first, then the baselines that read no question
#: (FastV reads the question's attention, so it is not one of them). Reported in a table of its own.
QUERY_FREE: tuple[str, ...] = ("arrcoc-noquery", "divprune", "tome", "visionzip", "uniform", "random")
#: arrcoc's single-scorer reducers (``arrcoc.reducers.arrcoc``), each one of the scorers the mix ``arrcoc`` balances.
SINGLE_SCORERS: tuple[str, ...] = tuple(f"arrcoc-{name}" for name in SCORER_NAMES)


def _default_methods() -> tuple[str, ...]:
    from ..reducers import list_reducers

    return tuple(list_reducers())


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation covers.

    Attributes:
        methods: registered reducer names (default: every registered reducer, so ``arrcoc-noquery`` and the
            query-free baselines of :data:`QUERY_FREE` too).
        shares: budgets, each a share of the patch count in (0, 1]; the token count is
            ``max(1, round(share * patches))``.
        sizes: image sides in pixels (multiples of the model's patch size).
        samples_per_family: questions per family and size; the same questions for every method and budget.
        families: question families (default: all of ``QUESTION_FAMILIES``).
        batch_size: questions per model call.
        seed: seed of the first sample; sample ``i`` of family ``f`` at size ``s`` is
            ``make_sample(seed + i * len(families) + index(f), s, f)``.
        max_new_tokens: longest answer generated.
        answers: generate and score answers; ``False`` measures only where the tokens land (box share),
            which needs no language-model decoding and so runs in minutes on a CPU.
    """

    methods: tuple[str, ...] = field(default_factory=_default_methods)
    shares: tuple[float, ...] = DEFAULT_SHARES
    sizes: tuple[int, ...] = DEFAULT_SIZES
    samples_per_family: int = 20
    families: tuple[str, ...] = QUESTION_FAMILIES
    batch_size: int = 16
    seed: int = DEFAULT_SEED
    max_new_tokens: int = 10
    answers: bool = True

    def __post_init__(self) -> None:
        from ..reducers import list_reducers

        for name in ("methods", "shares", "sizes", "families"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise InvalidInputError(f"{name} must not be empty")
        unknown = sorted(set(self.methods) - set(list_reducers()))
        if unknown:
            raise InvalidInputError(f"methods must be registered reducers {list_reducers()}; got unknown {unknown}")
        bad = [s for s in self.shares if not 0.0 < float(s) <= 1.0]
        if bad:
            raise InvalidInputError(f"shares must be in (0, 1] (a share of the patch count); got {bad}")
        bad_families = sorted(set(self.families) - set(QUESTION_FAMILIES))
        if bad_families:
            raise InvalidInputError(f"families must be among {QUESTION_FAMILIES}; got unknown {bad_families}")
        for name in ("samples_per_family", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1; got {getattr(self, name)}")
        if any(s < 16 for s in self.sizes):
            raise InvalidInputError(f"sizes must be image sides of at least 16 pixels; got {self.sizes}")


def token_budgets(patches: int, shares: Sequence[float]) -> list[int]:
    """Token counts for budget shares of ``patches``: ``max(1, round(share * patches))`` each."""
    return [max(1, min(patches, round(float(s) * patches))) for s in shares]


def answer_coverage(boxes: Sequence[tuple[int, int, int, int]], size: int, grid: tuple[int, int]) -> Tensor:
    """``(gh, gw)`` share of each patch covered by the union of pixel ``boxes`` of a ``size x size`` image.

    Args:
        boxes: ``(x0, y0, x1, y1)`` pixel boxes, exclusive ends.
        size: image side in pixels; the grid's patches are ``size / gh`` by ``size / gw`` pixels.
        grid: ``(gh, gw)``.
    """
    gh, gw = grid
    inside = torch.zeros(size, size)
    for x0, y0, x1, y1 in boxes:
        inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1.0
    return torch.nn.functional.adaptive_avg_pool2d(inside[None, None], (gh, gw))[0, 0]


def box_share(positions: Tensor, coverage: Tensor) -> Tensor:
    """Per image, the mean over tokens of the share of each token's box inside the answer boxes.

    Args:
        positions: ``(B, K, 4)`` int64 ``(row, col, height, width)`` boxes in patches.
        coverage: ``(B, gh, gw)`` share of each patch inside the answer boxes (:func:`answer_coverage`).

    Returns:
        ``(B,)`` in [0, 1].
    """
    b, gh, gw = coverage.shape
    table = torch.nn.functional.pad(coverage.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, gh+1, gw+1)
    r0, c0, h, w = positions.long().unbind(-1)  # (B, K) each
    r1, c1 = (r0 + h).clamp(max=gh), (c0 + w).clamp(max=gw)

    def at(r: Tensor, c: Tensor) -> Tensor:
        return table.flatten(1).gather(1, r * (gw + 1) + c)

    inside = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)  # (B, K) summed coverage of each box
    return (inside / (h * w).clamp_min(1)).mean(1).float()


def same_answer(predicted: str, expected: str) -> bool:
    """Exact match after trimming spaces and ignoring case."""
    return " ".join(predicted.split()).lower() == " ".join(expected.split()).lower()


def glyphs_right(predicted: str, expected: str) -> int:
    """How many of the expected text's glyphs the answer has at their place (spaces and case ignored).

    Partial credit for the "text" family: exact reading is all or nothing, and a method that keeps three of
    four glyphs legible differs from one that keeps none.
    """
    said, wanted = "".join(predicted.split()).upper(), "".join(expected.split()).upper()
    return sum(a == b for a, b in zip(said, wanted))


def _score(answers: Sequence[str], samples: Sequence[VQASample]) -> list[tuple[bool, int]]:
    """One ``(exact, glyphs right)`` pair per answer."""
    return [(same_answer(a, s.answer), glyphs_right(a, s.answer)) for a, s in zip(answers, samples)]


def _samples(config: EvalConfig, size: int) -> list[VQASample]:
    families = config.families
    return [
        make_sample(config.seed + i * len(families) + j, size, family)
        for i in range(config.samples_per_family)
        for j, family in enumerate(families)
    ]


def _reference(
    model: LlavaForConditionalGeneration,
    tokenizer: CharTokenizer,
    samples: list[VQASample],
    config: EvalConfig,
    device: torch.device,
) -> list[tuple[bool, int]]:
    """Full-token answers through the model's own path (no adapter, no reducer): the adapter's yardstick.
    One ``(exact, glyphs right)`` pair per sample."""
    from ..world.vlm import generate_answers, vision_features

    correct = []
    for start in range(0, len(samples), config.batch_size):
        batch = samples[start : start + config.batch_size]
        features = vision_features(model, rgb_values([s.image for s in batch], device))
        answers = generate_answers(model, tokenizer, [s.question for s in batch], features, config.max_new_tokens)
        correct += _score(answers, batch)
    return correct


def _summarise(
    correct: list[tuple[bool, int]] | None,
    shares: list[float | None],
    samples: list[VQASample],
    families: tuple[str, ...],
) -> dict[str, Any]:
    """Accuracy overall and per family (``None`` without answers), the share of text glyphs read at their
    place (``text_glyphs``, over the "text" questions) and the mean box share.

    ``correct`` holds one ``(exact, glyphs right)`` pair per sample."""
    boxed = [v for v in shares if v is not None]
    out: dict[str, Any] = {
        "accuracy": None,
        "correct": None,
        "samples": len(samples),
        "families": None,
        "text_glyphs": None,
        "box_share": (sum(boxed) / len(boxed)) if boxed else None,
        "box_samples": len(boxed),
    }
    if correct is not None:
        exact = [c for c, _ in correct]
        by_family = {f: [c for c, s in zip(exact, samples) if s.family == f] for f in families}
        glyphs = [
            (right, len("".join(s.answer.split()))) for (_, right), s in zip(correct, samples) if s.family == "text"
        ]
        out.update(
            accuracy=sum(exact) / len(exact),
            correct=sum(exact),
            families={f: (sum(v) / len(v) if v else None) for f, v in by_family.items()},
            text_glyphs=sum(r for r, _ in glyphs) / max(1, sum(t for _, t in glyphs)) if glyphs else None,
        )
    return out


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    tokenizer: CharTokenizer,
    config: EvalConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    text_encoder: Any = None,
    reducer_graphs: str = "auto",
) -> dict[str, Any]:
    """Run every method at every budget and size on the same questions.

    Args:
        model: the VLM (``arrcoc.world.vlm.load_vlm`` or ``build_vlm``); moved to ``device``.
        tokenizer: its tokenizer.
        config: what to cover (the defaults when omitted).
        device: where the model runs (default: the model's device).
        progress: show a progress bar.
        text_encoder: the trained query encoder for arrcoc's participatory scorer (see
            :func:`arrcoc.world.vlm_adapter.project_adapter`); ``None``: the adapter's prompt pull-back.
        reducer_graphs: ``"auto"`` (CUDA graphs for the reducers on CUDA) or ``"off"`` (see
            :func:`arrcoc.world.vlm_adapter.project_adapter`).

    Returns:
        A JSON-ready report: set-up facts, ``reference`` (full-token accuracy of the model's own path per
        size), ``results`` (one record per size x method x budget: ``accuracy``, ``families``, ``box_share``,
        ``tokens``, ``share``, ...) and ``skipped`` (methods the adapter could not serve, with the reason).
    """
    from ..world.vlm import vision_tower

    config = config or EvalConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    patch = int(vision_tower(model).patch_embed.patch_size[0])
    shared: dict[str, Any] = {}  # the tower's output for the current batch, read by every method
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval()
    adapters = {m: project_adapter(model, tokenizer, m, shared, text_encoder, reducer_graphs) for m in config.methods}
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "samples_per_family": config.samples_per_family,
        "families": list(config.families),
        "seed": config.seed,
        "shares": list(config.shares),
        "sizes": list(config.sizes),
        "methods": list(config.methods),
        "patch_size": patch,
        "reference": {},
        "results": [],
        "skipped": {},
        "answers": config.answers,
        "query": "the trained text query encoder" if text_encoder is not None else "the adapter's prompt pull-back",
    }
    cases = len(config.methods) * len(config.shares)
    bar = tqdm(total=cases * len(config.sizes), desc="eval", unit="case", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for size in config.sizes:
        if size % patch:
            raise InvalidInputError(f"sizes must be multiples of the model's patch size {patch}; got {size}")
        grid = (size // patch, size // patch)
        patches = grid[0] * grid[1]
        budgets = token_budgets(patches, config.shares)
        samples = _samples(config, size)
        if config.answers:
            reference = _reference(model, tokenizer, samples, config, device)
            report["reference"][str(size)] = _summarise(reference, [None] * len(samples), samples, config.families)
        keys = [(m, j) for m in config.methods for j in range(len(config.shares))]  # (method, budget index)
        correct: dict[tuple[str, int], list[tuple[bool, int]]] = {key: [] for key in keys}
        inside: dict[tuple[str, int], list[float | None]] = {key: [] for key in correct}
        failed: dict[tuple[str, int], str] = {}
        batches = range(0, len(samples), config.batch_size)
        for number, lo in enumerate(batches):  # batch outermost: the tower runs once per batch (``shared``)
            batch = samples[lo : lo + config.batch_size]
            pixels = pixel_values(model, [s.image for s in batch], device)
            coverage = torch.stack([answer_coverage(s.boxes, size, grid) for s in batch]).to(device)
            for key in keys:
                method, budget = key[0], budgets[key[1]]
                bar.set_postfix_str(f"{size}px batch {number + 1}/{len(batches)} {method} {budget} tokens")
                if key in failed:
                    continue
                try:
                    answers, positions = ask(
                        adapters[method],
                        pixels,
                        [s.question for s in batch],
                        budget,
                        config.max_new_tokens if config.answers else 0,
                    )
                except ArrcocError as err:  # a method the adapter cannot serve here: reported, not fatal
                    logger.warning("%s at %d px, %d tokens: skipped: %s", method, size, budget, err)
                    failed[key] = str(err)
                    continue
                if answers is not None:
                    correct[key] += _score(answers, batch)
                share_in = box_share(positions, coverage).tolist()  # ok-sync: reporting
                inside[key] += [v if s.boxes else None for v, s in zip(share_in, batch)]
        for key in keys:
            bar.update(1)
            method, share, budget = key[0], config.shares[key[1]], budgets[key[1]]
            if key in failed:
                report["skipped"].setdefault(method, {})[f"{size}/{budget}"] = failed[key]
                continue
            report["results"].append(
                {
                    "size": size,
                    "patches": patches,
                    "method": method,
                    "share": float(share),
                    "tokens": budget,
                    **_summarise(correct[key] if config.answers else None, inside[key], samples, config.families),
                }
            )
    bar.close()
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _is_arrcoc(method: str) -> bool:
    return method == "arrcoc" or method.startswith("arrcoc-")


_METRICS = {"accuracy": "accuracy", "text_glyphs": "text glyphs read", "box_share": "box share"}


def _has_answers(report: dict[str, Any]) -> bool:
    return any(r["accuracy"] is not None for r in report["results"])


def findings(report: dict[str, Any]) -> list[str]:
    """Plain-sentence comparisons: arrcoc at 11% against full tokens (accuracy); arrcoc against every baseline,
    and ``arrcoc-noquery`` against the query-free baselines (:data:`QUERY_FREE`), at every budget of 33% or less,
    by accuracy (when answers were scored) and by box share."""
    lines = []
    metrics = ["accuracy", "box_share"] if _has_answers(report) else ["box_share"]
    contests = [
        ("arrcoc", "baselines", lambda m: not _is_arrcoc(m)),
        (QUERY_FREE[0], "query-free baselines", lambda m: m in QUERY_FREE[1:]),
    ]
    for size in report["sizes"]:
        rows = {(r["method"], r["share"]): r for r in report["results"] if r["size"] == size}
        full, low = rows.get(("arrcoc", 1.0)), rows.get(("arrcoc", 0.11))
        if full and low and full["accuracy"] is not None:
            kept = low["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
            lines.append(
                f"{size} px: arrcoc at 11% ({low['tokens']} tokens) answers {_pct(low['accuracy'])}% vs "
                f"{_pct(full['accuracy'])}% with all {full['tokens']}: {100 * kept:.1f}% of full-token accuracy."
            )
        for name, rivals, is_rival in contests:
            for metric in metrics:
                for share in sorted({r["share"] for r in report["results"]}, reverse=True):
                    ours = rows.get((name, share))
                    others = [r for (m, s), r in rows.items() if s == share and is_rival(m) and r[metric] is not None]
                    if share > 0.33 or ours is None or ours[metric] is None or not others:
                        continue
                    ahead = [r["method"] for r in others if r[metric] < ours[metric]]
                    behind = [f"{r['method']} {_pct(r[metric])}" for r in others if r[metric] >= ours[metric]]
                    lines.append(
                        f"{size} px, {ours['tokens']} tokens ({100 * share:g}%), {_METRICS[metric]}: {name} "
                        f"{_pct(ours[metric])}%; ahead of {len(ahead)}/{len(others)} {rivals}"
                        + (f"; not ahead of: {', '.join(behind)}" if behind else "")
                        + "."
                    )
    return lines


def scorer_contest(report: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """arrcoc's balanced mix against each of its scorers alone, by accuracy, per family and budget below 100%.

    The question is asked in every case; only the mix and the participatory scorer read it for the choice of
    tokens. One record per family (and ``"all"``, every family together) and budget: ``family``, ``share``,
    ``tokens``, ``mix`` (arrcoc's accuracy), ``singles`` (method -> accuracy), ``best`` (the best single scorer;
    the first in :data:`SINGLE_SCORERS` order on a tie) and ``lead`` (mix minus best, in accuracy). Empty when
    answers were not scored, or the report lacks ``arrcoc`` or every single scorer.
    """
    rows = {(r["method"], r["share"]): r for r in report["results"] if r["size"] == size}
    singles = [m for m in SINGLE_SCORERS if m in report["methods"]]
    out: list[dict[str, Any]] = []
    if not singles or "arrcoc" not in report["methods"] or not _has_answers(report):
        return out
    for family in ["all", *report["families"]]:
        for share in sorted({s for m, s in rows if m == "arrcoc" and s < 1.0}, reverse=True):
            cells = [rows.get((m, share)) for m in ["arrcoc", *singles]]
            if any(c is None for c in cells):
                continue
            mix, *alone = [_family_accuracy(c, family) for c in cells]  # type: ignore[arg-type]
            if mix is None or any(v is None for v in alone):
                continue
            scores = dict(zip(singles, alone))
            best = max(singles, key=lambda m: (scores[m], -singles.index(m)))  # a tie goes to the earlier one
            out.append(
                {
                    "family": family,
                    "share": share,
                    "tokens": cells[0]["tokens"],  # type: ignore[index]
                    "mix": mix,
                    "singles": scores,
                    "best": best,
                    "lead": mix - scores[best],
                }
            )
    return out


def _family_accuracy(row: dict[str, Any], family: str) -> float | None:
    """A result row's accuracy on one family, or over all of them for ``"all"`` (``None``: not scored)."""
    return row["accuracy"] if family == "all" else (row["families"] or {}).get(family)


def _contest_table(contest: list[dict[str, Any]]) -> list[str]:
    """The records of :func:`scorer_contest` as one table: a row per family and budget, the lead in points."""
    singles = list(contest[0]["singles"])
    lines = [
        "| family | tokens | arrcoc (mix) | " + " | ".join(singles) + " | best single | lead |",
        "|---|---:|---:|" + "---:|" * len(singles) + "---|---:|",
    ]
    for c in contest:
        lead = f"{100 * c['lead']:+.1f}"
        lines.append(
            f"| {c['family']} | {c['tokens']} ({100 * c['share']:g}%) | {_pct(c['mix'])} | "
            + " | ".join(_pct(c["singles"][m]) for m in singles)
            + f" | {c['best']} | {f'**{lead}**' if round(100 * c['lead'], 6) >= 1 else lead} |"
        )
    return lines + [""]


def _table(rows: list[dict[str, Any]], methods: list[str], metric: str) -> list[str]:
    """Methods x budgets of one metric (in %)."""
    budgets = sorted({(r["share"], r["tokens"]) for r in rows}, reverse=True)
    lines = [
        f"| {_METRICS[metric]} | " + " | ".join(f"{t} ({100 * s:g}%)" for s, t in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for method in methods:
        cells = {r["share"]: r for r in rows if r["method"] == method}
        if cells:
            lines.append(
                f"| {method} | "
                + " | ".join(_pct(cells[s].get(metric)) if s in cells else "–" for s, _ in budgets)
                + " |"
            )
    return lines + [""]


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: accuracy and box share per method and budget for each size, then every family."""
    families = report["families"]
    answers = _has_answers(report)
    scoring = "greedy answers, exact match; accuracy in %" if answers else "answers not generated (box share only)"
    lines = [
        f"# arrcoc eval: visual tokens vs answers — {report['device']}",
        "",
        f"torch {report['torch']}, {report['date']}, model `{report.get('model', '?')}`, query for arrcoc: "
        f"{report.get('query', '?')}; {report['samples_per_family']} questions per family x {len(families)} "
        f"families per size (seed {report['seed']}); {scoring}. Box share: % of each token's area inside the "
        f"answer boxes, averaged over tokens (at the full budget: the boxes' share of the image).",
        "",
    ]
    for size in report["sizes"]:
        rows = [r for r in report["results"] if r["size"] == size]
        if not rows:
            continue
        ref = report["reference"].get(str(size))
        lines += [f"## {size} px ({rows[0]['patches']} patches)", ""]
        if ref:
            glyphs_read = (
                f"; text glyphs read at their place: {_pct(ref['text_glyphs'])}%"
                if ref.get("text_glyphs") is not None
                else ""
            )
            lines += [
                f"Reference (the model's own full-token path, no adapter): {_pct(ref['accuracy'])}%{glyphs_read}.",
                "",
            ]
        glyphs = answers and any(r.get("text_glyphs") is not None for r in rows)
        for metric in ["accuracy", *(["text_glyphs"] if glyphs else []), "box_share"] if answers else ["box_share"]:
            lines += _table(rows, report["methods"], metric)
        if answers:
            lines += [
                "| method | tokens | all | " + " | ".join(families) + " | box share |",
                "|---|---:|---:|" + "---:|" * len(families) + "---:|",
            ]
            for r in sorted(rows, key=lambda r: (report["methods"].index(r["method"]), -r["share"])):
                lines.append(
                    f"| {r['method']} | {r['tokens']} | {_pct(r['accuracy'])} | "
                    + " | ".join(_pct(r["families"][f]) for f in families)
                    + f" | {_pct(r['box_share'])} |"
                )
            lines.append("")
        contest = scorer_contest(report, size)
        if contest:
            lines += [
                f"### {size} px with the question: the balanced mix against each scorer alone",
                "",
                "Accuracy in %. Lead: the mix minus its best single scorer, in points (bold from +1 point).",
                "",
                *_contest_table(contest),
            ]
        query_free = [m for m in QUERY_FREE if m in report["methods"]]
        if QUERY_FREE[0] in query_free and len(query_free) > 1:
            lines += [f"### {size} px without a question: {QUERY_FREE[0]} and the query-free baselines", ""]
            for metric in ["accuracy", "box_share"] if answers else ["box_share"]:
                lines += _table(rows, query_free, metric)
    found = findings(report)
    if found:
        lines += ["## Findings", ""] + [f"- {line}" for line in found] + [""]
    if report["skipped"]:
        lines += (
            ["## Skipped", ""]
            + [f"- {m} ({', '.join(v)}): {next(iter(v.values()))}" for m, v in report["skipped"].items()]
            + [""]
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy (or, without answers, box share) against tokens, one line per method, one panel per size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = "accuracy" if _has_answers(report) else "box_share"
    sizes = [s for s in report["sizes"] if any(r["size"] == s for r in report["results"])]
    figure = Figure(figsize=(5.2 * max(1, len(sizes)) + 1.8, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(sizes)), squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        for method in report["methods"]:
            rows = sorted(
                (r for r in report["results"] if r["size"] == size and r["method"] == method and r[metric] is not None),
                key=lambda r: r["tokens"],
            )
            if not rows:
                continue
            ours = _is_arrcoc(method)
            ax.plot(
                [r["tokens"] for r in rows],
                [100 * r[metric] for r in rows],
                marker="o",
                linewidth=2.6 if method == "arrcoc" else 1.4,
                linestyle="-" if ours else "--",
                label=method,
            )
        tokens = sorted({r["tokens"] for r in report["results"] if r["size"] == size})
        patches = next(r["patches"] for r in report["results"] if r["size"] == size)
        ax.set_xscale("log")
        ax.set_xticks(tokens, [f"{t}\n{100 * t / patches:.3g}%" for t in tokens])
        ax.minorticks_off()
        if metric == "accuracy":
            ax.set_ylim(-2, 102)
        ax.set_xlabel("visual tokens per image (share of the patches)")
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "token area inside the answer boxes (%)")
        ax.set_title(f"{size} px ({patches} patches)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=8)
    figure.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc eval",
        description="Answer accuracy vs visual-token budget, per "
        "method and question family, on the generated VQA benchmark. Writes "
        "OUT/eval[-TAG].json, .md and .png.",
    )
    parser.add_argument("--methods", default=None, help="comma-separated reducer names (default: every registered one)")
    parser.add_argument(
        "--budgets",
        default=",".join(f"{s:g}" for s in DEFAULT_SHARES),
        help="comma-separated shares of the patch count in (0, 1] (default: %(default)s)",
    )
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="image sides (default: %(default)s)")
    parser.add_argument("--samples-per-family", type=int, default=20, help="questions per family and size (default 20)")
    parser.add_argument(
        "--families",
        default=",".join(QUESTION_FAMILIES),
        help="comma-separated question families (default: all of them); sample i of the j-th listed family is "
        "make_sample(seed + i * len(families) + j), so the list fixes the questions",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="questions per model call (default 16)")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="seed of the first sample (default: %(default)s, the test seeds)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=10, help="longest answer generated (default 10)")
    parser.add_argument(
        "--box-share-only",
        action="store_true",
        help="measure only where the tokens land (no answers generated): minutes on a CPU",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--out",
        default="arrcoc-results",
        help="output folder; pass bench/results to update the committed ones (default: %(default)s)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="a folder saved by arrcoc.world.vlm.save_vlm (default: weights/)")
    model.add_argument(
        "--random-init",
        default=None,
        metavar="PRESET",
        help="a randomly initialised VLM preset (default, tiny) instead of trained weights: a smoke test",
    )
    parser.add_argument(
        "--eager-reducers",
        action="store_true",
        help="run the reducers eagerly on CUDA too (default: replayed as CUDA graphs)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _names(text: str, cast: Any, option: str) -> tuple[Any, ...]:
    try:
        return tuple(cast(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInputError(f"{option} must be a comma-separated list; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``arrcoc eval [options]``; returns the exit code (2 on a usage error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="arrcoc: %(message)s")
    try:
        config = EvalConfig(
            methods=_names(args.methods, str, "--methods") if args.methods else _default_methods(),
            shares=_names(args.budgets, float, "--budgets"),
            sizes=_names(args.sizes, int, "--sizes"),
            families=_names(args.families, str, "--families"),
            samples_per_family=args.samples_per_family,
            batch_size=args.batch_size,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            answers=not args.box_share_only,
        )
        from ..world.vlm import VLMConfig, build_vlm, load_vlm

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        text_encoder = None
        if args.random_init:
            model, tokenizer = build_vlm(VLMConfig.from_name(args.random_init))
            source = f"random init ({args.random_init})"
        else:
            from ..stages.text_query import TextQueryEncoder
            from ..world.vlm import DEFAULT_VLM_DIR

            model, tokenizer = load_vlm(args.model)
            source = args.model or "weights/"
            try:
                text_encoder = TextQueryEncoder.from_pretrained(args.model or DEFAULT_VLM_DIR)
            except MissingWeightsError:
                logger.warning("no trained text query encoder beside the model: arrcoc's query is the prompt pull-back")
        report = evaluate(
            model,
            tokenizer,
            config,
            device=device,
            progress=not args.quiet,
            text_encoder=text_encoder,
            reducer_graphs="off" if args.eager_reducers else "auto",
        )
        report["model"] = source
        from .timing import write_report

        out = Path(args.out)
        stem = "eval" + (f"-{args.tag}" if args.tag else "")
        write_report(report, to_markdown(report), args.out, "eval", args.tag)
        plot(report, out / f"{stem}.png")
        print(f"arrcoc eval: wrote {out / stem}.json, .md and .png ({report['seconds']} s)")
        return 0
    except ArrcocError as err:
        print(f"arrcoc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
