"""The Qwen-VL adapter on tiny, randomly initialised Qwen2-VL and Qwen2.5-VL models built here (no downloads)."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

import arrcoc

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from arrcoc import hf  # noqa: E402
from arrcoc.integrations.hf import ArrcocLlava, word_tokenizer  # noqa: E402
from arrcoc.integrations.qwen import (  # noqa: E402
    SCORE_WIDTH,
    ArrcocQwen,
    _box_means,
    _sent_all,
    graph_buckets,
    kept_units,
    merged_grid,
    score_projection,
)
from arrcoc.integrations.vision_tower import (  # noqa: E402
    default_prune_after,
    pack_vision_tower,
    tower_head,
    tower_plan,
    tower_tail,
    unpack_vision_tower,
)

WORDS = "USER ASSISTANT : what colour is the box left of red green blue a shape ? which side".split()
IMAGE_ID = 5
TEMPLATE = "USER: {image} {question} ASSISTANT:"
PROMPTS = ["what colour is the box ?", "which side ?", "what shape is left of the red box ?"]
#: Reducers the adapter serves (visionzip needs a [CLS], fastv early-layer text attention).
METHODS = ["arrcoc", "arrcoc-noquery", "uniform", "random", "divprune", "tome"]
FAMILIES = ["qwen2_vl", "qwen2_5_vl"] + (
    ["qwen3_vl"] if hasattr(transformers, "Qwen3VLForConditionalGeneration") else []
)


def _text(family: str) -> dict:
    # GQA (4 heads, 2 key/value heads); head_dim 8, so mrope_section sums to 4
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    extra = dict(head_dim=8, rope_parameters={**rope, "mrope_interleaved": True}) if family == "qwen3_vl" else {}
    return (
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            eos_token_id=None,
            bos_token_id=1,
            rope_parameters=rope,
        )
        | extra
    )


def build(family: str) -> tuple[torch.nn.Module, object]:
    """A two- or three-block vision tower (patch 14, or 16 for Qwen3-VL with DeepStack from its first two blocks;
    merge 2) and a three-layer language model; a processor built offline."""
    ids = dict(image_token_id=IMAGE_ID, video_token_id=63, vision_start_token_id=62, vision_end_token_id=61)
    if family == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = transformers.Qwen2VLConfig(text_config=_text(family), vision_config=vision, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen3_vl":
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        config = transformers.Qwen3VLConfig(text_config=_text(family), vision_config=vision, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=40,  # padded to 64 by pack_vision_tower's MLP
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            out_hidden_size=32,
            fullatt_block_indexes=[1],
        )
        config = transformers.Qwen2_5_VLConfig(text_config=_text(family), vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    cell = 2 * vision["patch_size"]  # pixels per merged token
    images = transformers.Qwen2VLImageProcessor(
        patch_size=vision["patch_size"], size={"shortest_edge": 4 * cell * cell, "longest_edge": 64 * cell * cell}
    )
    tokenizer = word_tokenizer(WORDS, image_token_id=IMAGE_ID, image_token="<|image_pad|>")
    return model, types.SimpleNamespace(tokenizer=tokenizer, image_processor=images)


def _images(n: int) -> list[torch.Tensor]:
    """Images of different sizes (merged grids 4x5, 3x2, 5x6, 2x4 at patch 14; 3x5, 3x2, 5x5, 2x4 at patch 16)."""
    sizes = [(100, 150), (90, 60), (150, 170), (60, 120)]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, *sizes[i % 4]), dtype=torch.uint8, generator=gen) for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, object]:
    return build(request.param)


def _adapter(qwen: tuple, method: str = "arrcoc", **kwargs: object) -> ArrcocQwen:
    model, processor = qwen
    return ArrcocQwen(model, processor, method=method, template=TEMPLATE, reducer_graphs="off", **kwargs)


def _reference(adapter: ArrcocQwen, prepared: object, images: list[torch.Tensor]) -> dict:
    """The unmodified model's own inputs for the same full-length prompt (its vision path, its rope index)."""
    inputs = adapter.image_processor(images=images, return_tensors="pt")
    ids = prepared.input_ids
    reference = dict(
        input_ids=ids,
        attention_mask=prepared.attention_mask,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        mm_token_type_ids=(ids == IMAGE_ID).int(),
    )
    given = adapter.reference_inputs(images, PROMPTS[: len(images)])
    assert given.keys() == reference.keys() and all(torch.equal(given[k], reference[k]) for k in given)
    return reference


# --- exactness at the full budget ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["arrcoc", "uniform", "divprune"])
@pytest.mark.parametrize("budget", [None, 1.0])
def test_full_budget_logits_equal_the_unmodified_model(qwen: tuple, method: str, budget: float | None) -> None:
    adapter = _adapter(qwen, method)
    images = _images(3)  # three sizes in one batch
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS, budget)
        got = adapter.run(prepared).logits
        reference = _reference(adapter, prepared, images)
        expected = adapter.model(**reference).logits
        positions, _ = adapter.inner.get_rope_index(
            reference["input_ids"],
            reference["mm_token_type_ids"],
            image_grid_thw=reference["image_grid_thw"],
            attention_mask=reference["attention_mask"],
        )
    real = prepared.attention_mask.bool()
    assert prepared.budgets == [g[0] * g[1] for g in prepared.grids] and len(set(prepared.grids)) == 3
    assert torch.equal(prepared.position_ids[:, real], positions[:, real])  # the model's own 3-D positions
    assert torch.equal(got[real], expected[real])


def test_the_full_budget_test_can_fail(qwen: tuple) -> None:
    """A defect the exactness test must catch: tokens one column off in their rotary positions."""
    adapter = _adapter(qwen)
    images = _images(2)
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS[:2])
        shifted = prepared.position_ids.clone()
        shifted[2][prepared.input_ids == IMAGE_ID] += 1
        got = adapter.run(dataclasses.replace(prepared, position_ids=shifted)).logits
        expected = adapter.model(**_reference(adapter, prepared, images)).logits
    real = prepared.attention_mask.bool()
    assert not torch.equal(got[real], expected[real])


# --- budgets and positions ----------------------------------------------------------------------------
def _budgeted(adapter: ArrcocQwen, reference: ArrcocQwen, images: list, budget: int | float) -> tuple:
    """``adapter``'s prepared inputs at ``budget``, ``reference``'s with every token, the image slots and the
    budgets wanted, after the checks every path owes: exactly the budget in each image's slots, filled with its
    tokens, and finite logits."""
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS, budget)
        full = reference.prepare(images, PROMPTS)
        logits = adapter.run(prepared).logits
    sizes = [gh * gw for gh, gw in prepared.grids]
    wanted = [5] * 3 if isinstance(budget, int) else [max(1, round(budget * n)) for n in sizes]
    slots = prepared.input_ids == IMAGE_ID
    assert prepared.budgets == wanted and slots.sum(1).tolist() == wanted
    assert [t.shape[0] for t in prepared.image_tokens] == wanted
    assert torch.equal(prepared.inputs_embeds[slots], torch.cat(prepared.image_tokens))
    assert torch.isfinite(logits).all()
    return prepared, full, slots, wanted


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [5, 0.25])
def test_exactly_budget_tokens_at_their_own_positions(qwen: tuple, method: str, budget: int | float) -> None:
    adapter = _adapter(qwen, method)
    images = _images(3)
    prepared, full, slots, wanted = _budgeted(adapter, adapter, images, budget)
    for i, ((gh, gw), out) in enumerate(zip(prepared.grids, prepared.reduced)):
        boxes = out.positions[0]  # (K, 4) on the merged grid: no token stands for padding
        assert (boxes[:, 0] + boxes[:, 2] <= gh).all() and (boxes[:, 1] + boxes[:, 3] <= gw).all()
        kept = prepared.position_ids[:, i, slots[i]]  # (3, K)
        cells = full.position_ids[:, i, full.input_ids[i] == IMAGE_ID].view(3, gh, gw)
        centre_r, centre_c = boxes[:, 0] + (boxes[:, 2] - 1) // 2, boxes[:, 1] + (boxes[:, 3] - 1) // 2
        assert torch.equal(kept, cells[:, centre_r, centre_c])  # each token at its own cell's 3-D position
        after = 4  # "ASSISTANT", ":" and the question's tail: the text after the image keeps the model's positions
        assert torch.equal(prepared.position_ids[:, i, -after:], full.position_ids[:, i, -after:])
    if method == "arrcoc" and isinstance(budget, int):  # tokens are the model's own merged tokens, kept whole
        features = adapter.merged_features(*adapter.image_inputs(images))
        for f, out in zip(features, prepared.reduced):
            boxes = out.positions[0]
            assert torch.equal(
                out.tokens[0][boxes[:, 2] * boxes[:, 3] == 1],
                f[boxes[:, 0], boxes[:, 1]][boxes[:, 2] * boxes[:, 3] == 1],
            )


def test_batch_equals_single_images(qwen: tuple) -> None:
    adapter = _adapter(qwen)
    images = _images(3)
    with torch.no_grad():
        batch = adapter.prepare(images, PROMPTS, 0.3)
        logits = adapter.run(batch).logits[:, -1]
        for i in range(3):
            single = adapter.prepare(images[i], PROMPTS[i], 0.3)
            alone = adapter.run(single).logits[0, -1]
            assert torch.equal(batch.reduced[i].positions, single.reduced[0].positions)
            torch.testing.assert_close(batch.reduced[i].tokens, single.reduced[0].tokens)
            torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)


def test_pixels_the_reducer_reads_are_the_image(qwen: tuple) -> None:
    """The processor's patch layout undone: an image already at 28-px multiples comes back as itself (pooled 2x2)."""
    adapter = _adapter(qwen)
    cell, p = adapter.merge_size * adapter.patch_size, adapter.patch_size
    image = torch.randint(
        0, 256, (3, 3 * cell, 4 * cell), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    pixel_values, grid_thw = adapter.image_inputs([image])
    (rgb,) = adapter._rgb(pixel_values, adapter.merged_grids(grid_thw))
    assert adapter.merged_grids(grid_thw) == [(3, 4)] and rgb.shape == (3, 3 * p, 4 * p)
    torch.testing.assert_close(rgb, torch.nn.functional.avg_pool2d(image.float() / 255, 2), atol=1e-5, rtol=0)


def test_the_question_is_the_query(qwen: tuple) -> None:
    adapter = _adapter(qwen)
    prepared = adapter.prepare(_images(1), PROMPTS[1])
    words = adapter.tokenizer.convert_ids_to_tokens(prepared.input_ids[0][prepared.query_mask[0]].tolist())
    assert words == ["which", "side", "?"]


# --- generation ---------------------------------------------------------------------------------------
def test_model_generate_at_full_budget_equals_the_unmodified_model(qwen: tuple) -> None:
    adapter = _adapter(qwen)
    images = _images(2)
    greedy = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = adapter.generate(images, PROMPTS[:2], **greedy)
    prepared = adapter.prepare(images, PROMPTS[:2])
    with torch.no_grad():
        expected = adapter.model.generate(**_reference(adapter, prepared, images), **greedy)
    assert new.sequences.shape == (2, 5)
    assert torch.equal(new.sequences, expected.sequences[:, -5:])
    for got, want in zip(new.scores, expected.scores, strict=True):  # every step's logits, not only the argmax
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prune_after", [None, 0])
def test_model_generate_reduced_equals_greedy_forward(qwen: tuple, prune_after: int | None) -> None:
    """Decode steps continue the 3-D positions: generate's tokens equal a greedy loop over ``forward``, reducing
    the tower's output and pruning inside it."""
    adapter = _adapter(qwen, prune_after=prune_after)
    images = _images(2)
    new = adapter.generate(images, PROMPTS[:2], budget=0.25, max_new_tokens=3, do_sample=False)
    prepared = adapter.prepare(images, PROMPTS[:2], 0.25)
    embeds, mask, positions = prepared.inputs_embeds, prepared.attention_mask, prepared.position_ids
    with torch.no_grad(), adapter.reading(prepared):  # Qwen3-VL: DeepStack on every pass over the whole prompt
        for step in range(3):
            token = adapter.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = token.argmax(-1)
            assert torch.equal(token, new[:, step])
            embeds = torch.cat((embeds, adapter.model.get_input_embeddings()(token)[:, None]), 1)
            mask = torch.cat((mask, mask[:, -1:]), 1)
            positions = torch.cat((positions, positions[..., -1:] + 1), -1)


def test_unreduced_is_the_full_budget_without_a_reducer(qwen: tuple) -> None:
    adapter = _adapter(qwen)
    images = _images(3)
    full = adapter.prepare(images, PROMPTS, 1.0)
    every = adapter.unreduced(images, PROMPTS)
    for name in ("inputs_embeds", "attention_mask", "position_ids", "input_ids"):
        assert torch.equal(getattr(every, name), getattr(full, name)), name
    assert every.budgets == full.budgets and every.reduced[0].relevance is None
    if full.deepstack is not None:
        assert all(torch.equal(a, b) for a, b in zip(every.deepstack, full.deepstack, strict=True))


@pytest.mark.parametrize("budget", [0.25, 1.0])
def test_graphed_decoder_generates_the_models_own_tokens(qwen: tuple, budget: float) -> None:
    """The static-cache decoder (run eagerly on the CPU: the step its graphs capture) reads the 3-D positions and
    Qwen3-VL's DeepStack as the model does: greedy tokens equal the model's own generate."""
    adapter = _adapter(qwen)
    images, prompts = _images(3), PROMPTS
    prepared = adapter.prepare(images, prompts, budget)
    expected = adapter.generate_prepared(prepared, max_new_tokens=8, do_sample=False)
    got = adapter.generate_prepared(prepared, decode="graphed", max_new_tokens=8)
    assert not adapter.decoder.graphs and torch.equal(got, expected)
    assert torch.equal(adapter.generate(images, prompts, budget, decode="graphed", max_new_tokens=8), expected)
    # its first step's logits are the model's, for the true 3-D positions and for the time axis alone on all
    # three (which changes them beyond the tolerance), with DeepStack and (the model outside ``reading``) without
    inputs = adapter._decoder_inputs(prepared)
    embeds, mask, positions = prepared.inputs_embeds, prepared.attention_mask, prepared.position_ids
    flat = positions[:1].expand_as(positions)
    with torch.no_grad():
        with adapter.reading(prepared):
            want = adapter.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
            want_flat = adapter.model(inputs_embeds=embeds, attention_mask=mask, position_ids=flat).logits[:, -1]
        bare = adapter.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]
    logits = adapter.decoder.prefill_logits(embeds, mask, **inputs)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    got_flat = adapter.decoder.prefill_logits(embeds, mask, **(inputs | {"position_ids": flat}))
    torch.testing.assert_close(got_flat, want_flat, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_flat, logits, rtol=1e-5, atol=1e-5)
    if inputs["deepstack"] is not None:
        without = adapter.decoder.prefill_logits(embeds, mask, **(inputs | {"deepstack": None}))
        torch.testing.assert_close(without, bare, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(without, logits, rtol=1e-5, atol=1e-5)


def test_graphed_decoder_refuses_bad_positions(qwen: tuple) -> None:
    adapter = _adapter(qwen)
    prepared = adapter.prepare(_images(1), PROMPTS[:1], 0.25)
    with pytest.raises(arrcoc.InvalidInputError, match=r"position_ids must be \(3, 1, \d+\)"):
        adapter.decoder.generate(
            prepared.inputs_embeds, prepared.attention_mask, position_ids=prepared.position_ids[:2], max_new_tokens=2
        )
    with pytest.raises(arrcoc.InvalidInputError, match="decode must be 'hf' or 'graphed'; got 'x'"):
        adapter.generate_prepared(prepared, decode="x")


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphed_decoder_replays_the_eager_tokens(family: str) -> None:
    """Prefill and step captured as CUDA graphs give the eager decoder's tokens, on a capture and on a replay."""
    from arrcoc.integrations.decode import GraphedDecoder

    model, processor = build(family)
    adapter = ArrcocQwen(model.cuda(), processor, method="arrcoc", template=TEMPLATE)
    images = _images(3)
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS, 0.25)
        eager = adapter.generate_prepared(prepared, max_new_tokens=16, do_sample=False)
        first = adapter.generate_prepared(prepared, decode="graphed", max_new_tokens=16)
        again = adapter.generate_prepared(prepared, decode="graphed", max_new_tokens=16)
        plain = GraphedDecoder(adapter.language_model, model.get_output_embeddings(), graphs=False)
    decoder = adapter.decoder
    assert decoder.graphs and decoder.captures == 2 and all(s.failed is None for s in decoder._states.values())
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert plain.mrope == decoder.mrope


# --- graphs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["arrcoc", "divprune"])
def test_one_graph_per_bucket(qwen: tuple, method: str) -> None:
    model, processor = qwen
    graphed = ArrcocQwen(model, processor, method=method, template=TEMPLATE, reducer_graphs="eager", grid_multiple=8)
    direct = _adapter(qwen, method)
    images = _images(3)  # three merged grids, one 8x8 bucket
    with torch.no_grad():
        got = graphed.prepare(images, PROMPTS, 4)
        again = graphed.prepare(images[::-1], PROMPTS[::-1], 4)
        expected = direct.prepare(images, PROMPTS, 4)
        assert graphed.captures == 1  # three sizes, one bucket; a second call replays
        shares = graphed.prepare(images, PROMPTS, 0.5)  # a budget per image: three different counts
        graphed.prepare(images, PROMPTS, 0.45)  # other counts on the same capacity step: a replay
        expected_shares = direct.prepare(images, PROMPTS, 0.5)
    assert torch.equal(got.inputs_embeds, expected.inputs_embeds)
    assert torch.equal(got.position_ids, expected.position_ids)
    assert torch.equal(again.inputs_embeds[1], got.inputs_embeds[1])
    assert shares.budgets == [round(gh * gw / 2) for gh, gw in shares.grids] and len(set(shares.budgets)) == 3
    assert torch.equal(shares.inputs_embeds, expected_shares.inputs_embeds)
    assert torch.equal(shares.position_ids, expected_shares.position_ids)
    # arrcoc's budgets are a tensor: one graph per bucket and capacity step for every budget on it (4 fits an
    # eighth of the bucket's 64 slots, the shares' largest, 15 and 14, a quarter); a baseline's budget fixes its
    # output shape: one graph per distinct budget (4; 10, 3, 15; 9, 14)
    assert graphed.captures == (2 if method == "arrcoc" else 6)


def test_the_budget_tensor_path_equals_the_reducer(qwen: tuple) -> None:
    """arrcoc's reducer fed per-image budgets as a tensor keeps what ``reducer(visual, budget)`` keeps."""
    adapter = _adapter(qwen)
    images = _images(2)
    with torch.no_grad():
        pixel_values, grid_thw = adapter.image_inputs(images)
        features = adapter.merged_features(pixel_values, grid_thw)
        rgb = adapter._rgb(pixel_values, adapter.merged_grids(grid_thw))
        embeds = torch.randn(2, 6, features[0].shape[-1])
        (group,) = adapter._groups(adapter.merged_grids(grid_thw), [[1, 2], [3]], [0, 0], [5, 5])
        visual = adapter._visual(adapter._group_inputs(group, features, rgb, embeds), narrow=False)
        capacity, steps = adapter._capacity(group.bucket, [5, 5], [f.shape[:2] for f in features], asked=False)
        got = adapter._head(visual, group.budgets, capacity, steps)
        expected = adapter.reducer(visual, 5)
    assert torch.equal(got["positions"][:, :5], expected.positions)
    assert torch.equal(got["tokens"][:, :5], expected.tokens)


def test_deepstack_follows_the_kept_tokens() -> None:
    """Qwen3-VL's DeepStack features: a kept cell reads its own, a pooled box the mean over the box."""
    grid = torch.randn(2, 4, 5, 3)  # (L, gh, gw, H)
    boxes = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 3], [3, 4, 1, 1]])
    got = _box_means(grid, boxes)
    assert torch.equal(got[:, 0], grid[:, 0, 0]) and torch.equal(got[:, 2], grid[:, 3, 4])
    torch.testing.assert_close(got[:, 1], grid[:, 1:3, 1:4].mean((1, 2)))


def test_host_tensors_travel_in_one_buffer_and_keep_their_values() -> None:
    """What ``prepare`` makes on the host goes to the device as one packed buffer: each tensor comes back with its
    dtype, shape and values, none overlapping another (a write into one leaves the rest)."""
    tensors = [
        torch.arange(6).view(2, 3),  # int64
        torch.tensor([[True, False, True]]),  # bool, 3 bytes: the next starts on an 8-byte boundary
        torch.rand(2, 3, 5),  # float32
        torch.zeros(0, dtype=torch.long),  # empty
        torch.arange(12).view(3, 4).t(),  # not contiguous
    ]
    sent = _sent_all(tensors, torch.device("cpu"))
    for got, want in zip(sent, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    sent[0].fill_(-1)
    assert all(torch.equal(got, want) for got, want in zip(sent[1:], tensors[1:]))
    assert sent[1].untyped_storage().data_ptr() == sent[2].untyped_storage().data_ptr()  # one buffer


def test_graph_buckets_and_merged_grid() -> None:
    assert merged_grid(960, 1280) == (34, 46)  # Qwen's smart_resize: 952 x 1288 px
    processor = transformers.Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 400})
    for h, w in [(960, 1280), (37, 41), (300, 20), (500, 600)]:  # capped, raised to the minimum, thin, as is
        thw = processor(images=[torch.zeros(3, h, w, dtype=torch.uint8)], return_tensors="pt")["image_grid_thw"]
        assert merged_grid(h, w, max_pixels=28 * 28 * 400) == (thw[0, 1] // 2, thw[0, 2] // 2)
    assert merged_grid(100, 150) == (4, 5)  # the tiny processor's first test image (area within bounds)
    assert graph_buckets([(34, 46), (30, 41), (33, 47), (9, 9)], 8) == {(40, 48), (32, 48), (16, 16)}


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["arrcoc", "divprune"])
def test_cuda_graph_replay_equals_direct_call(family: str, method: str) -> None:
    model, processor = build(family)
    model = model.cuda()
    graphed = ArrcocQwen(model, processor, method=method, template=TEMPLATE, reducer_graphs="auto")
    direct = ArrcocQwen(model, processor, method=method, template=TEMPLATE, reducer_graphs="off")
    images = _images(4)
    with torch.no_grad():
        expected = direct.prepare(images, PROMPTS + PROMPTS[:1], 0.25)
        got = graphed.prepare(images, PROMPTS + PROMPTS[:1], 0.25)
        got = graphed.prepare(images, PROMPTS + PROMPTS[:1], 0.25)  # replayed
        new = graphed.generate(images, PROMPTS + PROMPTS[:1], 0.25, max_new_tokens=3, do_sample=False)
    # four sizes in one bucket: arrcoc's budgets are a tensor (one graph); a baseline captures per budget
    assert graphed.captures == (1 if method == "arrcoc" else len(set(got.budgets)))
    torch.testing.assert_close(got.inputs_embeds, expected.inputs_embeds)
    assert torch.equal(got.position_ids, expected.position_ids)
    assert new.shape == (4, 3)


def test_the_tower_read_directly_equals_get_image_features(qwen: tuple) -> None:
    """The adapter calls the tower itself (no read-back of the sizes after it): the same merged tokens, and for
    Qwen3-VL the same DeepStack features, as the model's own ``get_image_features``."""
    model, processor = qwen
    adapter = _adapter(qwen)
    inputs = processor.image_processor(images=_images(3), return_tensors="pt")
    pixels, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        features, deep = adapter._image_features(pixels, grid_thw, adapter.merged_grids(grid_thw))
        out = model.model.get_image_features(pixels, grid_thw)
    expected = out.pooler_output if hasattr(out, "pooler_output") else out
    assert len(features) == len(expected) == 3
    assert all(torch.equal(f.flatten(0, 1), e) for f, e in zip(features, expected))
    assert (deep is not None) == adapter.deepstack
    if deep is not None:
        layers = out.deepstack_features
        for i, d in enumerate(deep):
            assert all(torch.equal(d[n].flatten(0, 1), layer[i]) for n, layer in enumerate(layers))


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("question", [True, False])
@pytest.mark.parametrize("score_width", [None, 8])
def test_cuda_prepare_never_waits_for_the_vision_tower(family: str, question: bool, score_width: int | None) -> None:
    """Once the tower is queued, ``prepare`` reads nothing back and copies nothing from the host (each would
    wait for the tower): the reducer's launches queue behind the tower, and the language model's after them
    (with a narrow head too: the projection and the gather at the chosen cells stay on the device)."""
    model, processor = build(family)
    model = model.cuda()
    adapter = ArrcocQwen(model, processor, template=TEMPLATE, score_width=score_width)
    images = _images(4)
    prompts = (PROMPTS + PROMPTS[:1]) if question else [TEMPLATE.format(image="<|image_pad|>", question="")] * 4
    with torch.no_grad():
        adapter.prepare(images, prompts, 0.25)  # the first call captures the reducer's graph (a capture syncs)
        handle = model.model.visual.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
        try:
            prepared = adapter.prepare(images, prompts, 0.25)
        finally:
            handle.remove()
            torch.cuda.set_sync_debug_mode(0)
    assert prepared.query_mask.any().item() == question
    assert prepared.budgets == [round(gh * gw / 4) for gh, gw in prepared.grids]


# --- pruning inside the vision tower -------------------------------------------------------------------
def _depth(qwen: tuple) -> int:
    return len(qwen[0].model.visual.blocks)


@pytest.mark.parametrize("budget", [5, 0.25])
def test_pruned_path_keeps_exactly_budget_tokens_at_their_own_positions(qwen: tuple, budget: int | float) -> None:
    adapter = _adapter(qwen, prune_after=0)
    images = _images(3)
    prepared, full, slots, wanted = _budgeted(adapter, _adapter(qwen), images, budget)
    for i, ((gh, gw), out) in enumerate(zip(prepared.grids, prepared.reduced)):
        cells = out.positions[0]  # (K, 4): one merged unit each, in raster order, no two alike
        assert (cells[:, 2:] == 1).all() and (cells[:, 0] < gh).all() and (cells[:, 1] < gw).all()
        key = cells[:, 0] * gw + cells[:, 1]
        assert (key[1:] > key[:-1]).all()
        grid = full.position_ids[:, i, full.input_ids[i] == IMAGE_ID].view(3, gh, gw)
        assert torch.equal(prepared.position_ids[:, i, slots[i]], grid[:, cells[:, 0], cells[:, 1]])
        assert torch.equal(prepared.position_ids[:, i, -4:], full.position_ids[:, i, -4:])  # the text after
    if adapter.deepstack:
        assert [d.shape for d in prepared.deepstack] == [(sum(wanted), prepared.inputs_embeds.shape[-1])] * 2


def test_pruned_batch_equals_single_images(qwen: tuple) -> None:
    """Each image keeps its own units and attends inside them: its tokens do not depend on its batch."""
    adapter = _adapter(qwen, prune_after=0)
    images = _images(3)
    with torch.no_grad():
        batch = adapter.prepare(images, PROMPTS, 0.3)
        for i in range(3):
            single = adapter.prepare(images[i], PROMPTS[i], 0.3)
            assert torch.equal(batch.reduced[i].positions, single.reduced[0].positions)
            torch.testing.assert_close(batch.reduced[i].tokens, single.reduced[0].tokens, rtol=1e-5, atol=1e-5)


def test_pruning_after_the_last_block_is_the_post_tower_reduction(qwen: tuple) -> None:
    """With every block run on every patch, the head sees the tower's own output: the same units, the same
    tokens, the same positions (and for Qwen3-VL the same DeepStack features) as reducing after the tower."""
    images = _images(3)
    with torch.no_grad():
        got = _adapter(qwen, prune_after=_depth(qwen) - 1).prepare(images, PROMPTS, 0.3)
        expected = _adapter(qwen).prepare(images, PROMPTS, 0.3)
    for a, b in zip(got.reduced, expected.reduced):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.position_ids, expected.position_ids) and torch.equal(got.input_ids, expected.input_ids)
    for a, b in zip(got.deepstack or [], expected.deepstack or [], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prune_after", [0, "auto"])
def test_pruning_at_the_full_budget_is_the_unmodified_model(qwen: tuple, prune_after: int | str) -> None:
    adapter = _adapter(qwen, prune_after=prune_after)
    images = _images(3)
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS)
        got = adapter.run(prepared).logits
        expected = adapter.model(**_reference(adapter, prepared, images)).logits
    real = prepared.attention_mask.bool()
    assert torch.equal(got[real], expected[real])


def test_tower_in_two_parts_keeping_every_unit_is_the_models_tower(qwen: tuple) -> None:
    """Head (every patch up to block 0) and tail (the rest on the kept units, here all of them): the model's own
    merged tokens and DeepStack features, in raster order."""
    model, processor = qwen
    visual = model.model.visual
    adapter = _adapter(qwen)
    inputs = processor.image_processor(images=_images(3), return_tensors="pt")
    grids = adapter.merged_grids(inputs["image_grid_thw"])
    sizes = [gh * gw for gh, gw in grids]
    with torch.no_grad():
        plan = tower_plan(visual, grids, sizes, torch.device("cpu"))
        state = tower_head(visual, inputs["pixel_values"], plan, 0)
        tokens, deep = tower_tail(visual, state, plan, torch.arange(sum(sizes)))
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(tokens, torch.cat(list(out.pooler_output)), rtol=1e-5, atol=1e-5)
    assert (deep is not None) == adapter.deepstack
    for got, layer in zip(deep or [], out.deepstack_features if deep else []):
        torch.testing.assert_close(got, torch.cat(list(layer)), rtol=1e-5, atol=1e-5)


def _windowed_qwen25() -> tuple[torch.nn.Module, object]:
    """A three-block Qwen2.5-VL tower (window, window, full): a tail after block 0 holds both kinds of block."""
    model, processor = build("qwen2_5_vl")
    vision = model.config.vision_config.to_dict() | dict(depth=3, fullatt_block_indexes=[2])
    config = transformers.Qwen2_5_VLConfig(
        text_config=model.config.text_config.to_dict(),
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=63,
        vision_start_token_id=62,
        vision_end_token_id=61,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def _random_kept(family: str) -> tuple[torch.nn.Module, object, object, list[tuple[int, int]], list[int], torch.Tensor]:
    """A tiny model of ``family`` (``"qwen2_5_vl-3"``: :func:`_windowed_qwen25`), three images' processor inputs,
    their merged grids, a third of each grid as the budget and a seeded random kept subset of that size: the units
    in raster order counted over the batch."""
    model, processor = _windowed_qwen25() if family == "qwen2_5_vl-3" else build(family)
    inputs = processor.image_processor(images=_images(3), return_tensors="pt")
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
    budgets = [gh * gw // 3 for gh, gw in grids]
    gen = torch.Generator().manual_seed(3)
    units, offset = [], 0
    for (gh, gw), k in zip(grids, budgets):
        units.append(torch.randperm(gh * gw, generator=gen)[:k].sort().values + offset)
        offset += gh * gw
    return model, processor, inputs, grids, budgets, torch.cat(units)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl-3"])
def test_the_tail_attends_inside_each_window_and_image_of_thekept_units(family: str, packed: bool) -> None:
    """The tail, with the model's own attention and packed (windows left empty are sequences of length 0),
    against a loop over the model's own blocks, one window (windowed blocks) or one image (full attention) at a
    time, on a random kept subset."""
    model, processor, inputs, grids, budgets, units = _random_kept(family)
    visual = model.model.visual
    image_of = torch.repeat_interleave(torch.arange(3), torch.tensor(budgets))
    with torch.no_grad():
        plan = tower_plan(visual, grids, budgets, torch.device("cpu"))
        state = tower_head(visual, inputs["pixel_values"], plan, 0)
        if packed:
            pack_vision_tower(model, "padded")
        try:
            got, _ = tower_tail(visual, state, plan, units)
        finally:
            unpack_vision_tower(model)
        # the reference: each kept unit's patches, in the blocks' order, one sequence per window / image
        rows = units if plan.rank is None else plan.rank[units]
        patches = (rows[:, None] * 4 + torch.arange(4)).flatten()
        hidden = state.hidden[patches]
        cos, sin = (x[patches] for x in state.position_embeddings)
        windowed = set(range(len(visual.blocks))) - set(getattr(visual, "fullatt_block_indexes", None) or [])
        for index in range(1, len(visual.blocks)):
            group = plan.window_of[rows] if plan.window_of is not None and index in windowed else image_of
            out = torch.empty_like(hidden)
            for g in group.unique():
                take = (group == g).repeat_interleave(4)
                n = int(take.sum())
                out[take] = visual.blocks[index](
                    hidden[take],
                    cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                    max_seqlen=n,
                    position_embeddings=(cos[take], sin[take]),
                )
            hidden = out
        expected = visual.merger(hidden)
    if plan.window_of is not None:  # several windows kept, some not at all
        assert 3 < len(plan.window_of[rows].unique()) < plan.windows
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_adapter_keeps_its_tower_plans(qwen: tuple) -> None:
    adapter = _adapter(qwen, prune_after=0)
    cpu = torch.device("cpu")
    plan = adapter.plan([(4, 5), (3, 2)], [5, 2], cpu)
    assert (
        adapter.plan([(4, 5), (3, 2)], [5, 2], cpu) is plan and adapter.plan([(4, 5), (3, 2)], [6, 2], cpu) is not plan
    )
    for k in range(1, 40):
        adapter.plan([(4, 5)], [k % 20 + 1], cpu)
    assert len(adapter._plans) == 16
    with torch.no_grad():
        prepared = adapter.prepare(_images(2), PROMPTS[:2], 0.25)
    assert (tuple(prepared.grids), tuple(prepared.budgets)) in {key[:2] for key in adapter._plans}


def test_bad_prune_after_is_refused(qwen: tuple) -> None:
    depth = _depth(qwen)
    for value in (-1, depth, 1.5, "first", True):
        with pytest.raises(arrcoc.InvalidInputError, match=rf"in \[0, {depth - 1}\].*got {value!r}"):
            _adapter(qwen, prune_after=value)
    with pytest.raises(arrcoc.InvalidInputError, match="arrcoc's reducers.*'uniform'"):
        _adapter(qwen, "uniform", prune_after=0)
    assert _adapter(qwen, prune_after="auto").prune_after == default_prune_after(qwen[0].config.vision_config)


def test_default_prune_after() -> None:
    qwen25 = transformers.Qwen2_5_VLConfig(vision_config=dict(depth=32, fullatt_block_indexes=[7, 15, 23, 31]))
    qwen2 = transformers.Qwen2VLConfig(vision_config=dict(depth=32))
    assert default_prune_after(qwen25.vision_config) == 7 and default_prune_after(qwen2.vision_config) == 7


def test_tower_graphs_replay_what_the_tower_computes(qwen: tuple) -> None:
    """``tower_graphs`` (the eager backend: the graph chain's host path, re-run on replay): the same tokens,
    positions, embeddings and DeepStack features as calling the tower's parts; one front graph per batch of grids,
    one tail per grids and budgets, and a second call captures nothing."""
    graphed, direct = _adapter(qwen, prune_after=0, tower_graphs="eager"), _adapter(qwen, prune_after=0)
    images = _images(3)
    with torch.no_grad():
        for budget in (0.3, 0.3, 0.5):
            got, expected = graphed.prepare(images, PROMPTS, budget), direct.prepare(images, PROMPTS, budget)
            for a, b in zip(got.reduced, expected.reduced, strict=True):
                assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens)
            assert torch.equal(got.inputs_embeds, expected.inputs_embeds)
            assert torch.equal(got.position_ids, expected.position_ids)
            for a, b in zip(got.deepstack or [], expected.deepstack or [], strict=True):
                assert torch.equal(a, b)
    assert sorted(key[0] for key in graphed._tower_chains) == ["head", "merged", "tail", "tail"]
    assert {chain.backend for chain in graphed._tower_chains.values()} == {"eager"}


def test_bad_tower_graphs_is_refused(qwen: tuple) -> None:
    with pytest.raises(arrcoc.InvalidInputError, match="tower_graphs must be 'auto', 'eager' or 'off'; got 'yes'"):
        _adapter(qwen, prune_after=0, tower_graphs="yes")
    with pytest.raises(arrcoc.InvalidInputError, match="tower_graphs .* needs prune_after"):
        _adapter(qwen, tower_graphs="auto")


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_tower_graphs_replay_the_direct_tower(compiled: bool) -> None:
    """The pruned tower's two parts captured as CUDA graphs (the blocks compiled or not) and replayed: the
    direct call's units and tokens, and a second call captures nothing."""
    import torch._dynamo as dynamo

    model, processor = _windowed_qwen25()
    model = model.cuda()
    dynamo.reset()
    pack_vision_tower(model, "padded", compile=compiled, dynamic=False if compiled else None)
    try:
        kwargs = dict(template=TEMPLATE, prune_after=0)
        graphed = ArrcocQwen(model, processor, tower_graphs="auto", **kwargs)
        direct = ArrcocQwen(model, processor, **kwargs)
        images, prompts = _images(2), PROMPTS[:2]
        with torch.no_grad():
            graphed.prepare(images, prompts, 0.25)  # captures both parts
            chains = dict(graphed._tower_chains)
            got = graphed.prepare(images, prompts, 0.25)
            expected = direct.prepare(images, prompts, 0.25)
    finally:
        unpack_vision_tower(model)
        dynamo.reset()
    assert graphed._tower_chains == chains and len(chains) == 3
    assert {c.backend for c in chains.values()} == {"cuda"} and all(c.graphs for c in chains.values())
    for a, b in zip(got.reduced, expected.reduced, strict=True):
        assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(got.inputs_embeds, expected.inputs_embeds)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_pruned_prepare_never_waits_for_the_vision_tower(family: str) -> None:
    """Pruning inside the packed tower: from the patch embedding on, nothing is read back or copied from the
    host (the kept lengths are the budgets, the windows' counted on the device), and the reducer's graph and
    direct call agree."""
    model, processor = build(family)
    model = model.cuda()
    pack_vision_tower(model, "padded")
    try:
        adapter = ArrcocQwen(model, processor, template=TEMPLATE, prune_after=0)
        direct = ArrcocQwen(model, processor, template=TEMPLATE, prune_after=0, reducer_graphs="off")
        images, prompts = _images(4), PROMPTS + PROMPTS[:1]
        with torch.no_grad():
            adapter.prepare(images, prompts, 0.25)  # the first call captures the reducer's graph (a capture syncs)
            embed = model.model.visual.patch_embed
            handle = embed.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
            try:
                prepared = adapter.prepare(images, prompts, 0.25)
            finally:
                handle.remove()
                torch.cuda.set_sync_debug_mode(0)
            expected = direct.prepare(images, prompts, 0.25)
    finally:
        unpack_vision_tower(model)
    assert adapter.captures == 1
    assert prepared.budgets == [round(gh * gw / 4) for gh, gw in prepared.grids]
    assert torch.equal(prepared.position_ids, expected.position_ids)
    torch.testing.assert_close(prepared.inputs_embeds, expected.inputs_embeds)


@pytest.mark.cuda
@pytest.mark.parametrize("prune_after", [None, 0])
def test_cuda_compiled_reducer_replays_as_one_graph_and_keeps_the_plain_choice(prune_after: int | None) -> None:
    """``compile_reducer``: the compiled reducer is captured once per key like the plain one, prepares without a
    host sync once the tower is queued, and keeps the same cells (float32)."""
    model, processor = build("qwen2_5_vl")
    model = model.cuda()
    pack_vision_tower(model, "padded")
    try:
        kwargs = dict(template=TEMPLATE, prune_after=prune_after)
        compiled = ArrcocQwen(model, processor, compile_reducer=True, **kwargs)
        plain = ArrcocQwen(model, processor, **kwargs)
        images, prompts = _images(4), PROMPTS + PROMPTS[:1]
        with torch.no_grad():
            compiled.prepare(images, prompts, 0.25)  # compiles and captures (both sync)
            # from the tower's queueing on: the whole tower after the tower; the pruned one from its patch embedding
            error = lambda *_: torch.cuda.set_sync_debug_mode("error")  # noqa: E731
            visual = model.model.visual
            if prune_after is None:
                handle = visual.register_forward_hook(error)
            else:
                handle = visual.patch_embed.register_forward_pre_hook(error)
            try:
                got = compiled.prepare(images, prompts, 0.25)
            finally:
                handle.remove()
                torch.cuda.set_sync_debug_mode(0)
            expected = plain.prepare(images, prompts, 0.25)
    finally:
        unpack_vision_tower(model)
    assert compiled.captures == plain.captures == 1
    assert got.budgets == expected.budgets
    assert torch.equal(got.position_ids, expected.position_ids)
    torch.testing.assert_close(got.inputs_embeds, expected.inputs_embeds)


def test_compile_reducer_must_be_a_bool(qwen: tuple) -> None:
    model, processor = qwen
    with pytest.raises(arrcoc.InvalidTypeError, match="compile_reducer must be True or False"):
        ArrcocQwen(model, processor, template=TEMPLATE, compile_reducer="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl-3", *FAMILIES[2:]])
def test_cuda_pruned_tail_varlen_and_padded_kernels_agree(family: str) -> None:
    """bf16: the tail on a random kept subset under FlashAttention varlen (windows the pruning left empty are
    sequences of length 0) and under the padded kernel give the same tokens within bf16 rounding."""
    model, processor, inputs, grids, budgets, units = _random_kept(family)
    model, units = model.cuda().to(torch.bfloat16), units.cuda()
    visual = model.model.visual
    results = {}
    with torch.no_grad():
        plan = tower_plan(visual, grids, budgets, torch.device("cuda"))
        for kernel in ("varlen", "padded"):
            pack_vision_tower(model, kernel)
            state = tower_head(visual, inputs["pixel_values"].cuda(), plan, 0)
            results[kernel] = tower_tail(visual, state, plan, units)[0]
        unpack_vision_tower(model)
    torch.testing.assert_close(results["varlen"].float(), results["padded"].float(), rtol=0.05, atol=0.05)


# --- scoring on a narrow view (score_width) -----------------------------------------------------------
def _wide(family: str, width: int) -> tuple[torch.nn.Module, object]:
    """``build(family)`` with a ``width``-wide language model (and merger output), as wide as a real model's."""
    model, processor = build(family)
    text = model.config.text_config.to_dict() | dict(hidden_size=width, num_attention_heads=width // 8, head_dim=8)
    out = "hidden_size" if family == "qwen2_vl" else "out_hidden_size"  # Qwen2-VL's merger width is hidden_size
    vision = model.config.vision_config.to_dict() | {out: width}
    ids = dict(image_token_id=IMAGE_ID, video_token_id=63, vision_start_token_id=62, vision_end_token_id=61)
    torch.manual_seed(0)
    return type(model)(type(model.config)(text_config=text, vision_config=vision, **ids)).eval(), processor


@pytest.fixture(scope="module")
def wide() -> tuple[torch.nn.Module, object]:
    return _wide("qwen2_5_vl", 128)


def test_score_projection_keeps_lengths_and_cosines_in_expectation() -> None:
    p = score_projection(1024, 256)
    assert p.shape == (1024, 256) and p.dtype == torch.float32 and torch.equal(p, score_projection(1024, 256))
    torch.testing.assert_close(p.T @ p, torch.eye(256) * 4, rtol=0, atol=1e-4)  # orthogonal, scaled by sqrt(4)
    x = torch.randn(2000, 1024, generator=torch.Generator().manual_seed(1))
    ratio = (x @ p).norm(dim=-1) / x.norm(dim=-1)
    assert abs(float(ratio.mean()) - 1) < 0.01
    cos = torch.nn.functional.cosine_similarity
    error = cos(x[:1000] @ p, x[1000:] @ p) - cos(x[:1000], x[1000:])
    assert float(error.std()) < 1.5 / 256**0.5  # about 1 / sqrt(d)


def test_score_width_default_and_refusals(qwen: tuple, wide: tuple) -> None:
    assert _adapter(qwen).score_width is None  # a language model 32 wide: nothing to narrow
    assert _adapter(wide).score_width is None  # 128 wide, under SCORE_WIDTH
    model, processor = _wide("qwen2_vl", 2 * SCORE_WIDTH)
    assert ArrcocQwen(model, processor, template=TEMPLATE).score_width == SCORE_WIDTH
    assert ArrcocQwen(model, processor, template=TEMPLATE, method="uniform").score_width is None
    assert _adapter(wide, score_width=128).score_width is None and _adapter(wide, score_width=None).score_width is None
    assert _adapter(wide, score_width=16)._score_projection.shape == (128, 16)
    for value in (0, 1.5, "wide", True):
        with pytest.raises(arrcoc.InvalidInputError, match="score_width must be"):
            _adapter(wide, score_width=value)
    with pytest.raises(arrcoc.InvalidInputError, match="arrcoc's reducers.*'uniform'"):
        _adapter(wide, "uniform", score_width=16)


def test_auto_width_narrows_only_images_asked_a_question() -> None:
    model, processor = _wide("qwen2_vl", 2 * SCORE_WIDTH)
    kwargs = dict(template=TEMPLATE, reducer_graphs="off")
    auto, narrow, full = (ArrcocQwen(model, processor, score_width=w, **kwargs) for w in ("auto", SCORE_WIDTH, None))
    images, blank = _images(3), [TEMPLATE.format(image="<|image_pad|>", question="")] * 3
    with torch.no_grad():
        for prompts, same in ((PROMPTS, narrow), (blank, full)):
            got, expected = auto.prepare(images, prompts, 0.3), same.prepare(images, prompts, 0.3)
            for a, b in zip(got.reduced, expected.reduced):
                assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("prune_after", [None, 0])
@pytest.mark.parametrize("method", ["arrcoc", "arrcoc-noquery"])
def test_narrow_scoring_keeps_full_width_tokens_at_the_chosen_cells(wide: tuple, method: str, prune_after) -> None:
    """The head scores at width 16; the language model reads exactly ``budget`` full-width tokens per image: the
    tower's own merged tokens at the chosen cells (pruned: the tail's tokens of those units), at their own
    positions."""
    adapter = _adapter(wide, method, score_width=16, prune_after=prune_after)
    images = _images(3)
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS, 0.3)
        full = _adapter(wide, method).prepare(images, PROMPTS)  # every cell: every cell's position
        features = adapter.merged_features(*adapter.image_inputs(images))
        logits = adapter.run(prepared).logits
    slots = prepared.input_ids == IMAGE_ID
    assert prepared.budgets == [round(gh * gw * 0.3) for gh, gw in prepared.grids]
    assert slots.sum(1).tolist() == prepared.budgets and torch.isfinite(logits).all()
    for i, (out, grid) in enumerate(zip(prepared.reduced, features)):
        cells = out.positions[0]
        assert out.tokens.shape == (1, prepared.budgets[i], 128) and (cells[:, 2:] == 1).all()
        if prune_after is None:
            assert torch.equal(out.tokens[0], grid[cells[:, 0], cells[:, 1]])
        every = full.position_ids[:, i, full.input_ids[i] == IMAGE_ID].view(3, *prepared.grids[i])
        assert torch.equal(prepared.position_ids[:, i, slots[i]], every[:, cells[:, 0], cells[:, 1]])
    if prune_after is not None:  # the tail of the chosen units: as the full-width head's tail for the same units
        visual = adapter.inner.visual
        pixel_values, grid_thw = adapter.image_inputs(images)
        plan = tower_plan(visual, prepared.grids, prepared.budgets, torch.device("cpu"))
        units = kept_units(prepared.reduced, prepared.grids)
        with torch.no_grad():
            tokens, _ = tower_tail(visual, tower_head(visual, pixel_values, plan, 0), plan, units)
        torch.testing.assert_close(torch.cat(prepared.image_tokens), tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [None, 1.0])
def test_narrow_scoring_at_the_full_budget_is_the_unmodified_model(wide: tuple, budget: float | None) -> None:
    adapter = _adapter(wide, score_width=16)
    images = _images(3)
    with torch.no_grad():
        prepared = adapter.prepare(images, PROMPTS, budget)
        got = adapter.run(prepared).logits
        expected = adapter.model(**_reference(adapter, prepared, images)).logits
    real = prepared.attention_mask.bool()
    assert torch.equal(got[real], expected[real])


def test_full_width_scoring_is_the_reducer_on_the_full_width_features(wide: tuple) -> None:
    """``score_width=None``: the head reads the tower's own features, so its tokens are its own output (no
    gather), as before there was a narrow view."""
    adapter = _adapter(wide, score_width=None)
    images = _images(2)
    with torch.no_grad():
        pixel_values, grid_thw = adapter.image_inputs(images)
        features = adapter.merged_features(pixel_values, grid_thw)
        rgb = adapter._rgb(pixel_values, adapter.merged_grids(grid_thw))
        embeds = torch.randn(2, 6, 128)
        (group,) = adapter._groups(adapter.merged_grids(grid_thw), [[1, 2], [3]], [0, 0], [5, 5])
        visual = adapter._visual(adapter._group_inputs(group, features, rgb, embeds), narrow=False)
        assert visual.features.shape[-1] == 128
        capacity, steps = adapter._capacity(group.bucket, [5, 5], [f.shape[:2] for f in features], asked=False)
        got = adapter._head(visual, group.budgets, capacity, steps)
        expected = adapter.reducer(visual, 5)
    assert torch.equal(got["positions"][:, :5], expected.positions)
    assert torch.equal(got["tokens"][:, :5], expected.tokens)


def _scenes(n: int, seed: int) -> list[torch.Tensor]:
    """``n`` images of 250-420 px a side: smooth colour fields with three flat boxes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h, w = (int(torch.randint(250, 420, (1,), generator=gen)) for _ in range(2))
        image = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 4, generator=gen), size=(h, w), mode="bilinear")[0]
        for _ in range(3):
            y, x = (
                int(torch.randint(0, h - h // 4, (1,), generator=gen)),
                int(torch.randint(0, w - w // 4, (1,), generator=gen)),
            )
            image[:, y : y + h // 4, x : x + w // 4] = torch.rand(3, 1, 1, generator=gen)
        out.append((image * 255).to(torch.uint8))
    return out


def test_narrow_scoring_chooses_mostly_the_full_width_cells() -> None:
    """Chosen cells at ``score_width=256`` against the full-width head's, a 1,024-wide random model, 8 images with a
    question at 25%. Measured here: mean overlap 0.89 (images 0.71 to 1.0); the bounds sit under that. Random
    weights only: how close a trained model's choices stay is for a real checkpoint to show."""
    model, processor = _wide("qwen2_5_vl", 1024)
    images, prompts = _scenes(8, 0), [PROMPTS[i % 3] for i in range(8)]
    kwargs = dict(template=TEMPLATE, reducer_graphs="off")
    with torch.no_grad():
        full = ArrcocQwen(model, processor, score_width=None, **kwargs).prepare(images, prompts, 0.25)
        narrow = ArrcocQwen(model, processor, score_width=256, **kwargs).prepare(images, prompts, 0.25)
    overlap = []
    for a, b in zip(full.reduced, narrow.reduced):
        cells_a = {tuple(c) for c in a.positions[0, :, :2].tolist()}
        cells_b = {tuple(c) for c in b.positions[0, :, :2].tolist()}
        overlap.append(len(cells_a & cells_b) / len(cells_a))
    assert sum(overlap) / len(overlap) >= 0.85 and min(overlap) >= 0.6


# --- a compiled tower's shapes on the pruned path -----------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl-3", *FAMILIES[2:]])
def test_a_padded_tail_gives_the_unpadded_tokens(family: str) -> None:
    """The tail's rows padded to a multiple of 64 patches (the padding a sequence of its own, last, also in the
    windowed blocks): the kept units' tokens (and DeepStack features) are the unpadded tail's."""
    model, processor, inputs, grids, budgets, units = _random_kept(family)
    visual = model.model.visual
    pack_vision_tower(model, "padded")
    try:
        with torch.no_grad():
            plain = tower_plan(visual, grids, budgets, torch.device("cpu"))
            padded = tower_plan(visual, grids, budgets, torch.device("cpu"), tail_multiple=64)
            state = tower_head(visual, inputs["pixel_values"], plain, 0)
            expected = tower_tail(visual, state, plain, units)
            got = tower_tail(visual, state, padded, units)
    finally:
        unpack_vision_tower(model)
    rows = sum(budgets) * 4
    assert plain.kept_rows == rows and padded.kept_rows == -(-rows // 64) * 64 > rows
    assert padded.kept_cu_seqlens.tolist() == [*plain.kept_cu_seqlens.tolist(), padded.kept_rows]
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1] or [], expected[1] or [], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_padded_tail_needs_the_packed_tower(qwen: tuple) -> None:
    visual = qwen[0].model.visual
    with pytest.raises(arrcoc.InvalidInputError, match="tail_multiple"):
        tower_plan(visual, [(2, 2)], [1], torch.device("cpu"), tail_multiple=0)
    plan = tower_plan(visual, [(2, 2)], [1], torch.device("cpu"), tail_multiple=64)
    assert plan.tail_multiple == 64 and tower_plan(visual, [(2, 2)], [1], torch.device("cpu")).tail_multiple == 1
    with pytest.raises(arrcoc.InvalidInputError, match="packed tower"):
        tower_tail(visual, types.SimpleNamespace(), plan, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("pad", [True, False])
def test_compiled_blocks_compile_once_for_the_budgets_of_a_bucket(pad: bool, monkeypatch) -> None:
    """Static compiles (``dynamic=False``) of the packed blocks, pruning after block 0: a second budget whose kept
    patches pad to the same multiple of 64 reuses every compiled graph (the longest sequence, a Python int that
    changes with the budget, never reaches the compiled blocks), and its tokens are the uncompiled tower's. The
    control (no padding) compiles the tail again."""
    import torch._dynamo as dynamo

    from arrcoc.integrations import vision_tower

    if not pad:
        monkeypatch.setattr(vision_tower, "TAIL_MULTIPLE", 1)
    model, processor = _windowed_qwen25()
    graphs = []

    def backend(gm: torch.fx.GraphModule, _: list) -> object:
        graphs.append(gm)
        return gm.forward

    adapter = ArrcocQwen(model, processor, template=TEMPLATE, reducer_graphs="off", prune_after=0)
    images = _images(2)  # merged grids 4x5 and 3x2: 5 and 2 units at 0.25, 6 and 2 at 0.3 (28 and 32 patches)
    dynamo.reset()
    pack_vision_tower(model, "padded")
    try:
        with torch.no_grad():
            expected = adapter.prepare(images, PROMPTS[:2], 0.3)
            for block in model.model.visual.blocks:
                block.compile(backend=backend, dynamic=False)
            adapter.prepare(images, PROMPTS[:2], 0.25)  # compiles the head's and the tail's shapes
            first = len(graphs)
            got = adapter.prepare(images, PROMPTS[:2], 0.3)
    finally:
        unpack_vision_tower(model)
        dynamo.reset()
    assert first > 0 and (len(graphs) == first) == pad
    assert got.budgets == expected.budgets == [6, 2]
    torch.testing.assert_close(got.inputs_embeds, expected.inputs_embeds, rtol=1e-5, atol=1e-5)


# --- the vision tower's attention in one call ---------------------------------------------------------
def _vision(model: torch.nn.Module, images: list[torch.Tensor], processor: object) -> list[torch.Tensor]:
    inputs = processor.image_processor(images=images, return_tensors="pt")
    device = next(model.parameters()).device
    out = model.model.get_image_features(inputs["pixel_values"].to(device), inputs["image_grid_thw"].to(device))
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)


def test_packed_vision_attention_equals_the_models_own(qwen: tuple) -> None:
    """Several images (and, in Qwen2.5-VL, several windows each): one padded call per layer keeps every
    sequence apart and the patch embedding as one matrix product is the convolution, so the merged tokens and the
    logits match the model's own tower; unpacking is exact."""
    model, processor = qwen
    images = _images(3)
    adapter = _adapter(qwen)
    with torch.no_grad():
        expected = _vision(model, images, processor)
        prepared = adapter.prepare(images, PROMPTS)
        logits = adapter.run(prepared).logits
        try:
            assert pack_vision_tower(model, "padded") == len(model.model.visual.blocks)
            got = _vision(model, images, processor)
            packed_logits = adapter.run(adapter.prepare(images, PROMPTS)).logits
        finally:
            unpack_vision_tower(model)
        again = _vision(model, images, processor)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    real = prepared.attention_mask.bool()
    torch.testing.assert_close(packed_logits[real], logits[real], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(again, expected))


def test_packed_attention_that_mixes_sequences_would_be_caught(qwen: tuple) -> None:
    """A defect the test above must catch: every token attending across the whole packed batch."""
    model, processor = qwen
    images = _images(2)
    with torch.no_grad():
        expected = _vision(model, images, processor)
        pack_vision_tower(model, "padded")
        try:
            for block in model.model.visual.blocks:  # one sequence over everything
                forward = block.attn.forward
                block.attn.forward = lambda h, cu_seqlens, _f=forward, **kw: _f(h, cu_seqlens[[0, -1]], **kw)
            got = _vision(model, images, processor)
        finally:
            unpack_vision_tower(model)
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, expected))


def test_the_patch_embedding_can_stay_a_convolution(qwen: tuple) -> None:
    model, _ = qwen
    embed = model.model.visual.patch_embed
    try:
        pack_vision_tower(model, patch_embed=False)
        assert "forward" not in vars(embed)
        pack_vision_tower(model)
        assert "forward" in vars(embed)
    finally:
        unpack_vision_tower(model)
    assert "forward" not in vars(embed)


def test_gated_mlps_are_packed_only_where_asked(qwen: tuple) -> None:
    """Qwen2.5-VL's gated MLPs (width 40, padded to 64) are replaced by the packed product, other towers' MLPs
    stay; mlp=False and unpacking put the module's own forward back."""
    model, _ = qwen
    mlps = [block.mlp for block in model.model.visual.blocks]
    gated = all(hasattr(m, "gate_proj") for m in mlps)
    try:
        pack_vision_tower(model)
        assert all(("forward" in vars(m)) == gated for m in mlps)
        pack_vision_tower(model, mlp=False)
        assert not any("forward" in vars(m) for m in mlps)
        pack_vision_tower(model)
    finally:
        unpack_vision_tower(model)
    assert not any("forward" in vars(m) for m in mlps)


def test_pack_vision_tower_refuses_what_it_cannot_pack(qwen: tuple) -> None:
    model, _ = qwen
    with pytest.raises(arrcoc.InvalidInputError, match="kernel must be one of"):
        pack_vision_tower(model, "flash")
    with pytest.raises(arrcoc.InvalidTypeError, match="Qwen2-VL"):
        pack_vision_tower(torch.nn.Linear(2, 2))
    if not torch.cuda.is_available():
        pack_vision_tower(model, "varlen")
        try:
            with pytest.raises(arrcoc.InvalidInputError, match="CUDA and float16/bfloat16"):
                _vision(model, _images(1), qwen[1])
        finally:
            unpack_vision_tower(model)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_varlen_vision_attention_matches_the_models_own(family: str) -> None:
    """bf16 on the GPU: the FlashAttention varlen kernel and the padded kernel agree with the model's own loop
    within bf16 rounding."""
    model, processor = build(family)
    model = model.cuda().to(torch.bfloat16)
    images = _images(3)
    with torch.no_grad():
        expected = _vision(model, images, processor)
        results = {}
        for kernel in ("varlen", "padded"):
            pack_vision_tower(model, kernel)
            results[kernel] = _vision(model, images, processor)
        unpack_vision_tower(model)
    for kernel, got in results.items():
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05, msg=kernel)


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_compiled_vision_blocks_match_the_models_own(family: str) -> None:
    """compile=True (Inductor, Triton) on the packed tower: the model's own merged tokens within bf16 rounding,
    for two image sets of other sizes (a recompile), and unpacking drops the compiled blocks."""
    model, processor = build(family)
    model = model.cuda().to(torch.bfloat16)
    with torch.no_grad():
        for images in (_images(3), _images(2)):
            expected = _vision(model, images, processor)
            pack_vision_tower(model, compile=True)
            try:
                got = _vision(model, images, processor)
            finally:
                unpack_vision_tower(model)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    assert not any("_compiled_call_impl" in vars(block) for block in model.model.visual.blocks)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen2_5_vl-3", *FAMILIES[2:]])
def test_cuda_compiled_pruned_tail_compiles_once_per_bucket(family: str) -> None:
    """compile=True, dynamic=False (Inductor, Triton), bf16, pruning after block 0 with a narrow head: a second
    budget in the same 64-patch bucket compiles nothing more, and the tokens are the model's own (unpacked,
    uncompiled) tower's on the units chosen, within bf16 rounding."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    model, processor = _windowed_qwen25() if family == "qwen2_5_vl-3" else build(family)
    model = model.cuda().to(torch.bfloat16)
    adapter = ArrcocQwen(model, processor, template=TEMPLATE, prune_after=0, score_width=8)
    images = _images(2)
    dynamo.reset()
    pack_vision_tower(model, compile=True, dynamic=False)
    try:
        with torch.no_grad():
            adapter.prepare(images, PROMPTS[:2], 0.25)
            before = counters["stats"]["unique_graphs"]
            got = adapter.prepare(images, PROMPTS[:2], 0.4)  # other counts, the same bucket: 28 or 24, 40 or 32
            after = counters["stats"]["unique_graphs"]
    finally:
        unpack_vision_tower(model)
        dynamo.reset()
    assert before > 0 and after == before
    visual = model.model.visual
    units = kept_units(got.reduced, got.grids)
    pixel_values, _ = adapter.image_inputs(images)
    with torch.no_grad():
        plan = tower_plan(visual, got.grids, got.budgets, torch.device("cuda"))
        state = tower_head(visual, pixel_values.cuda(), plan, 0)
        expected, _ = tower_tail(visual, state, plan, units)
    assert plan.tail_multiple == 1 and got.budgets == [max(1, round(0.4 * gh * gw)) for gh, gw in got.grids]
    torch.testing.assert_close(torch.cat(got.image_tokens).float(), expected.float(), rtol=0.05, atol=0.05)


# --- errors and the facade ----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 10_000, 1.5, 0.0, True, "8"])
def test_bad_budget(qwen: tuple, budget: object) -> None:
    with pytest.raises(arrcoc.BudgetError):
        _adapter(qwen).prepare(_images(2), PROMPTS[:2], budget)


def test_reducers_it_cannot_feed_are_refused(qwen: tuple) -> None:
    for method in ("visionzip", "fastv"):
        with pytest.raises(arrcoc.InvalidInputError, match="does not provide"):
            _adapter(qwen, method)


def test_wrap_picks_the_adapter(qwen: tuple) -> None:
    model, processor = qwen
    adapter = hf.wrap(model, processor, method="uniform", budget=0.5, template=TEMPLATE)
    assert isinstance(adapter, ArrcocQwen) and adapter.method == "uniform"
    prepared = adapter.prepare(_images(1), PROMPTS[0])
    assert prepared.budgets == [round(prepared.grids[0][0] * prepared.grids[0][1] / 2)]
    assert hf.ArrcocLlava is ArrcocLlava
    with pytest.raises(arrcoc.InvalidTypeError, match="no arrcoc adapter"):
        hf.wrap(torch.nn.Linear(2, 2), processor)


def test_wrap_llava_takes_a_default_budget() -> None:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=4)
    ).eval()
    adapter = hf.wrap(model, word_tokenizer(WORDS), budget=0.25)
    assert isinstance(adapter, ArrcocLlava)
    prepared = adapter.prepare(torch.zeros(1, 3, 32, 32), "which side ?")
    assert prepared.image_tokens.shape[1] == 4


# --- the benchmark ------------------------------------------------------------------------------------
def test_bench_runs_tiny_on_cpu(tmp_path) -> None:
    from arrcoc.tools import bench_qwen

    assert bench_qwen.main(["--tiny", "--out", str(tmp_path), "--repeats", "1", "--warmups", "0"]) == 0
    report = json.loads(next(tmp_path.glob("generation-qwen-*.json")).read_text())
    rows = {(r["share"], r["batch"]): r for r in report["rows"]}
    assert rows.keys() == {(s, b) for s in (1.0, 0.25, 0.11) for b in (1, 2)} and not report["errors"]
    assert [rows[s, 1]["image_tokens"] for s in (1.0, 0.25, 0.11)] == [99, 25, 11]  # 9 x 11 merged tokens
    assert report["captures"]["captures_per_budget"] < report["captures_unbucketed"] <= 100
    assert next(tmp_path.glob("generation-qwen-*.md")).read_text().count("|") > 20


def test_paired_timer_differences_each_call_pair(monkeypatch) -> None:
    """arrcoc's own time is prepare minus the tower call pair by call pair: a drift shared by both calls cancels,
    where the difference of two separate medians would keep it."""
    from arrcoc.tools import bench_qwen, timing

    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) / 1e3)  # each read 1 ms after the last
    calls: list[str] = []
    first, second = lambda: calls.append("tower"), lambda: calls.append("prepare")
    vision, own = bench_qwen._Timer(torch.device("cpu"), warmups=1, repeats=3).pair(first, second)
    assert calls == ["tower", "prepare"] * 4  # interleaved, the warm-up pair first
    assert (vision, own) == (1.0, 0.0)  # both calls read 1 ms on the shared clock: nothing added

    def drifting(ms: list[float]):
        times = iter(ms)
        return lambda *args: [[next(times) for _ in range(3)] for _ in range(2)]

    # the tower's calls take 10, 20, 30 ms and prepare's 11, 25, 31: 1 ms added to two pairs of three (the
    # difference of the medians would read 5)
    monkeypatch.setattr(bench_qwen, "paired_wall_times_ms", drifting([10, 20, 30, 11, 25, 31]))
    assert bench_qwen._Timer(torch.device("cpu"), 0, 3).pair(first, second) == (20, 1)


def test_bench_times_the_pruned_path_beside_the_post_tower_one(tmp_path) -> None:
    from arrcoc.tools import bench_qwen

    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--repeats", "1", "--warmups", "0"]
    assert bench_qwen.main([*argv, "--batches", "1", "--prune-after", "0", "--new-tokens", "1", "--tower-graphs"]) == 0
    report = json.loads(next(tmp_path.glob("generation-qwen-*.json")).read_text())
    rows = {(r["share"], r["path"], r["tower_graphs"]): r for r in report["rows"]}
    assert {r["batch"] for r in report["rows"]} == {1} and not report["errors"]
    paths = [("post-tower", False), ("pruned", False), ("pruned", True)]
    assert rows.keys() == {(1.0, "every token", False)} | {(s, *p) for s in (0.25, 0.11) for p in paths}
    for graphed in (False, True):
        assert rows[0.11, "pruned", graphed]["prune_after"] == 0 and rows[0.11, "pruned", graphed]["image_tokens"] == 11
    text = next(tmp_path.glob("generation-qwen-*.md")).read_text()
    assert "| pruned after block 0 |" in text and "| pruned after block 0, tower graphed |" in text


def test_bench_decodes_every_row_graphed(tmp_path) -> None:
    """``--decode graphed``: the 100% row and the reduced ones through the static-cache decoder (eager on the CPU),
    the report named apart from transformers' generate's."""
    from arrcoc.tools import bench_qwen

    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--repeats", "1", "--warmups", "0"]
    assert bench_qwen.main([*argv, "--batches", "1", "--new-tokens", "2", "--decode", "graphed"]) == 0
    report = json.loads((tmp_path / "generation-qwen-cpu-graphed.json").read_text())
    assert report["decode"] == "graphed" and not report["errors"]
    assert [(r["share"], r["decode"]) for r in report["rows"]] == [(s, "graphed") for s in (1.0, 0.25, 0.11)]
    text = (tmp_path / "generation-qwen-cpu-graphed.md").read_text()
    assert "through transformers' generate (same vision tower) at batch 1" in text


@pytest.mark.parametrize("name", ["generation-qwen-nvidia-h200.json", "generation-qwen-nvidia-h200-batch1.json"])
def test_report_tables_have_one_cell_per_heading(name: str) -> None:
    """The reports of the lent-GPU runs (batch 8; batch 1 alone, where the vision-steps table has no second
    batch column) render every row with as many cells as its table's heading, and no heading twice."""
    from arrcoc.tools.bench_qwen import _markdown

    report = json.loads((Path(__file__).parents[1] / "bench" / "results" / name).read_text())
    heading: list[str] | None = None
    tables = 0
    for line in _markdown(report).splitlines():
        if not line.startswith("|"):
            heading = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if heading is None:
            heading, tables = cells, tables + 1
            assert len(set(cells)) == len(cells), line
        else:
            assert len(cells) == len(heading), line
    assert tables >= 2
