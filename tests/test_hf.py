"""The Hugging Face adapter and the graphed decoder on tiny, randomly initialised LLaVA models built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arrcoc

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from arrcoc.integrations.decode import GraphedDecoder  # noqa: E402
from arrcoc.integrations.hf import ArrcocLlava, main, raster_order, word_tokenizer  # noqa: E402
from arrcoc.reducers import ReducedTokens, list_reducers  # noqa: E402

WORDS = "USER ASSISTANT : what colour is the box left of red green blue a shape ? which side".split()
IMAGE_ID = 4
PROMPTS = ["what colour is the box ?", "which side ?", "what shape is left of the red box ?"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


def _text_config() -> transformers.LlamaConfig:
    # GQA (4 heads, 2 key/value heads) so the decoder's grouped attention is exercised.
    return transformers.LlamaConfig(
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
    )


def clip_llava(strategy: str = "default", layer: int | list[int] = -2) -> tuple[torch.nn.Module, object]:
    """LLaVA-1.5-shaped: a 3-layer CLIP tower on 32x32 pixels at patch 8 (4x4 grid), a 3-layer Llama."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=_text_config(),
        image_token_id=IMAGE_ID,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=_tokenizer(),
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return model, processor


def timm_llava() -> torch.nn.Module:
    """The issue-5 shape: a timm ViT (2 blocks, patch 8, 32x32) behind TimmWrapperConfig, a 3-layer Llama."""
    vision = transformers.TimmWrapperConfig(
        architecture="vit_tiny_patch16_224",
        hidden_size=192,
        do_pooling=False,
        model_args={"img_size": 32, "patch_size": 8, "depth": 2},
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=_text_config(),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _images(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """The models here are tiny: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip() -> tuple[torch.nn.Module, object]:
    return clip_llava()


@pytest.fixture(scope="module")
def timm() -> torch.nn.Module:
    return timm_llava()


# --- exactness at the full budget --------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "layer"), [("default", -2), ("full", -1), ("default", [-3, -1])])
def test_full_budget_logits_equal_the_unmodified_model(strategy: str, layer: int | list[int]) -> None:
    model, processor = clip_llava(strategy, layer)
    adapter = ArrcocLlava(model, processor)
    assert adapter.full_tokens == 16 + (strategy == "full")
    prompts = [f"USER: <image>\n{p} ASSISTANT:" for p in PROMPTS]
    images = _images(3)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        expected = model(**inputs).logits
        got = adapter(images, prompts, budget=adapter.full_tokens).logits
    prepared = adapter.prepare(images, prompts, adapter.full_tokens)
    assert torch.equal(prepared.input_ids, inputs["input_ids"])  # same tokens, same order
    assert torch.equal(got, expected)


def test_timm_tower_full_budget_equals_its_block_outputs(timm: torch.nn.Module) -> None:
    """transformers' LLaVA cannot read a TimmWrapper's NCHW hidden states; the adapter reads the selected block's
    patch tokens in raster order, which is what timm's own forward_intermediates gives."""
    adapter = ArrcocLlava(timm, _tokenizer())
    assert adapter.grid == (4, 4) and adapter.full_tokens == 16
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prepared = adapter.prepare(pixels, PROMPTS[:2], 16)
        blocks = timm.model.vision_tower.timm_model.forward_intermediates(
            pixels, indices=[1], output_fmt="NLC", intermediates_only=True
        )[0]  # (B, 16, 192)
        expected = timm.model.multi_modal_projector(blocks)
        logits = adapter(pixels, PROMPTS[:2], budget=16).logits
        reference = timm(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask).logits
    assert torch.equal(prepared.image_tokens, expected)
    slots = prepared.input_ids == IMAGE_ID
    assert torch.equal(prepared.inputs_embeds[slots], expected.flatten(0, 1))
    assert torch.equal(logits, reference)


# --- budgets, methods, batching, padding -------------------------------------------------------------
@pytest.mark.parametrize("method", list_reducers())
def test_the_model_reads_exactly_budget_image_tokens(clip: tuple, method: str) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor, method=method)
    with torch.no_grad():
        prepared = adapter.prepare(_images(2), PROMPTS[:2], 5)
        logits = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask).logits
    slots = prepared.input_ids == IMAGE_ID
    assert slots.sum(1).tolist() == [5, 5]
    assert prepared.image_tokens.shape == (2, 5, 32)
    assert torch.equal(prepared.inputs_embeds[slots], prepared.image_tokens.flatten(0, 1))
    # Raster order of the regions the tokens stand for.
    key = prepared.reduced.positions[..., 0] * 4 + prepared.reduced.positions[..., 1]
    assert (key.diff(dim=1) >= 0).all()
    assert logits.shape[:2] == prepared.input_ids.shape and torch.isfinite(logits).all()
    # The graph path (its eager backend here: same static buffers, same host contract) gives the same tokens.
    chained = ArrcocLlava(model, processor, method=method, reducer_graphs="eager")
    for _ in range(2):  # capture, then replay
        with torch.no_grad():
            again = chained.prepare(_images(2), PROMPTS[:2], 5)
        assert torch.equal(again.inputs_embeds, prepared.inputs_embeds)
    assert len(chained._chains) == 1
    with_grad = chained.prepare(_images(2), PROMPTS[:2], 5)  # autograd on: the reducer is called directly
    assert with_grad.inputs_embeds.requires_grad and len(chained._chains) == 1


def test_batch_equals_single_images_greedy(clip: tuple) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    images = _images(3)
    batch = adapter.generate(images, PROMPTS, budget=6, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        logits = adapter(images, PROMPTS, budget=6).logits[:, -1]
    for i in range(3):
        single = adapter.generate(images[i : i + 1], PROMPTS[i : i + 1], budget=6, max_new_tokens=8, do_sample=False)
        assert torch.equal(batch[i], single[0])
        with torch.no_grad():
            alone = adapter(images[i : i + 1], PROMPTS[i : i + 1], budget=6).logits[0, -1]
        torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_attention(clip: tuple) -> None:
    """Left padding is masked: changing what sits in the padded positions changes no real position's logits."""
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    decoder = GraphedDecoder.from_llava(model, graphs=False)
    prepared = adapter.prepare(_images(3), PROMPTS, 4)
    pad = prepared.attention_mask == 0
    assert pad.any()
    noisy = (
        prepared.inputs_embeds.masked_fill(pad[..., None], 0)
        + 5 * torch.randn_like(prepared.inputs_embeds) * pad[..., None]
    )
    with torch.no_grad():
        clean = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask).logits
        dirty = model(inputs_embeds=noisy, attention_mask=prepared.attention_mask).logits
        ours = decoder.generate(prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=6)
        ours_noisy = decoder.generate(noisy, prepared.attention_mask, max_new_tokens=6)
    real = ~pad
    torch.testing.assert_close(clean[real], dirty[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours, ours_noisy)


def test_sampling_through_model_generate(clip: tuple) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    runs = []
    for seed in (0, 0, None):  # seeded twice (equal), then greedy
        if seed is not None:
            torch.manual_seed(seed)
        runs.append(
            adapter.generate(
                _images(1),
                PROMPTS[:1],
                budget=4,
                max_new_tokens=4,
                do_sample=seed is not None,
                temperature=5.0 if seed is not None else None,
            )
        )
    assert runs[0].shape == (1, 4) and torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # at temperature 5 over 64 tokens, 4 draws all equal to argmax: ~never


def test_attention_maps_equal_the_models_own_attentions() -> None:
    """VisionZip's [CLS] attention and FastV's text-to-image attention, recomputed by the adapter, equal the
    attention weights the model itself returns (eager attention, output_attentions)."""
    model, processor = clip_llava()
    model.set_attn_implementation("eager")
    adapter = ArrcocLlava(model, processor, method="visionzip")
    pixels = adapter.pixel_values(_images(2))
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        _, _, cls_attention = adapter.features(pixels)
        # hidden_states[-2] is the output of the second-to-last layer: its attention is attentions[-2].
        torch.testing.assert_close(cls_attention, out.attentions[-2][:, :, 0, 1:].mean(1).view(2, 4, 4))
        fastv = ArrcocLlava(model, processor, method="fastv")
        got = fastv._text_attention(PROMPTS[:2], *fastv.features(pixels)[:2])  # (B, 4, 4)
        prepared = fastv.prepare(pixels, PROMPTS[:2], 16)
        lm = model.model.language_model
        weights = (
            lm(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, output_attentions=True)
            .attentions[2]
            .mean(1)
        )  # (B, T, T)
    slots = prepared.input_ids == IMAGE_ID
    for b in range(2):
        after = torch.arange(slots.shape[1]) > slots[b].nonzero().max()
        expected = weights[b][after & prepared.attention_mask[b].bool()][:, slots[b]].mean(0)
        torch.testing.assert_close(got[b].flatten(), expected)


# --- the prompt's query ------------------------------------------------------------------------------
def test_query_is_the_question_alone(clip: tuple) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    prepared = adapter.prepare(_images(2), ["which side ?", "USER: <image>\nwhat shape ? ASSISTANT:"], 3)
    tok = adapter.tokenizer
    for row, question in zip(range(2), ["which side ?", "what shape ?"]):
        words = tok.convert_ids_to_tokens(prepared.input_ids[row][prepared.query_mask[row]].tolist())
        assert words == tok.tokenize(question)  # no padding, BOS, image slots, USER:, ASSISTANT:


def test_the_question_moves_tokens_to_what_it_names() -> None:
    """A question word whose embedding is the projection of one patch pulls tokens to that patch's region."""
    model, processor = clip_llava()
    adapter = ArrcocLlava(model, processor, method="arrcoc-participatory", config=arrcoc.PipelineConfig(region_size=2))
    images = _images(1)
    plain = adapter.prepare(images, ["which side ?"], 8).reduced.allocation[0]  # (2, 2) regions of 2x2 patches
    r = int(plain.flatten().argmin())
    row, col = divmod(r, 2)
    with torch.no_grad():
        grid, _, _ = adapter.features(adapter.pixel_values(images))
        target = adapter.projector(grid[0, 2 * row, 2 * col])  # a patch of the least-served region
        model.get_input_embeddings().weight[adapter.tokenizer.convert_tokens_to_ids("red")] = target
    named = adapter.prepare(images, ["red"], 8).reduced.allocation[0]
    assert named[row, col] > plain[row, col] and named[row, col] == named.max()


# --- graphed decoder (eager on CPU: the same step the graph captures) ---------------------------------
def test_decoder_equals_transformers_greedy_generate(clip: tuple) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    prepared = adapter.prepare(_images(3), PROMPTS, 6)
    decoder = GraphedDecoder.from_llava(model)
    assert not decoder.graphs  # CPU: eager
    with torch.no_grad():
        expected = model.generate(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            max_new_tokens=32,
            do_sample=False,
        )
    got = decoder.generate(prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=32)
    assert torch.equal(got, expected)
    via_adapter = adapter.generate(_images(3), PROMPTS, budget=6, decode="graphed", max_new_tokens=32)
    assert torch.equal(via_adapter, expected)


def test_decoder_eos_and_sampling(clip: tuple) -> None:
    model, processor = clip
    prepared = ArrcocLlava(model, processor).prepare(_images(2), PROMPTS[:2], 4)
    decoder = GraphedDecoder.from_llava(model)
    greedy = decoder.generate(prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=6)
    eos = int(greedy[0, 2])
    cut = decoder.generate(
        prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0
    )
    first = int((greedy[0] == eos).nonzero()[0])
    assert torch.equal(cut[0, : first + 1], greedy[0, : first + 1]) and (cut[0, first + 1 :] == 0).all()
    g = torch.Generator().manual_seed(1)
    sampled = decoder.generate(
        prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=6, do_sample=True, temperature=5.0, generator=g
    )
    assert sampled.shape == (2, 6) and sampled.min() >= 0 and sampled.max() < 64 and not torch.equal(sampled, greedy)


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 17, 2.5, True])
def test_bad_budget(clip: tuple, budget: object) -> None:
    adapter = ArrcocLlava(*clip)
    with pytest.raises(arrcoc.BudgetError, match=r"budget must be .* in \[1, 16\]"):
        adapter.prepare(_images(1), PROMPTS[:1], budget)  # type: ignore[arg-type]


def test_clear_errors(clip: tuple, timm: torch.nn.Module) -> None:
    model, processor = clip
    adapter = ArrcocLlava(model, processor)
    with pytest.raises(arrcoc.InvalidInputError, match="images and prompts must pair up.*2 images and 1 prompts"):
        adapter.prepare(_images(2), PROMPTS[:1], 4)
    with pytest.raises(arrcoc.InvalidInputError, match="exactly one image placeholder.*got 2"):
        adapter.prepare(_images(1), ["<image> <image> which side ?"], 4)
    with pytest.raises(arrcoc.InvalidInputError, match="decode must be 'hf' or 'graphed'; got 'x'"):
        adapter.generate(_images(1), PROMPTS[:1], 4, decode="x")
    with pytest.raises(arrcoc.InvalidInputError, match="unknown reducer 'nope'"):
        ArrcocLlava(model, processor, method="nope")
    with pytest.raises(arrcoc.InvalidTypeError, match="pixel_values tensor"):
        ArrcocLlava(timm, _tokenizer()).prepare(_images(1), PROMPTS[:1], 4)
    with pytest.raises(arrcoc.InvalidTypeError, match="LlavaForConditionalGeneration"):
        ArrcocLlava(torch.nn.Linear(2, 2), processor)
    with pytest.raises(arrcoc.InvalidInputError, match="max_new_tokens must be >= 1; got 0"):
        GraphedDecoder.from_llava(model).generate(torch.zeros(1, 3, 32), torch.ones(1, 3), max_new_tokens=0)


# --- the command -------------------------------------------------------------------------------------
def test_generate_command(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    model, processor = clip_llava()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.fromarray(_images(1)[0]).save(tmp_path / "scene.png")
    argv = [
        str(tmp_path / "scene.png"),
        "--prompt",
        "which side ?",
        "--model",
        str(tmp_path / "model"),
        "--budget",
        "4",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    answer = capsys.readouterr().out.strip().split()
    assert 1 <= len(answer) <= 5 and all(w in WORDS + [":", "?"] for w in answer)
    assert main([str(tmp_path / "missing.png")] + argv[1:]) == 2
    assert "cannot read image" in capsys.readouterr().err


# --- GPU --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_decode_equals_eager_decode_for_64_tokens(batch: int) -> None:
    model, processor = clip_llava()
    model = model.cuda()
    adapter = ArrcocLlava(model, processor)
    prepared = adapter.prepare(_images(batch), PROMPTS[:batch], 6)
    with torch.no_grad():
        eager = model.generate(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            max_new_tokens=64,
            do_sample=False,
        )
    decoder = GraphedDecoder.from_llava(model)
    assert decoder.graphs
    graphed = decoder.generate(prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=64)
    assert decoder.captures == 2 and all(s.failed is None for s in decoder._states.values())  # prefill + step
    assert torch.equal(graphed, eager)
    # A replay (no new capture) gives the same tokens, without a host sync in prefill or decode.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = decoder.generate(prepared.inputs_embeds, prepared.attention_mask, max_new_tokens=64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert decoder.captures == 2 and torch.equal(again, eager)


def test_generation_benchmark_smoke(tmp_path) -> None:
    """The GPU benchmark's every section runs on the tiny preset and writes its JSON and markdown report."""
    import json

    from arrcoc.tools.bench_generation import main as bench_main

    argv = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--out",
        str(tmp_path),
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--budgets",
        "8",
        "--batches",
        "1",
        "--decode-tokens",
        "2",
        "--new-tokens",
        "2",
    ]
    assert bench_main(argv) == 0
    report = json.loads((tmp_path / "generation-cpu.json").read_text())
    assert report["errors"] == {} and set(report["sections"]) == {"ttft", "decode", "end_to_end"}
    assert [r["tokens"] for r in report["sections"]["ttft"]["rows"]] == [64, 64, 8, 8]
    assert len(report["sections"]["decode"]["rows"]) == 3 and len(report["sections"]["end_to_end"]["rows"]) == 3
    assert "## Targets" in (tmp_path / "generation-cpu.md").read_text()


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["arrcoc", "visionzip", "fastv"])
def test_reducer_cuda_graph_equals_direct_call(method: str) -> None:
    model, processor = clip_llava()
    model = model.cuda()
    graphed = ArrcocLlava(model, processor, method=method)
    direct = ArrcocLlava(model, processor, method=method, reducer_graphs="off")
    with torch.no_grad():
        expected = direct.prepare(_images(3), PROMPTS, 6)
        for _ in range(2):  # capture, then replay
            got = graphed.prepare(_images(3), PROMPTS, 6)
            torch.testing.assert_close(got.inputs_embeds, expected.inputs_embeds)
            assert torch.equal(got.reduced.positions, expected.reduced.positions)
    assert [chain is not False for chain in graphed._chains.values()] == [True]


def test_raster_order_keeps_the_slots_past_each_budget_last() -> None:
    """Tokens packed kept-first: each row's first ``kept`` tokens in raster order, the slots past them (zero boxes,
    which would otherwise sort first) after them in their own order."""
    positions = torch.tensor([[[1, 2], [0, 3], [0, 0], [0, 0]], [[2, 0], [1, 1], [0, 1], [0, 0]]])
    boxes = torch.cat((positions, torch.ones_like(positions)), -1)  # (2, 4, 4)
    tokens = torch.arange(8.0).view(2, 4, 1)
    reduced = ReducedTokens(tokens, boxes, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]]))
    got = raster_order(reduced, 4, kept=torch.tensor([2, 3]))
    assert got.tokens.flatten().tolist() == [1, 0, 2, 3, 6, 5, 4, 7]
    assert got.weights.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    unmasked = raster_order(reduced, 4)  # every slot ordered: the zero boxes come first
    assert unmasked.tokens.flatten().tolist() == [2, 3, 1, 0, 7, 6, 5, 4]
