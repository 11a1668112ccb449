"""The small VLM: tokenizer, the same features as the pipeline, the embedding road, saving and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import arrcoc
from arrcoc import InvalidInputError, MissingWeightsError
from arrcoc.stages.tokenizer import CharTokenizer
from arrcoc.world.vlm import (
    DEFAULT_VLM_DIR,
    VLMConfig,
    build_vlm,
    embed_inputs,
    generate_answers,
    load_vlm,
    save_vlm,
    vision_features,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tok = build_vlm(VLMConfig.from_name("tiny"))
    folder = tmp_path_factory.mktemp("vlm")
    save_vlm(model, tok, folder, dtype=torch.float32)
    return model, tok, folder


def test_tokenizer_round_trip_and_left_padding() -> None:
    tok = CharTokenizer()
    text = "What does the text in the red box say? AB3"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.prompt("Is there a red circle?")
    ids = tok.encode(tok.expand(prompt, 5))
    assert ids.count(tok.image_token_id) == 5
    batch = tok([prompt, tok.prompt("Which side?")], image_tokens=[3, 4], targets=["yes", "left"])
    ids, mask, labels, pos = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    assert ids.shape == mask.shape == labels.shape == pos.shape
    assert (mask[:, -1] == 1).all() and mask[1, 0] == 0 and mask[0, 0] == 1  # the shorter row: padded on the left
    assert ((ids == tok.image_token_id).sum(1) == torch.tensor([3, 4])).all()
    assert tok.decode(labels[0][labels[0] >= 0]) == "yes" and labels[0][-1] == tok.eos_token_id
    assert pos[0][mask[0].bool()].tolist() == list(range(int(mask[0].sum())))
    with pytest.raises(InvalidInputError):
        tok.encode("caf\u00e9")
    assert CharTokenizer.from_json(tok.to_json()).vocab == tok.vocab
    old = CharTokenizer(template="<image>\nQ: {question}\nA: ")  # the template travels with the weights
    assert CharTokenizer.from_json(old.to_json()).prompt("Why?") == "<image>\nQ: Why?\nA: "
    assert tok.prompt("Why?").index("Why?") < tok.prompt("Why?").index("<image>")  # question first by default
    with pytest.raises(InvalidInputError):
        CharTokenizer(template="no placeholder {question}")


def test_tokenizer_words_take_one_id_only_as_whole_runs_of_letters() -> None:
    from arrcoc.world.data import WORDS, make_sample

    tok = CharTokenizer(words=("purple", "shapes", "Is"))
    ids = tok.encode("Is purple purples shapes3?")
    names = [tok.vocab[i] for i in ids]
    assert names[:4] == ["Is", " ", "purple", " "]
    assert names[4:11] == list("purples")  # not a listed word: spelled
    assert names[11:] == [" ", "shapes", "3", "?"]
    assert tok.decode(ids) == "Is purple purples shapes3?"
    assert tok.vocab_size == CharTokenizer().vocab_size + 3
    again = CharTokenizer.from_json(tok.to_json())
    assert again.vocab == tok.vocab and again.encode("purple") == tok.encode("purple")
    for bad in (["a"], ["two words"], ["caf\u00e9"], ["x1"]):
        with pytest.raises(InvalidInputError, match="words"):
            CharTokenizer(words=bad)
    # The world's questions tokenize to words; its texts to read stay glyph by glyph.
    world = CharTokenizer(words=WORDS)
    sample = make_sample(4, 224, "text")
    assert len(world.encode(sample.answer)) == len(sample.answer)
    assert len(world.encode(sample.question)) < len(sample.question) / 2
    assert all(
        len(world.encode(make_sample(i, 224, f).answer)) == 1 for i in range(3) for f in ("color", "shape", "side")
    )


@pytest.mark.parametrize("size", [224, 384])
def test_vision_features_equal_the_pipeline_encoder(tiny, size: int) -> None:
    model, _, folder = tiny
    pipe = arrcoc.Pipeline.from_pretrained(folder, buckets=(224, 384))
    pixels = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ours = vision_features(model, pixels)
        features, *_ = pipe.encoder(size)(pixels, torch.ones(2, 1, size, size))
    assert ours.shape == (2, (size // 16) ** 2, 32)
    torch.testing.assert_close(features.flatten(1, 2), ours, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_gives_the_same_logits(tiny) -> None:
    model, tok, folder = tiny
    loaded, tok2 = load_vlm(folder)
    assert tok2.vocab == tok.vocab
    visual = torch.randn(2, 7, 32)
    batch = tok([tok.prompt("What color is the circle?")] * 2, 7)
    with torch.no_grad():
        a = model(
            inputs_embeds=embed_inputs(model, batch["input_ids"], visual), attention_mask=batch["attention_mask"]
        ).logits
        b = loaded(
            inputs_embeds=embed_inputs(loaded, batch["input_ids"], visual), attention_mask=batch["attention_mask"]
        ).logits
    torch.testing.assert_close(a, b)
    answers = generate_answers(loaded, tok, ["What color is the circle?", "Is there a red cross?"], visual, 4)
    assert len(answers) == 2 and all(isinstance(a, str) and len(a) <= 4 for a in answers)
    assert answers == generate_answers(loaded, tok, ["What color is the circle?", "Is there a red cross?"], visual, 4)


def test_visual_tokens_change_the_answer_distribution(tiny) -> None:
    model, tok, _ = tiny
    batch = tok([tok.prompt("Which side is the cross on?")], 3)
    with torch.no_grad():
        a = model(inputs_embeds=embed_inputs(model, batch["input_ids"], torch.zeros(1, 3, 32))).logits[:, -1]
        b = model(inputs_embeds=embed_inputs(model, batch["input_ids"], torch.ones(1, 3, 32) * 3)).logits[:, -1]
    assert not torch.allclose(a, b)


def test_mismatched_visual_tokens_and_missing_weights_are_clear_errors(tiny, tmp_path: Path) -> None:
    model, tok, _ = tiny
    batch = tok([tok.prompt("Is there a red circle?")], 4)
    with pytest.raises(InvalidInputError, match="image tokens"):
        embed_inputs(model, batch["input_ids"], torch.zeros(1, 5, 32))
    with pytest.raises(MissingWeightsError):
        load_vlm(tmp_path)
    with pytest.raises(InvalidInputError):
        VLMConfig(hidden_size=30, num_heads=4)


def test_shipped_weights_fit_in_30_mb_and_load() -> None:
    if not (DEFAULT_VLM_DIR / "vlm.json").is_file():
        pytest.skip("no trained VLM in weights/ yet")
    total = sum(f.stat().st_size for f in DEFAULT_VLM_DIR.glob("*.safetensors"))
    assert total <= 30 * 2**20
    model, tok = load_vlm()
    assert vision_features(model, torch.rand(1, 3, 224, 224)).shape[1] == 196
