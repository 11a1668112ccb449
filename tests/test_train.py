"""Training: the text query encoder and its loss, the compression augmentation, and a resumable tiny run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arrcoc import InvalidInputError, MissingWeightsError
from arrcoc.stages.text_query import TextQueryConfig, TextQueryEncoder, max_cosine, patch_targets, relevance_loss
from arrcoc.world.data import QUESTION_FAMILIES, make_sample

pytest.importorskip("transformers")


def test_query_encoder_shapes_round_trip_and_errors(tmp_path: Path) -> None:
    enc = TextQueryEncoder(TextQueryConfig(width=24, dim=16, layers=1, heads=2, num_queries=3)).eval()
    query, mask = enc(["What color is the circle?", "Is there a red cross?"])
    assert query.shape == (2, 3, 24) and mask.shape == (2, 3) and mask.all()
    one, _ = enc("What color is the circle?")
    torch.testing.assert_close(one[0], query[0], atol=1e-5, rtol=1e-5)  # a question's tokens ignore its batch
    assert not torch.allclose(query[0], query[1])
    enc.save_pretrained(tmp_path, dtype=torch.float32)
    again = TextQueryEncoder.from_pretrained(tmp_path)
    assert again.config == enc.config
    torch.testing.assert_close(again(["Is there a red cross?"])[0], query[1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(MissingWeightsError):
        TextQueryEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(InvalidInputError):
        enc([])


def test_relevance_loss_rewards_queries_that_point_at_the_answer_patches() -> None:
    enc = TextQueryEncoder(TextQueryConfig(width=8, dim=16, layers=1, heads=2, num_queries=2))
    features = torch.randn(1, 6, 8) * 0.1
    features[0, :2, 0] += 5.0  # the answer patches share a direction
    target = torch.tensor([[1.0, 1, 0, 0, 0, 0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    toward = torch.zeros(1, 2, 8)
    toward[..., 0] = 1.0
    good = relevance_loss(enc, toward, mask, features, target)
    bad = relevance_loss(enc, -toward, mask, features, target)
    assert good < bad
    assert max_cosine(toward, mask, features)[0, :2].min() > max_cosine(toward, mask, features)[0, 2:].max()


def test_patch_targets_mark_the_covered_patches() -> None:
    t = patch_targets(((16, 16, 48, 32),), 64)  # two patches of row 1 fully covered
    assert t.shape == (16,) and t.sum() == 2 and t[5] == 1 and t[6] == 1
    assert patch_targets((), 64).sum() == 0
    s = make_sample(3, 224, "color")
    assert patch_targets(s.boxes, 224).sum() >= 1


def test_random_compression_spends_exactly_the_budget() -> None:
    from arrcoc.world.train import random_compression

    features = torch.randn(2, 196, 8)
    g = torch.Generator().manual_seed(0)
    tokens, boxes = random_compression(features, g, 0.2)
    assert tokens.shape == (2, round(0.2 * 196), 8) and boxes.shape == (2, round(0.2 * 196), 4)
    full, boxes = random_compression(features, g, 1.0)  # every patch kept, only reordered
    assert full.shape == features.shape
    torch.testing.assert_close(full.sort(1).values, features.sort(1).values)
    # Each token's box is the patch it came from: gathering by the boxes gives the tokens back.
    assert (boxes[..., 2:] == 1).all()
    index = boxes[..., 0] * 14 + boxes[..., 1]
    torch.testing.assert_close(features.gather(1, index[..., None].expand(-1, -1, 8)), full)


def test_dense_glyph_label_counts_on_glyph_patches_only() -> None:
    from arrcoc.world.train import DENSE_CLASSES, dense_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, sum(DENSE_CLASSES))
    with torch.no_grad():  # only the glyph outputs depend on the features: the other losses stay constant
        start = sum(DENSE_CLASSES[:2])
        keep = torch.zeros(sum(DENSE_CLASSES), 1)
        keep[start : start + DENSE_CLASSES[2]] = 1
        head.weight.mul_(keep)
    features = torch.randn(1, 6, 8)
    labels = torch.zeros(1, 6, 4, dtype=torch.long)
    labels[0, :2, 1] = 5  # two text patches holding glyphs; four background patches
    labels[0, :2, 2] = torch.tensor([3, 7])
    base = dense_loss(head, features, labels)
    background, glyphs = features.clone(), features.clone()
    background[0, 2:] += 5
    glyphs[0, :2] += 5
    assert torch.isclose(dense_loss(head, background, labels), base)  # "no glyph" patches do not count
    assert not torch.isclose(dense_loss(head, glyphs, labels), base)


def test_scene_batches_are_deterministic_and_balanced() -> None:
    from arrcoc.world.train import SceneBatches

    n = len(QUESTION_FAMILIES)
    data = SceneBatches(n, sizes=(64,))
    a, b = data.batch(3), data.batch(3)
    assert torch.equal(a["pixels"], b["pixels"]) and a["questions"] == b["questions"]
    assert a["pixels"].shape == (n, 3, 64, 64) and a["targets"].shape == (n, 16)
    assert sorted(a["families"]) == sorted(QUESTION_FAMILIES)


#: A training run small enough for the CPU: tiny preset, 64 px, a few samples.
TINY_RUN = [
    "--preset",
    "tiny",
    "--batch-size",
    "6",
    "--workers",
    "0",
    "--sizes",
    "64",
    "--eval-per-family",
    "1",
    "--warmup",
    "1",
    "--lr",
    "3e-3",
]


def _resumable_run(folder: Path, steps: int) -> Path:
    """Train a tiny run into ``folder`` and return its weights folder, made resumable (its eval.json beside)."""
    from arrcoc.world.train import main

    main(["--out", str(folder), "--max-steps", str(steps), *TINY_RUN])
    weights = folder / "weights"
    (weights / "eval.json").write_text((folder / "eval.json").read_text())
    return weights


def test_a_tiny_run_trains_saves_evaluates_and_resumes(tmp_path: Path) -> None:
    from arrcoc.world.train import main
    from arrcoc.world.vlm import load_vlm

    first = main(["--out", str(tmp_path / "a"), "--max-steps", "2", *TINY_RUN])
    assert first["state"]["step"] == 2 and set(first["accuracy"]["64"]) == set(QUESTION_FAMILIES)
    weights = tmp_path / "a" / "weights"
    for name in ("config.json", "encoder.safetensors", "vlm.json", "vlm.safetensors", "text_query.safetensors"):
        assert (weights / name).is_file()
    model, tok = load_vlm(weights)
    assert TextQueryEncoder.from_pretrained(weights)(["Is there a red cross?"])[0].shape == (1, 4, 32)
    # Resume from the shipped-weights folder (what a GPU call brings back) and from the full checkpoint.
    (weights / "eval.json").write_text((tmp_path / "a" / "eval.json").read_text())
    second = main(["--out", str(tmp_path / "b"), "--max-steps", "3", "--resume", str(weights), *TINY_RUN])
    assert second["state"]["step"] == 3 and second["state"]["samples"] == 18
    third = main(
        ["--out", str(tmp_path / "c"), "--max-steps", "4", "--resume", str(tmp_path / "a" / "ckpt.pt"), *TINY_RUN]
    )
    assert third["state"]["step"] == 4
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["state"]["step"] == 4


def test_drawn_shares_cover_their_range_and_follow_the_generator() -> None:
    from arrcoc.world.train import draw_share

    shares = [draw_share(0.2, 0.9, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert shares[0] == shares[1]  # the generator decides, nothing else
    generator = torch.Generator().manual_seed(1)
    drawn = [draw_share(0.2, 0.9, generator) for _ in range(400)]
    assert all(0.2 <= s <= 0.9 for s in drawn)
    assert min(drawn) < 0.3 and max(drawn) > 0.8  # the whole range, not a corner of it


def test_a_run_with_drawn_subset_shares_trains(tmp_path: Path) -> None:
    from arrcoc.world.train import main

    summary = main(
        [
            "--out",
            str(tmp_path),
            "--max-steps",
            "2",
            *TINY_RUN,
            "--compress-prob",
            "0",
            "--subset-prob",
            "1",
            "--subset-max",
            "0.9",
        ]
    )
    assert summary["state"]["step"] == 2 and summary["args"]["subset_max"] == 0.9


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--compress-max", "1.5"], "--compress-max"),
        (["--compress-max", "0.01"], "--compress-max"),
        (["--families", "color,colour"], "--families"),
        (["--subset-fraction", "0"], "--subset-fraction"),
        (["--subset-fraction", "0.3", "--subset-max", "0.2"], "--subset-max"),
        (["--subset-max", "1.5"], "--subset-max"),
        (["--freeze-vision"], "--freeze-vision"),
    ],
)
def test_bad_training_options_are_named(tmp_path: Path, argv: list[str], named: str) -> None:
    from arrcoc.world.train import main

    with pytest.raises(ValueError, match=named):
        main(["--out", str(tmp_path), "--max-steps", "1", *TINY_RUN, *argv])


def test_shipped_query_encoder_points_at_the_answer_boxes() -> None:
    """The shipped participatory query: answer-box patches outrank the rest (AUC) on held-out scenes."""
    from arrcoc.world.train import EVAL_SEED_START, collate
    from arrcoc.world.vlm import DEFAULT_VLM_DIR, load_vlm, vision_features

    if not (DEFAULT_VLM_DIR / "text_query.safetensors").is_file():
        pytest.skip("no trained query encoder in weights/ yet")
    model, _ = load_vlm()
    encoder = TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR)
    batch = collate([make_sample(EVAL_SEED_START + i, 224, QUESTION_FAMILIES[i % 6]) for i in range(12)])
    with torch.no_grad():
        score = max_cosine(*encoder(batch["questions"]), vision_features(model, batch["pixels"].float() / 255))
    aucs = [(s[t > 0][:, None] > s[t == 0][None, :]).float().mean() for s, t in zip(score, batch["targets"]) if t.any()]
    assert len(aucs) >= 8 and torch.stack(aucs).mean() > 0.9


def test_grounding_loss_rewards_states_that_mark_the_answer_tokens() -> None:
    from arrcoc.world.train import grounding_loss

    head = torch.nn.Linear(4, 1, bias=False)
    head.weight.data = torch.tensor([[1.0, 0, 0, 0]])
    image = torch.tensor([[False, True, True, True, False], [False, True, True, True, False]])
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    hidden = torch.zeros(2, 5, 4)
    marked = hidden.clone()
    marked[0, 1, 0], marked[0, 2:4, 0] = 4.0, -4.0  # row 0: token 0 of 3 is the answer
    marked[1, 3, 0], marked[1, 1:3, 0] = 4.0, -4.0  # row 1: token 2 of 3
    wrong = -marked
    good, blank, bad = (grounding_loss(head, h, image, targets) for h in (marked, hidden, wrong))
    assert good < blank < bad
    torch.testing.assert_close(blank, torch.tensor(0.6931), atol=1e-4, rtol=0)  # balanced: ln 2 at no evidence
    # Balanced per row: one answer token weighs as much as all the others together.
    only_answer = hidden.clone()
    only_answer[0, 1, 0] = only_answer[1, 3, 0] = 4.0
    assert grounding_loss(head, only_answer, image, targets) < blank


def test_fresh_language_model_keeps_the_vision_side(tmp_path: Path) -> None:
    from arrcoc.world.train import main
    from arrcoc.world.vlm import load_vlm, vision_tower

    weights = _resumable_run(tmp_path / "a", 2)
    # lr 0 keeps every weight where resuming put it, so what is compared is what was loaded.
    main(
        ["--out", str(tmp_path / "b"), "--max-steps", "3", "--resume", str(weights), "--fresh-lm", *TINY_RUN[:-1], "0"]
    )
    old, _ = load_vlm(weights)
    new, _ = load_vlm(tmp_path / "b" / "weights")
    for (name, a), b in zip(vision_tower(old).state_dict().items(), vision_tower(new).state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(old.state_dict()[projector], new.state_dict()[projector])


def test_answer_attention_equals_the_models_own_attention_weights() -> None:
    """The hook's head reproduces the layer's eager attention at the answer cue, and its loss falls as the
    head looks at the answer tokens."""
    from arrcoc.world.train import AnswerAttention
    from arrcoc.world.vlm import VLMConfig, build_vlm, embed_inputs

    model, tok = build_vlm(VLMConfig.from_name("tiny", num_layers=2, num_heads=2, hidden_size=32))
    model.config.text_config._attn_implementation = "eager"  # output_attentions needs the eager kernel
    model.model.language_model.config._attn_implementation = "eager"
    reader = AnswerAttention(model, layer=1, head=1)
    inputs = tok([tok.prompt("What color is the cross?"), tok.prompt("Is there a red one?")], 5, targets=["red", "no"])
    visual = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = model(
            inputs_embeds=embed_inputs(model, inputs["input_ids"], visual),
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            output_attentions=True,
        )
    cue = (inputs["labels"] != -100).int().argmax(1)[:, None] - 1 + torch.arange(2)  # answer tokens 0 and 1
    expected = out.attentions[1][torch.arange(2)[:, None], 1, cue]  # (B, 2, L): layer 1, head 1, from the cues
    torch.testing.assert_close(reader.weights(inputs["attention_mask"], cue), expected, atol=1e-5, rtol=1e-4)
    image = inputs["input_ids"] == tok.image_token_id
    # Row 0: token 0's evidence is visual token 1, token 1's visual token 3; row 1 has none: not counted.
    targets = torch.zeros(2, 2, 5)
    targets[0, 0, 1] = targets[0, 1, 3] = 1.0
    mass = [(expected[0, t][image[0]] * targets[0, t]).sum() for t in range(2)]
    torch.testing.assert_close(
        reader.loss(inputs["attention_mask"], inputs["labels"], image, targets),
        -(torch.stack(mass) + 1e-4).log().mean(),
        atol=1e-5,
        rtol=1e-4,
    )
    reader.close()
    assert reader._handle.id not in reader.attention._forward_hooks  # transformers keeps hooks of its own


def test_glyph_targets_follow_the_asked_text_left_to_right() -> None:
    from arrcoc.world.train import MAX_GLYPHS, dense_labels, glyph_targets

    sample = next(s for s in (make_sample(i, 224, "text") for i in range(20)) if len(s.layout) > 8)
    marks = glyph_targets(sample, 224)
    assert marks.shape == (MAX_GLYPHS, 196)
    frame = sample.boxes[0]
    glyphs = sorted(
        (b, ch)
        for k, ch, b in sample.layout
        if k == "glyph" and frame[0] <= b[0] and b[2] <= frame[2] and frame[1] <= b[1] and b[3] <= frame[3]
    )
    assert "".join(ch for _, ch in glyphs) == sample.answer  # the frame's glyphs, left to right, spell the answer
    for i, ((x0, y0, x1, y1), _) in enumerate(glyphs):  # each answer token marks its glyph's centre patch
        assert marks[i, (y0 + y1) // 2 // 16 * 14 + (x0 + x1) // 2 // 16] == 1
    assert marks[len(sample.answer) :].sum() == 0
    assert glyph_targets(make_sample(1, 224, "color"), 224).sum() == 0
    side = dense_labels(sample.layout, 224)[:, 3].view(14, 14)
    assert (side[:, :7] == 0).all() and (side[:, 7:] == 1).all()


def test_token_positions_join_a_resumed_model_at_zero(tmp_path: Path) -> None:
    from arrcoc.world.train import main
    from arrcoc.world.vlm import load_vlm

    weights = _resumable_run(tmp_path / "a", 1)
    # compress-prob 1: every batch compressed, so the boxes of compressed tokens reach the model.
    main(
        [
            "--out",
            str(tmp_path / "b"),
            "--max-steps",
            "3",
            "--resume",
            str(weights),
            "--token-positions",
            "--compress-prob",
            "1",
            *TINY_RUN,
        ]
    )
    model, _ = load_vlm(tmp_path / "b" / "weights")
    assert model.arrcoc_config.token_positions
    assert model.token_positions.proj.weight.abs().sum() > 0  # started at zero, trained since


def test_a_frozen_vision_fine_tune_trains_the_language_side_only(tmp_path: Path) -> None:
    """``--freeze-vision`` from a weights folder: the ViT and the text query encoder come out bit-identical (as
    tensors), the projector and language model move, the result loads, and the new family is evaluated."""
    from safetensors.torch import load_file

    from arrcoc.world.train import main
    from arrcoc.world.vlm import load_vlm

    weights = _resumable_run(tmp_path / "a", 1)
    summary = main(
        [
            "--out",
            str(tmp_path / "b"),
            "--max-steps",
            "3",
            "--resume",
            str(weights),
            "--freeze-vision",
            "--restart-schedule",
            "--families",
            "total,total,count",
            *TINY_RUN,
        ]
    )
    tuned = tmp_path / "b" / "weights"
    assert summary["state"]["step"] == 3 and summary["state"]["freeze_vision"]
    assert "total" in summary["accuracy"]["64"]
    for name in ("encoder.safetensors", "text_query.safetensors"):
        before, after = load_file(weights / name), load_file(tuned / name)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    before, after = load_file(weights / "vlm.safetensors"), load_file(tuned / "vlm.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(
        before["model.multi_modal_projector.linear_1.weight"], after["model.multi_modal_projector.linear_1.weight"]
    )
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model.layers" in k)
    model, _ = load_vlm(tuned)
    assert model.arrcoc_config == load_vlm(weights)[0].arrcoc_config
    # its checkpoint continues only as a frozen run: the optimiser holds the language side alone
    again = ["--out", str(tmp_path / "c"), "--max-steps", "4", "--resume", str(tmp_path / "b" / "ckpt.pt"), *TINY_RUN]
    assert main([*again, "--freeze-vision"])["state"]["step"] == 4
    with pytest.raises(ValueError, match="--freeze-vision"):
        main(again)


def test_check_frozen_names_the_tensors_that_moved() -> None:
    from arrcoc.world.train import check_frozen, frozen_snapshot

    part = torch.nn.Linear(3, 2)
    snapshot = frozen_snapshot({"head": part})
    check_frozen({"head": part}, snapshot)  # nothing moved
    with torch.no_grad():
        part.bias[0] += 1e-6
    with pytest.raises(RuntimeError, match="head/bias"):
        check_frozen({"head": part}, snapshot)
