"""Visual tokens placed by their boxes: TokenPositions, and the VLM and the adapter adding them."""

from __future__ import annotations

import pytest
import torch

from arrcoc import InvalidInputError
from arrcoc.integrations.token_positions import TokenPositions, add_token_positions, patch_boxes

pytest.importorskip("transformers")


def test_patch_boxes_are_raster_order_unit_boxes() -> None:
    boxes = patch_boxes(2, 3)
    assert boxes.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 2, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 2, 1, 1]]


def test_positions_start_at_zero_and_then_tell_boxes_apart() -> None:
    module = TokenPositions(16)
    boxes = torch.tensor([[[0, 0, 1, 1], [0, 13, 1, 1], [4, 4, 4, 4]]])
    assert module(boxes, (14, 14)).abs().sum() == 0  # a model that gains it starts where it was
    torch.nn.init.normal_(module.proj.weight)
    out = module(boxes, (14, 14))  # (1, 3, 16)
    assert out.shape == (1, 3, 16)
    assert not torch.allclose(out[0, 0], out[0, 1]) and not torch.allclose(out[0, 0], out[0, 2])
    # Shares of the grid: the same box on a grid twice as fine (384 px against 192) gives the same vector.
    torch.testing.assert_close(
        module(torch.tensor([[[6, 10, 4, 2]]]), (24, 24)), module(torch.tensor([[[3, 5, 2, 1]]]), (12, 12))
    )


def test_full_grids_may_leave_the_boxes_out() -> None:
    model = torch.nn.Module()
    projected = torch.randn(1, 9, 8)
    assert add_token_positions(model, projected, None, None) is projected  # a model without positions
    model.token_positions = TokenPositions(8)
    torch.nn.init.normal_(model.token_positions.proj.weight)
    torch.testing.assert_close(
        add_token_positions(model, projected, None, None),
        projected + model.token_positions(patch_boxes(3, 3)[None], (3, 3)),
    )
    torch.testing.assert_close(
        add_token_positions(model, projected[:, :6], None, (2, 3)),
        projected[:, :6] + model.token_positions(patch_boxes(2, 3)[None], (2, 3)),
    )
    with pytest.raises(InvalidInputError, match="boxes of the 7 tokens"):
        add_token_positions(model, torch.randn(1, 7, 8), None, None)
    with pytest.raises(InvalidInputError, match="grid"):
        add_token_positions(model, projected[:, :2], patch_boxes(1, 2)[None], None)


def test_the_vlm_reads_positions_and_keeps_them_through_save_and_load(tmp_path) -> None:
    from arrcoc.world.vlm import VLMConfig, build_vlm, embed_inputs, load_vlm, save_vlm

    model, tok = build_vlm(VLMConfig.from_name("tiny", token_positions=True))
    torch.nn.init.normal_(model.token_positions.proj.weight)
    save_vlm(model, tok, tmp_path, dtype=torch.float32)
    loaded, _ = load_vlm(tmp_path)
    assert loaded.arrcoc_config.token_positions
    torch.testing.assert_close(loaded.token_positions.proj.weight, model.token_positions.proj.weight)
    batch = tok([tok.prompt("Which side is the cross on?")], 2)
    visual = torch.randn(1, 2, 32)
    left = torch.tensor([[[0, 0, 1, 1], [3, 0, 1, 1]]])
    right = torch.tensor([[[0, 3, 1, 1], [3, 3, 1, 1]]])
    with torch.no_grad():
        a = embed_inputs(loaded, batch["input_ids"], visual, left, (4, 4))
        b = embed_inputs(loaded, batch["input_ids"], visual, right, (4, 4))
    assert not torch.allclose(a, b)  # the same tokens elsewhere read differently
    with pytest.raises(InvalidInputError, match="boxes"):
        embed_inputs(loaded, batch["input_ids"], visual)  # two tokens are no full grid


def test_the_adapter_adds_the_reduced_tokens_positions() -> None:
    """Compressed tokens reach the language model with their boxes added, full tokens exactly as in training."""
    from arrcoc.world.data import make_sample
    from arrcoc.world.vlm import VLMConfig, build_vlm, embed_inputs
    from arrcoc.world.vlm_adapter import pixel_values, project_adapter

    model, tokenizer = build_vlm(VLMConfig.from_name("tiny", token_positions=True))
    torch.nn.init.normal_(model.token_positions.proj.weight)
    samples = [make_sample(i, 64, "side") for i in range(2)]
    pixels = pixel_values(model, [s.image for s in samples])
    questions = [s.question for s in samples]
    with torch.no_grad():
        for method in ("uniform", "fastv"):  # fastv also reads the full grid inside the language model
            prepared = project_adapter(model, tokenizer, method).prepare(pixels, questions, 4)
            projected = model.model.multi_modal_projector(prepared.reduced.tokens)
            expected = projected + model.token_positions(prepared.reduced.positions, (4, 4))
            torch.testing.assert_close(prepared.image_tokens, expected)
        full = project_adapter(model, tokenizer, "uniform").prepare(pixels, questions, 16)
        image = full.input_ids == model.config.image_token_id
        reference = embed_inputs(model, full.input_ids, full.reduced.tokens)
        torch.testing.assert_close(full.inputs_embeds[image], reference[image])
