"""The whole data path on the CPU (and on the GPU when present): contract, batch invariance, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import arrcoc
from arrcoc.stages.balance import BALANCE_KEYS
from arrcoc.world.samples import demo_scene, scene_regions


def _photo(width: int, height: int, seed: int) -> Image.Image:
    return demo_scene(width, height, seed=seed)


def _check_contract(out: arrcoc.CompressionOutput, budgets: list[int]) -> None:
    b = len(budgets)
    assert out.tokens.shape[0] == b and out.tokens.shape[1] >= max(budgets)
    assert out.mask.sum(1).tolist() == budgets
    assert out.allocation.flatten(1).sum(1).tolist() == budgets
    assert torch.isfinite(out.tokens).all()
    assert out.positions.dtype == torch.int64 and out.allocation.dtype == torch.int64
    for i in range(b):
        gh, gw = out.patch_grid[i].tolist()
        pos = out.positions[i][out.mask[i]]
        assert (pos[:, 0] >= 0).all() and (pos[:, 0] + pos[:, 2] <= gh).all()
        assert (pos[:, 1] >= 0).all() and (pos[:, 1] + pos[:, 3] <= gw).all()
        assert out.weights[i][out.mask[i]].sum() > 0


def test_end_to_end_mixed_inputs(tiny_pipe: arrcoc.Pipeline, tmp_path) -> None:
    path = tmp_path / "scene.png"
    _photo(400, 300, 0).save(path)
    tensor = torch.from_numpy(np.array(_photo(200, 200, 1))).permute(2, 0, 1)
    out = tiny_pipe([str(path), _photo(900, 500, 2), tensor], budget=24)
    _check_contract(out, [24, 24, 24])
    assert out.bucket.tolist() == [512, 1024, 224]
    assert out.names[0] == str(path)
    assert set(out.scores) == {"propositional", "perspectival", "participatory"}
    assert set(out.balance) == set(BALANCE_KEYS)
    assert out.balance["has_query"].tolist() == [False, False, False]
    assert (out.scores["participatory"] == 0).all()
    rh, rw = out.region_grid[2].tolist()  # the 224 image has a smaller grid; the rest is padding
    assert (out.relevance[2, rh:, :] == 0).all() and (out.relevance[2, :, rw:] == 0).all()


def test_same_image_alone_and_in_a_batch(tiny_pipe: arrcoc.Pipeline) -> None:
    image = _photo(320, 240, 3)
    alone = tiny_pipe(image, budget=20)
    batch = tiny_pipe([_photo(640, 200, 4), image, _photo(300, 300, 5)], budget=[30, 20, 10])
    torch.testing.assert_close(batch.tokens[1, :20], alone.tokens[0, :20], rtol=1e-5, atol=1e-5)
    rh, rw = alone.region_grid[0].tolist()
    assert batch.region_grid[1].tolist() == [rh, rw]
    assert torch.equal(batch.allocation[1, :rh, :rw], alone.allocation[0])
    assert torch.equal(batch.positions[1, :20], alone.positions[0, :20])
    torch.testing.assert_close(batch.relevance[1, :rh, :rw], alone.relevance[0], rtol=1e-5, atol=1e-6)


def test_budget_per_image_and_edges(tiny_pipe: arrcoc.Pipeline) -> None:
    images = [_photo(224, 224, 6), _photo(224, 224, 7)]
    out = tiny_pipe(images, budget=[1, 196])  # one token, and every patch of the 224 bucket (14x14)
    _check_contract(out, [1, 196])
    assert (out.weights[1][out.mask[1]] == 1).all()  # full budget = full detail


def test_full_budget_returns_every_patch(tiny_pipe: arrcoc.Pipeline) -> None:
    image = _photo(224, 224, 8)
    out = tiny_pipe(image, budget=196)
    pos = out.positions[0][out.mask[0]]
    assert sorted(map(tuple, pos[:, :2].tolist())) == [(r, c) for r in range(14) for c in range(14)]


def test_query_embedding_changes_participatory(tiny_pipe: arrcoc.Pipeline) -> None:
    image = _photo(320, 240, 9)
    query = torch.randn(3, tiny_pipe.width, generator=torch.Generator().manual_seed(0))
    out = tiny_pipe(image, query=query, budget=16)
    assert out.balance["has_query"].tolist() == [True]
    assert out.scores["participatory"].max() == 1.0
    padded = torch.cat([query, torch.full((2, tiny_pipe.width), 1e3)])
    masked = tiny_pipe(image, query=padded, query_mask=torch.tensor([True] * 3 + [False] * 2), budget=16)
    torch.testing.assert_close(masked.relevance, out.relevance)


def test_text_query_without_text_encoder_is_a_clear_error(tiny_pipe: arrcoc.Pipeline) -> None:
    with pytest.raises(arrcoc.MissingWeightsError, match="text encoder"):
        tiny_pipe(_photo(100, 100, 0), query="what does the red sign say?", budget=8)


@pytest.mark.parametrize(
    "budget, match",
    [
        (0, "between 1 and 196"),
        (197, "between 1 and 196"),
        (2.5, "whole number"),
        (True, "whole number"),
        ([3, 4], "one per image"),
    ],
)
def test_bad_budgets(tiny_pipe: arrcoc.Pipeline, budget, match: str) -> None:
    with pytest.raises(arrcoc.BudgetError, match=match):
        tiny_pipe(_photo(200, 200, 0), budget=budget)


def test_bad_query_width(tiny_pipe: arrcoc.Pipeline) -> None:
    with pytest.raises(arrcoc.InvalidInputError, match="width"):
        tiny_pipe(_photo(200, 200, 0), query=torch.randn(7), budget=8)


def test_score_only(tiny_pipe: arrcoc.Pipeline) -> None:
    out = tiny_pipe.score([_photo(300, 200, 1)], profile=True)
    assert isinstance(out, arrcoc.ScoreOutput) and not isinstance(out, arrcoc.CompressionOutput)
    assert {"preprocess", "encode", "score", "balance"} <= set(out.timings)
    torch.testing.assert_close(out.relevance.flatten(1).sum(1), torch.ones(1))
    as_json = out.image(0)
    assert len(as_json["relevance"]) == out.region_grid[0, 0]


def test_weight_free_scores_on_the_demo_scene() -> None:
    """With a random encoder, texture alone must rank the sign above the flat sky."""
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny"))
    out = pipe.score(demo_scene(640, 480))
    per_pixel = out.patch_pixels(0) * out.region_size  # region side in source pixels
    parts = scene_regions(640, 480)

    def mean_in(box, key):
        left, top, right, bottom = (int(v // per_pixel) for v in box)
        grid = out.relevance if key == "relevance" else out.scores[key]
        return grid[0, top : max(bottom, top + 1), left : max(right, left + 1)].mean().item()

    for key in ("propositional", "perspectival", "relevance"):
        assert mean_in(parts["sign"], key) > 2 * mean_in(parts["sky"], key), key


def test_save_and_load_pretrained(tmp_path, tiny_pipe: arrcoc.Pipeline) -> None:
    tiny_pipe.save_pretrained(tmp_path)
    again = arrcoc.Pipeline.from_pretrained(tmp_path)
    assert again.config == tiny_pipe.config
    image = _photo(200, 150, 2)
    torch.testing.assert_close(again(image, budget=12).tokens, tiny_pipe(image, budget=12).tokens)


def test_from_pretrained_default_loads_the_shipped_weights_offline() -> None:
    """The default is weights/: its config, its trained encoder and its question encoder; nothing is downloaded."""
    from arrcoc.pipeline import DEFAULT_WEIGHTS_DIR

    pipe = arrcoc.Pipeline.from_pretrained(buckets=(224,))
    shipped = arrcoc.PipelineConfig.from_json((DEFAULT_WEIGHTS_DIR / "config.json").read_text())
    assert pipe.config == shipped.replace(buckets=(224,))
    assert pipe.text_encoder is not None
    out = pipe(_photo(224, 224, 0), query="what color is the triangle?", budget=32)
    _check_contract(out, [32])
    assert bool(out.balance["has_query"][0])


def test_convnet_encoder() -> None:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig(encoder="resnet18", buckets=(224, 384), region_size=2))
    out = pipe([_photo(300, 200, 0), _photo(100, 100, 1)], budget=10)
    _check_contract(out, [10, 10])
    assert out.prefix.shape[1] == 0 and out.patch_grid[0].tolist() == [12, 12]


def test_encoder_without_grid_is_a_clear_error() -> None:
    with pytest.raises(arrcoc.EncoderError):
        arrcoc.Pipeline(arrcoc.PipelineConfig(encoder="not_a_model_name"))


def test_import_is_inert() -> None:
    import subprocess
    import sys

    code = "import arrcoc, torch, sys; assert not torch.cuda.is_initialized(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "ok\n" and done.stderr == ""


@pytest.mark.cuda
def test_cuda_matches_cpu(tiny_config: arrcoc.PipelineConfig) -> None:
    cpu = arrcoc.Pipeline(tiny_config)
    gpu = arrcoc.Pipeline(tiny_config, device="cuda")
    images = [_photo(320, 240, i) for i in range(3)]
    query = torch.randn(2, cpu.width, generator=torch.Generator().manual_seed(0))
    a = cpu(images, query=query, budget=[10, 40, 90])
    b = gpu(images, query=query.cuda(), budget=[10, 40, 90])
    _check_contract(b, [10, 40, 90])
    torch.testing.assert_close(b.relevance.cpu(), a.relevance, rtol=1e-3, atol=1e-4)
    agree = (b.allocation.cpu() == a.allocation).float().mean()
    assert agree > 0.9  # float differences may move a token across a rounding tie


@pytest.mark.cuda
def test_cuda_stages_do_not_sync(tiny_config: arrcoc.PipelineConfig) -> None:
    pipe = arrcoc.Pipeline(tiny_config, device="cuda")
    (group,) = pipe.preprocessor([_photo(320, 240, 0)], device="cuda")
    state = {
        "pixels": group.pixels,
        "valid": group.valid,
        "query": torch.zeros(1, 1, pipe.width, device="cuda"),
        "query_mask": torch.zeros(1, 1, dtype=torch.bool, device="cuda"),
        "budget": torch.tensor([40], device="cuda"),
    }
    chain = pipe.stages(group.bucket, capacity=64)
    with torch.inference_mode():
        for _, stage in chain:  # warm up (lazy init may sync once)
            state.update(stage(state))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _, stage in chain:
                state.update(stage(state))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(state["mask"].sum()) == 40


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_a_call_on_a_gpu_batch_syncs_only_to_check_the_query(tiny_config: arrcoc.PipelineConfig, graphs: bool) -> None:
    """A uint8 batch already on the GPU: no sync without a query; with a query embedding, one (its finite check)."""
    import warnings

    pipe = arrcoc.Pipeline(tiny_config, device="cuda", cuda_graphs=graphs)
    bucket = tiny_config.buckets[0]
    images = torch.randint(0, 256, (2, 3, bucket, bucket), dtype=torch.uint8, device="cuda")
    query = torch.randn(1, 3, pipe.width, device="cuda")

    def syncs(**kwargs: object) -> int:
        pipe(images, budget=16, **kwargs)  # warm-up: captures and lazy initialisation may sync
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pipe(images, budget=16, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("called a synchronizing" in str(w.message) for w in caught)

    assert syncs() == 0
    assert syncs(query=query) == 1


@pytest.mark.parametrize("height, width", [(1, 1), (4000, 90), (37, 2500)])
def test_tiny_and_extreme_images(tiny_pipe: arrcoc.Pipeline, height: int, width: int) -> None:
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = tiny_pipe(image, budget=8)
    _check_contract(out, [8])
    rh, rw = out.region_grid[0].tolist()
    assert out.relevance[0, :rh, :rw].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_text_query_encoder_round_trip(tmp_path, tiny_config: arrcoc.PipelineConfig) -> None:
    """A saved query encoder comes back with the pipeline, and a question then steers the participatory map."""
    from arrcoc.stages.text_query import TextQueryConfig, TextQueryEncoder

    pipe = arrcoc.Pipeline(tiny_config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe.text_encoder = TextQueryEncoder(TextQueryConfig(width=pipe.width, dim=32, layers=1, heads=2))
    pipe.save_pretrained(tmp_path)
    loaded = arrcoc.Pipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.text_encoder, TextQueryEncoder)
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    question = "what color is the triangle?"
    out = loaded(image, query=question, budget=16)
    assert bool(out.balance["has_query"][0])
    assert out.scores["participatory"].abs().sum() > 0
    # Weights are stored in float16: the loaded encoder is the saved one up to that rounding.
    expected, _ = pipe.text_encoder(question)
    got, _ = loaded.text_encoder(question)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


# --- a token never stands for padding --------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(8, 400), width=st.integers(8, 400), share=st.floats(0.01, 1.5), cap=st.booleans())
def test_no_kept_token_lies_on_padding(
    tiny_pipe: arrcoc.Pipeline, height: int, width: int, share: float, cap: bool
) -> None:
    """For random sizes, aspect ratios and budgets: every kept token's area holds image, and the budget is
    either met exactly or refused (or, capped, lowered to the real patches and reported)."""
    image = torch.rand(3, height, width)
    out = tiny_pipe.score([image])
    bucket = int(out.bucket[0])
    gh, gw = (int(g) for g in out.patch_grid[0])
    scale = bucket / max(height, width)
    rows = -(-round(height * scale) // (bucket // gh))
    cols = -(-round(width * scale) // (bucket // gw))
    budget = max(1, round(share * rows * cols))
    if budget > rows * cols and not cap:
        with pytest.raises(arrcoc.BudgetError, match=f"{rows}x{cols} real patches"):
            tiny_pipe([image], budget=budget)
        return
    out = tiny_pipe([image], budget=budget, budget_policy="cap" if cap else "exact")
    used = min(budget, rows * cols)
    assert out.budget.tolist() == [used]
    assert int(out.mask.sum()) == used
    kept = out.positions[0][out.mask[0]]  # (K, 4) row, col, height, width in patches
    assert int(kept[:, 0].max()) < rows and int(kept[:, 1].max()) < cols, "a kept token lies in the padding"
    valid = torch.zeros(gh, gw, dtype=torch.bool)
    valid[:rows, :cols] = True
    for r, c, h, w in kept.tolist():
        assert valid[r : r + h, c : c + w].any(), f"token at {(r, c, h, w)} pools padding only"


def test_from_pretrained_passes_the_pipelines_own_options_and_config_fields() -> None:
    """The options act, not only arrive: the eager-backend cache would capture on CPU if cuda_graphs=False were
    dropped, a large image lands in the only bucket asked for, and the shipped text encoder reads a text query."""
    cache = arrcoc.GraphCache(max_entries=3, backend="eager")
    pipe = arrcoc.Pipeline.from_pretrained(
        cuda_graphs=False, compile=False, concurrent=False, graph_cache=cache, buckets=(224,)
    )
    assert pipe.cuda_graphs is False and pipe.concurrent is False and pipe.graph_cache is cache
    image = torch.rand(3, 500, 400, generator=torch.Generator().manual_seed(0))
    out = pipe(image, budget=8)
    assert out.bucket.tolist() == [224] and out.mask.sum().item() == 8
    assert cache.stats()["misses"] == 0 and len(cache) == 0
    asked = pipe(image, query="what colour is the square?", budget=8)
    assert not torch.equal(asked.relevance, out.relevance)  # the question changed what is relevant


def test_compile_head_compiles_every_step_but_the_backbone(
    tiny_config: arrcoc.PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = arrcoc.Pipeline(tiny_config)
    compiled: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    pipe.stages(224, 20, compile=True)
    everything = list(compiled)
    compiled.clear()
    pipe.stages(224, 20, compile="head")
    features = pipe.encoder(224).features
    assert features in everything and features not in compiled and len(compiled) == len(everything) - 1
    arrcoc.Pipeline(tiny_config, compile="head")
    assert torch._dynamo.config.recompile_limit >= 64  # every graph key compiles, none silently runs eager
    with pytest.raises(arrcoc.InvalidInputError, match="compile must be"):
        arrcoc.Pipeline(tiny_config, compile="all")


def test_from_pretrained_refuses_a_folder_without_trained_encoder_weights(tmp_path) -> None:
    arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny")).save_pretrained(tmp_path)
    (tmp_path / "encoder.safetensors").unlink()
    with pytest.raises(arrcoc.MissingWeightsError, match="encoder.safetensors"):
        arrcoc.Pipeline.from_pretrained(tmp_path)


def test_asks_every_image_reads_only_what_the_host_knows() -> None:
    from arrcoc.frontend import asks_every_image

    width = 8
    assert asks_every_image("what colour?", None) and asks_every_image(["a", "b"], None)
    assert not asks_every_image(None, None) and not asks_every_image([], None)
    assert asks_every_image(torch.randn(width), None) and asks_every_image(torch.randn(2, 3, width), None)
    assert not asks_every_image(torch.randn(0, width), None)  # no token: no question
    assert not asks_every_image(torch.randn(3, width), torch.ones(3, dtype=torch.bool))  # a mask is not read


def test_a_call_that_asks_every_image_builds_no_pick_and_answers_the_same(tiny_config) -> None:
    """The query-free pick is only read without a question: leaving it out of the chain changes no output."""
    from arrcoc.runtime.graphs import GraphCache

    graphed = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"))
    images = [torch.rand(3, 120, 224), torch.rand(3, 200, 90)]
    query = torch.randn(2, 3, graphed.width)
    asked = graphed(images, query=query, budget=[7, 40])
    masked = graphed(images, query=query, query_mask=torch.ones(2, 3, dtype=torch.bool), budget=[7, 40])
    keys = set(graphed.graph_cache.stats()["per_entry"])
    assert keys == {"224px/b2/float32/T64/L4/asked", "224px/b2/float32/T64/L4"}  # a given mask is not read
    for name in ("relevance", "allocation", "mask", "positions", "tokens"):
        assert torch.equal(getattr(asked, name), getattr(masked, name)), name
    free = graphed(images, budget=[7, 40])  # no question: the pick decides
    assert not torch.equal(free.allocation, asked.allocation)


def test_graph_batch_pads_every_call_to_one_graph_per_bucket(tiny_config) -> None:
    """A job's last, smaller batches reuse its batch size's graph (one compile per bucket when compiling), and the
    padding changes no image's result."""
    from arrcoc.runtime.graphs import GraphCache

    padded = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"), graph_batch=8)
    plain = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"))
    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 120 + 13 * i, 224 - 9 * i, generator=generator) for i in range(8)]
    for count in (8, 3, 1, 5):
        a, b = padded(images[:count], budget=12), plain(images[:count], budget=12)
        for name in ("relevance", "allocation", "mask", "positions", "tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (count, name)
    assert set(padded.graph_cache.stats()["per_entry"]) == {"224px/b8/float32/T64/L1"}
    assert len(plain.graph_cache.stats()["per_entry"]) == 3  # batch buckets 8, 4 and 1
    with pytest.raises(arrcoc.InvalidInputError, match="graph_batch must be at least 1"):
        arrcoc.Pipeline(tiny_config, graph_batch=0)


def test_a_call_that_asks_every_image_computes_no_novelty(tiny_config, monkeypatch) -> None:
    """With every image asked (and no share of the relevance following the cover then), the balance reads no
    novelty, so its (N, N) product per image is not computed; relevance alone without a question still reads it."""
    from arrcoc.stages import balance

    assert tiny_config.balance.query_cover == 0 and tiny_config.balance.cover > 0
    calls = []
    real = balance.novelty
    monkeypatch.setattr(balance, "novelty", lambda *args: calls.append(len(args)) or real(*args))
    pipe = arrcoc.Pipeline(tiny_config)
    images = [torch.rand(3, 120, 224), torch.rand(3, 200, 90)]
    pipe(images, query=torch.randn(2, 3, pipe.width), budget=[7, 40])
    assert calls == []
    pipe.score(images)  # relevance alone, no question: the cover sums novelty per region
    assert calls


def test_warmup_captures_the_chains_the_calls_will_use(tiny_config) -> None:
    from arrcoc.runtime.graphs import GraphCache

    pipe = arrcoc.Pipeline(tiny_config, graph_cache=GraphCache(backend="eager"))
    keys = lambda: set(pipe.graph_cache.stats()["per_entry"])  # noqa: E731
    pipe.warmup([224], [1], budget=64, asked=True)
    assert keys() == {"224px/b1/float32/T64/L1/asked", "224px/b1/float32/T0/L1"}
    pipe.warmup([224], [1], budget=64)
    assert keys() == {"224px/b1/float32/T64/L1/asked", "224px/b1/float32/T64/L1", "224px/b1/float32/T0/L1"}


def test_a_bucket_encoder_built_after_a_bf16_call_outside_inference_mode_shares_the_frozen_weights(
    tiny_config: arrcoc.PipelineConfig,
) -> None:
    """A bf16 pipeline's first call converts the backbone under inference mode; a bucket's encoder built after that,
    outside it (``pipe.encoder(bucket)`` from a user's code), must still share those weights, not fail to take them."""
    pipe = arrcoc.Pipeline(tiny_config.replace(encoder_dtype="bfloat16"))
    pipe(torch.randint(0, 256, (1, 3, 200, 200), dtype=torch.uint8), budget=8)
    assert next(pipe.backbone.parameters()).is_inference()
    bucket = max(tiny_config.buckets)
    encoder = pipe.encoder(bucket)
    weight = encoder.model.blocks[0].attn.qkv.weight
    assert weight.data_ptr() == pipe.backbone.blocks[0].attn.qkv.weight.data_ptr() and not weight.requires_grad
