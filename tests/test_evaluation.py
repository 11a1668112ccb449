"""``arrcoc eval``: the measurements it is built from, and one end-to-end run on a tiny random VLM."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import arrcoc
from arrcoc.reducers import list_reducers
from arrcoc.tools.evaluation import (
    QUERY_FREE,
    SINGLE_SCORERS,
    EvalConfig,
    answer_coverage,
    box_share,
    findings,
    glyphs_right,
    main,
    same_answer,
    scorer_contest,
    to_markdown,
    token_budgets,
)
from arrcoc.world.data import QUESTION_FAMILIES, make_sample

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

SHARES = (1.0, 0.11)
SIZES = (64, 96)


def test_token_budgets_are_rounded_shares_of_the_patches() -> None:
    assert token_budgets(576, (1.0, 0.33, 0.22, 0.11, 0.055)) == [576, 190, 127, 63, 32]
    assert token_budgets(196, (1.0, 0.33, 0.22, 0.11, 0.055)) == [196, 65, 43, 22, 11]
    assert token_budgets(16, (0.01,)) == [1]


def test_answer_coverage_is_the_covered_share_of_each_patch() -> None:
    coverage = answer_coverage([(16, 0, 32, 16), (8, 40, 16, 48)], size=64, grid=(4, 4))
    assert coverage.shape == (4, 4)
    assert coverage[0, 1] == 1.0  # a whole patch
    assert coverage[2, 0] == pytest.approx(8 * 8 / 256)  # a quarter of a patch
    assert coverage.sum() == pytest.approx(1 + 64 / 256)
    assert answer_coverage([], 64, (4, 4)).sum() == 0
    overlapping = answer_coverage([(0, 0, 16, 16), (0, 0, 16, 16)], 64, (4, 4))
    assert overlapping.sum() == 1.0  # the union, not the sum


def test_box_share_averages_each_tokens_covered_area() -> None:
    coverage = torch.zeros(1, 4, 4)
    coverage[0, 1, 1] = 1.0
    coverage[0, 3, 3] = 0.5
    inside = torch.tensor([[[1, 1, 1, 1]]])  # a kept patch wholly inside: 1
    outside = torch.tensor([[[0, 0, 1, 1]]])  # 0
    big = torch.tensor([[[0, 0, 4, 4]]])  # the whole grid: 1.5 covered patches of 16
    half = torch.tensor([[[3, 3, 1, 1]]])
    assert box_share(inside, coverage).item() == 1.0
    assert box_share(outside, coverage).item() == 0.0
    assert box_share(big, coverage).item() == pytest.approx(1.5 / 16)
    assert box_share(half, coverage).item() == pytest.approx(0.5)
    both = torch.cat((inside, big), 1)
    assert box_share(both, coverage).item() == pytest.approx((1 + 1.5 / 16) / 2)


def test_answers_match_ignoring_case_and_spacing() -> None:
    assert same_answer(" Red ", "red") and same_answer("K4  P", "k4 p")
    assert not same_answer("re", "red") and not same_answer("", "no")


def test_glyphs_right_counts_glyphs_at_their_place() -> None:
    assert glyphs_right("k4p", "K4PX") == 3 and glyphs_right("K 4 X", "K4P") == 2
    assert glyphs_right("4KP", "K4P") == 1 and glyphs_right("", "K4") == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ("nope",)}, "unknown"),
        ({"shares": (0.0,)}, r"\(0, 1\]"),
        ({"shares": (1.5,)}, r"\(0, 1\]"),
        ({"sizes": ()}, "sizes must not be empty"),
        ({"families": ("colour",)}, "colour"),
        ({"samples_per_family": 0}, "samples_per_family must be >= 1"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_errors_name_the_setting(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(arrcoc.InvalidInputError, match=message):
        EvalConfig(**kwargs)


def test_a_bad_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--random-init", "tiny", "--budgets", "0.5,abc", "--out", str(tmp_path)]) == 2
    assert "--budgets must be a comma-separated list" in capsys.readouterr().err
    assert main(["--random-init", "tiny", "--methods", "arrcoc,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "holds no trained VLM" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The command end to end on a tiny random VLM: every method, two budgets, two sizes, one question per family."""
    out = tmp_path_factory.mktemp("eval")
    code = main(
        [
            "--random-init",
            "tiny",
            "--samples-per-family",
            "1",
            "--sizes",
            ",".join(map(str, SIZES)),
            "--budgets",
            ",".join(map(str, SHARES)),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--tag",
            "ci",
            "--quiet",
            "--batch-size",
            "6",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 0
    return json.loads((out / "eval-ci.json").read_text()), out


def test_every_method_budget_size_and_family_is_reported(run: tuple[dict[str, Any], Path]) -> None:
    report, _ = run
    assert report["skipped"] == {}
    rows = {(r["size"], r["method"], r["share"]): r for r in report["results"]}
    assert set(rows) == {(s, m, b) for s in SIZES for m in list_reducers() for b in SHARES}
    for (size, _, share), r in rows.items():
        assert r["patches"] == (size // 16) ** 2
        assert r["tokens"] == max(1, round(share * r["patches"]))
        assert r["samples"] == len(QUESTION_FAMILIES)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["correct"] == round(r["accuracy"] * r["samples"])
        assert set(r["families"]) == set(QUESTION_FAMILIES)
        assert all(0.0 <= v <= 1.0 for v in r["families"].values())
        assert r["box_share"] is not None and 0.0 <= r["box_share"] <= 1.0
        assert 0.0 <= r["text_glyphs"] <= 1.0
        assert r["text_glyphs"] >= r["families"]["text"]  # an exact reading has every glyph right


def test_full_budget_is_the_same_for_every_method(run: tuple[dict[str, Any], Path]) -> None:
    """At 100% every method reads every patch in raster order: identical answers, identical box share."""
    report, _ = run
    for size in SIZES:
        full = [r for r in report["results"] if r["size"] == size and r["share"] == 1.0]
        assert len({r["correct"] for r in full}) == 1
        assert len({json.dumps(r["families"]) for r in full}) == 1
        assert max(r["box_share"] for r in full) - min(r["box_share"] for r in full) < 1e-9


def test_adapter_reproduces_the_models_own_full_token_answers(run: tuple[dict[str, Any], Path]) -> None:
    report, _ = run
    for size in SIZES:
        full = next(
            r for r in report["results"] if r["size"] == size and r["share"] == 1.0 and r["method"] == "uniform"
        )
        assert report["reference"][str(size)]["families"] == full["families"]
        assert report["reference"][str(size)]["text_glyphs"] == full["text_glyphs"]


def test_outputs_are_written(run: tuple[dict[str, Any], Path]) -> None:
    report, out = run
    table = (out / "eval-ci.md").read_text()
    assert table == to_markdown(report)
    for method in list_reducers():
        assert f"| {method} |" in table
    assert "## 64 px (16 patches)" in table and "## 96 px (36 patches)" in table
    assert table.count("| text glyphs read |") == len(SIZES)
    assert (out / "eval-ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = findings(report)
    assert any("arrcoc at 11%" in line for line in lines)
    # 11%: accuracy and box share, per size, for arrcoc and for arrcoc-noquery
    assert sum("ahead of" in line for line in lines) == 4 * len(SIZES)
    assert sum("arrcoc-noquery" in line and "query-free baselines" in line for line in lines) == 2 * len(SIZES)


def test_the_query_free_methods_get_a_table_of_their_own(run: tuple[dict[str, Any], Path]) -> None:
    report, out = run
    assert set(QUERY_FREE) <= set(report["methods"])  # the default methods include arrcoc-noquery
    table = (out / "eval-ci.md").read_text()
    for size in SIZES:
        head = f"### {size} px without a question"
        assert table.count(head) == 1
        section = table.split(head)[1].split("## ")[0]  # up to the next size or the findings
        rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
        assert rows == ["accuracy", *QUERY_FREE, "box share", *QUERY_FREE]  # no question-reading method here


_CONTEST = re.compile(
    r"(?P<size>\d+) px, (?P<tokens>\d+) tokens \((?P<share>[\d.]+)%\), (?P<metric>accuracy|box share): "
    r"(?P<method>\S+) (?P<value>[\d.]+)%; ahead of (?P<ahead>\d+)/(?P<rivals>\d+) (?P<kind>[a-z -]+?)"
    r"(?:; not ahead of: (?P<behind>.*))?\.$"
)


def _contest(line: str) -> tuple:
    """The facts of one comparison sentence: who, at what budget, by which metric, ahead of how many, behind whom."""
    m = _CONTEST.match(line)
    assert m, f"not a comparison sentence: {line!r}"
    behind = dict(item.rsplit(" ", 1) for item in m["behind"].split(", ")) if m["behind"] else {}
    return (
        int(m["size"]),
        int(m["tokens"]),
        float(m["share"]),
        m["metric"],
        m["method"],
        float(m["value"]),
        int(m["ahead"]),
        int(m["rivals"]),
        m["kind"],
        {k: float(v) for k, v in behind.items()},
    )


def test_findings_compare_arrcoc_with_full_tokens_and_each_baseline() -> None:
    """The facts the sentences carry, not their wording: the numbers, who counts as a rival (arrcoc's own ablations
    never; FastV, which reads the question, not for the query-free method), and that a tie is not "ahead"."""

    def row(method: str, share: float, accuracy: float) -> dict[str, Any]:
        return {
            "size": 224,
            "patches": 196,
            "method": method,
            "share": share,
            "tokens": round(196 * share),
            "accuracy": accuracy,
            "families": {},
            "box_share": None,
        }

    report = {
        "sizes": [224],
        "results": [
            row("arrcoc", 1.0, 0.9),
            row("arrcoc", 0.11, 0.81),
            row("tome", 0.11, 0.85),
            row("uniform", 0.11, 0.5),
            row("arrcoc-perspectival", 0.11, 0.95),
            row("arrcoc-noquery", 0.11, 0.6),
            row("fastv", 0.11, 0.99),
            row("arrcoc", 0.5, 0.88),
            row("tome", 0.5, 0.95),
        ],
    }  # 50%: above 33%, no contest
    full, *contests = findings(report)
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", full)]
    assert full.startswith("224 px") and numbers == [224, 11, 22, 81.0, 90.0, 196, 90.0]  # 0.81 / 0.9 of full
    assert [_contest(line) for line in contests] == [
        (224, 22, 11.0, "accuracy", "arrcoc", 81.0, 1, 3, "baselines", {"tome": 85.0, "fastv": 99.0}),
        (224, 22, 11.0, "accuracy", "arrcoc-noquery", 60.0, 1, 2, "query-free baselines", {"tome": 85.0}),
    ]
    for r in report["results"]:
        r["box_share"], r["accuracy"] = r["accuracy"] / 2, None  # a box-share-only run
    next(r for r in report["results"] if r["method"] == "uniform")["box_share"] = 0.3  # ties arrcoc-noquery
    assert [_contest(line) for line in findings(report)] == [
        (224, 22, 11.0, "box share", "arrcoc", 40.5, 1, 3, "baselines", {"tome": 42.5, "fastv": 49.5}),
        (
            224,
            22,
            11.0,
            "box share",
            "arrcoc-noquery",
            30.0,
            0,
            2,
            "query-free baselines",
            {"tome": 42.5, "uniform": 30.0},
        ),
    ]


def test_project_adapter_reads_the_trained_features_and_the_cls_attention() -> None:
    """The adapter's full-budget tokens are the features the VLM trains on, at 64 and 96 px; the [CLS]
    attention VisionZip reads equals the attention matrix timm itself computes in the last block."""
    from arrcoc.world.data import make_sample
    from arrcoc.world.vlm import VLMConfig, build_vlm, vision_features, vision_tower
    from arrcoc.world.vlm_adapter import pixel_values, project_adapter, rgb_values

    model, tokenizer = build_vlm(VLMConfig.from_name("tiny"))
    adapter = project_adapter(model, tokenizer, "visionzip")
    for size in SIZES:
        samples = [make_sample(i, size, "color") for i in range(2)]
        prepared = adapter.prepare(
            pixel_values(model, [s.image for s in samples]), [s.question for s in samples], (size // 16) ** 2
        )
        torch.testing.assert_close(
            prepared.reduced.tokens, vision_features(model, rgb_values([s.image for s in samples], "cpu"))
        )
    tower = vision_tower(model)
    block = tower.blocks[-1]
    seen: list[torch.Tensor] = []
    block.attn.fused_attn = False  # so timm materialises the attention matrix (seen by its dropout)
    hook = block.attn.attn_drop.register_forward_hook(lambda _, args, out: seen.append(out))
    try:
        pixels = pixel_values(model, [make_sample(5, 64, "text").image])
        _, _, attention = adapter.features(pixels)
    finally:
        hook.remove()
        block.attn.fused_attn = True
    expected = seen[0].mean(1)[:, 0, tower.num_prefix_tokens :].unflatten(-1, (4, 4))
    torch.testing.assert_close(attention, expected)


def test_box_share_only_skips_answers(tmp_path: Path) -> None:
    code = main(
        [
            "--random-init",
            "tiny",
            "--samples-per-family",
            "1",
            "--sizes",
            "64",
            "--budgets",
            "1,0.25",
            "--methods",
            "arrcoc,uniform",
            "--box-share-only",
            "--eager-reducers",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["answers"] is False and report["reference"] == {}
    assert len(report["results"]) == 4
    assert all(r["accuracy"] is None and 0 <= r["box_share"] <= 1 for r in report["results"])
    table = (tmp_path / "eval.md").read_text()
    assert "| box share | 16 (100%) | 4 (25%) |" in table and "| accuracy |" not in table


def test_the_trained_text_encoder_gives_arrcocs_query() -> None:
    """With a text encoder, the participatory scorer reads its encoding of the question."""
    from arrcoc.stages.text_query import TextQueryConfig, TextQueryEncoder
    from arrcoc.world.data import make_sample
    from arrcoc.world.vlm import VLMConfig, build_vlm
    from arrcoc.world.vlm_adapter import pixel_values, project_adapter

    model, tokenizer = build_vlm(VLMConfig.from_name("tiny"))
    encoder = TextQueryEncoder(TextQueryConfig(width=32, dim=16, layers=1, heads=2)).eval()
    seen: list[list[str]] = []
    encoder.register_forward_pre_hook(lambda _, args: seen.append(list(args[0])))
    samples = [make_sample(i, 64, "text") for i in range(2)]
    pixels = pixel_values(model, [s.image for s in samples])
    questions = [s.question for s in samples]
    project_adapter(model, tokenizer, "uniform", text_encoder=encoder).prepare(pixels, questions, 8)
    assert seen == []  # a reducer that reads no query does not run the encoder
    prepared = project_adapter(model, tokenizer, "arrcoc-participatory", text_encoder=encoder).prepare(
        pixels, questions, 8
    )
    assert seen == [questions] and prepared.reduced.tokens.shape == (2, 8, 32)


def test_the_mix_is_set_against_each_scorer_alone_per_family(run: tuple[dict[str, Any], Path]) -> None:
    """The run's markdown has, per size, one table of the mix against its single scorers: every family (and all)
    at every budget below 100%, each cell the record's accuracy."""
    report, out = run
    assert set(SINGLE_SCORERS) <= set(report["methods"])
    table = (out / "eval-ci.md").read_text()
    for size in SIZES:
        contest = scorer_contest(report, size)
        assert [(c["family"], c["share"]) for c in contest] == [(f, 0.11) for f in ["all", *QUESTION_FAMILIES]]
        rows = {(r["method"], r["share"]): r for r in report["results"] if r["size"] == size}
        for c in contest:
            cells = {m: rows[(m, 0.11)] for m in ["arrcoc", *SINGLE_SCORERS]}
            got = {m: r["accuracy"] if c["family"] == "all" else r["families"][c["family"]] for m, r in cells.items()}
            assert c["mix"] == got.pop("arrcoc") and c["singles"] == got
        head = f"### {size} px with the question: the balanced mix against each scorer alone"
        assert table.count(head) == 1
        section = table.split(head)[1].split("###")[0]
        assert sum(line.startswith("| total |") for line in section.splitlines()) == 1


def test_scorer_contest_picks_the_best_single_scorer_and_the_lead() -> None:
    def row(method: str, share: float, total: float, count: float) -> dict[str, Any]:
        return {
            "size": 224,
            "method": method,
            "share": share,
            "tokens": round(196 * share),
            "accuracy": (total + count) / 2,
            "families": {"total": total, "count": count},
            "patches": 196,
            "box_share": None,
            "text_glyphs": None,
        }

    report = {
        "methods": ["arrcoc", *SINGLE_SCORERS, "tome"],
        "families": ["total", "count"],
        "sizes": [224],
        "reference": {},
        "skipped": {},
        "samples_per_family": 2,
        "seed": 0,
        "shares": [1.0, 0.055],
        "device": "cpu",
        "torch": "x",
        "date": "today",
        "results": [
            *(row(m, 1.0, 0.9, 0.9) for m in ["arrcoc", *SINGLE_SCORERS, "tome"]),  # full budget: no contest
            row("arrcoc", 0.055, 0.80, 0.70),
            row("arrcoc-propositional", 0.055, 0.60, 0.50),
            row("arrcoc-perspectival", 0.055, 0.75, 0.50),
            row("arrcoc-participatory", 0.055, 0.75, 0.705),
            row("tome", 0.055, 0.99, 0.99),  # not a scorer of the mix
        ],
    }
    contest = {c["family"]: c for c in scorer_contest(report, 224)}
    assert set(contest) == {"all", "total", "count"}
    assert contest["total"]["best"] == "arrcoc-perspectival"  # tied with participatory: the earlier one
    assert contest["total"]["lead"] == pytest.approx(0.05)
    assert contest["count"]["best"] == "arrcoc-participatory" and contest["count"]["lead"] == pytest.approx(-0.005)
    assert contest["all"]["best"] == "arrcoc-participatory"
    text = to_markdown(report)
    assert "| total | 11 (5.5%) | 80.0 | 60.0 | 75.0 | 75.0 | arrcoc-perspectival | **+5.0** |" in text
    assert "| count | 11 (5.5%) | 70.0 | 50.0 | 50.0 | 70.5 | arrcoc-participatory | -0.5 |" in text
    report["methods"] = ["arrcoc", "tome"]  # no single scorer: no table
    report["results"] = [r for r in report["results"] if r["method"] in report["methods"]]
    assert scorer_contest(report, 224) == [] and "each scorer alone" not in to_markdown(report)


def test_families_choose_the_questions(tmp_path: Path) -> None:
    """``--families`` limits the run to those families; sample i of the j-th is seed + i * len(families) + j."""
    from arrcoc.tools.evaluation import _samples

    config = EvalConfig(methods=("uniform",), families=("total", "count"), samples_per_family=2, seed=10)
    assert [(s.family, s.question) for s in _samples(config, 64)] == [
        (f, make_sample(10 + i * 2 + j, 64, f).question) for i in range(2) for j, f in enumerate(("total", "count"))
    ]
    code = main(
        [
            "--random-init",
            "tiny",
            "--families",
            "total",
            "--methods",
            "uniform",
            "--sizes",
            "64",
            "--budgets",
            "1",
            "--samples-per-family",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--quiet",
            "--max-new-tokens",
            "1",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["families"] == ["total"] and report["results"][0]["samples"] == 2
    assert main(["--random-init", "tiny", "--families", "total,sum", "--out", str(tmp_path)]) == 2
