"""Training: the text query encoder and its loss, the compression augmentation, and a resumable tiny run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arrcoc import InvalidInputError, MissingWeightsError
from arrcoc.data import QUESTION_FAMILIES, make_sample
from arrcoc.text_query import TextQueryConfig, TextQueryEncoder, max_cosine, patch_targets, relevance_loss

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
    from arrcoc.train import random_compression

    features = torch.randn(2, 196, 8)
    g = torch.Generator().manual_seed(0)
    tokens = random_compression(features, g, 0.2)
    assert tokens.shape == (2, round(0.2 * 196), 8)
    full = random_compression(features, g, 1.0)  # every patch kept, only reordered
    assert full.shape == features.shape
    torch.testing.assert_close(full.sort(1).values, features.sort(1).values)


def test_scene_batches_are_deterministic_and_balanced() -> None:
    from arrcoc.train import SceneBatches

    data = SceneBatches(6, sizes=(64,))
    a, b = data.batch(3), data.batch(3)
    assert torch.equal(a["pixels"], b["pixels"]) and a["questions"] == b["questions"]
    assert a["pixels"].shape == (6, 3, 64, 64) and a["targets"].shape == (6, 16)
    assert sorted(a["families"]) == sorted(QUESTION_FAMILIES)


def test_a_tiny_run_trains_saves_evaluates_and_resumes(tmp_path: Path) -> None:
    from arrcoc.train import main
    from arrcoc.vlm import load_vlm

    common = ["--preset", "tiny", "--batch-size", "6", "--workers", "0", "--sizes", "64", "--eval-per-family", "1",
              "--warmup", "1", "--lr", "3e-3"]
    first = main(["--out", str(tmp_path / "a"), "--max-steps", "2", *common])
    assert first["state"]["step"] == 2 and set(first["accuracy"]["64"]) == set(QUESTION_FAMILIES)
    weights = tmp_path / "a" / "weights"
    for name in ("config.json", "encoder.safetensors", "vlm.json", "vlm.safetensors", "text_query.safetensors"):
        assert (weights / name).is_file()
    model, tok = load_vlm(weights)
    assert TextQueryEncoder.from_pretrained(weights)(["Is there a red cross?"])[0].shape == (1, 4, 32)
    # Resume from the shipped-weights folder (what a GPU call brings back) and from the full checkpoint.
    (weights / "eval.json").write_text((tmp_path / "a" / "eval.json").read_text())
    second = main(["--out", str(tmp_path / "b"), "--max-steps", "3", "--resume", str(weights), *common])
    assert second["state"]["step"] == 3 and second["state"]["samples"] == 18
    third = main(["--out", str(tmp_path / "c"), "--max-steps", "4", "--resume", str(tmp_path / "a" / "ckpt.pt"), *common])
    assert third["state"]["step"] == 4
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["state"]["step"] == 4


def test_shipped_query_encoder_points_at_the_answer_boxes() -> None:
    """The shipped participatory query: answer-box patches outrank the rest (AUC) on held-out scenes."""
    from arrcoc.train import EVAL_SEED_START, collate
    from arrcoc.vlm import DEFAULT_VLM_DIR, load_vlm, vision_features

    if not (DEFAULT_VLM_DIR / "text_query.safetensors").is_file():
        pytest.skip("no trained query encoder in weights/ yet")
    model, _ = load_vlm()
    encoder = TextQueryEncoder.from_pretrained(DEFAULT_VLM_DIR)
    batch = collate([make_sample(EVAL_SEED_START + i, 224, QUESTION_FAMILIES[i % 6]) for i in range(12)])
    with torch.no_grad():
        score = max_cosine(*encoder(batch["questions"]), vision_features(model, batch["pixels"].float() / 255))
    aucs = [(s[t > 0][:, None] > s[t == 0][None, :]).float().mean() for s, t in zip(score, batch["targets"]) if t.any()]
    assert len(aucs) >= 8 and torch.stack(aucs).mean() > 0.9
