"""The batched input path (compress-dataset, the Preprocessor on CUDA): the letterbox matches the Preprocessor;
the header reader routes files as Pillow would read them; the batched path writes the same layout, index and
resumable shards; the Preprocessor places batched JPEGs as its per-image path does."""

from __future__ import annotations

import functools
import io
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import arrcoc
from arrcoc.datasets import compress_dataset
from arrcoc.datasets.shards import INDEX_NAME, SHARD_DIR, load_index, load_record
from arrcoc.stages import gpu_input
from arrcoc.stages.gpu_input import decode_jpegs, jpeg_size, letterbox, placement, valid_mask
from arrcoc.stages.preprocess import Preprocessor

BUCKETS = (64, 128)
#: up- and down-sampling, portrait and landscape, an exact fit, a one-pixel row, beyond the largest bucket
SHAPES = [(40, 64), (64, 30), (100, 128), (128, 77), (33, 20), (200, 150), (90, 300), (64, 64), (1, 5), (128, 128)]


def _jpeg(pixels: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_letterbox_matches_the_preprocessor(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in SHAPES]
    if kind == "float32":
        images = [image / 255.0 for image in images]
    preprocessor = Preprocessor(BUCKETS, multiple=1)
    for bucket in BUCKETS:
        chosen = [image for image in images if placement(*image.shape[1:], BUCKETS)[0] == bucket]
        sizes = [placement(*image.shape[1:], BUCKETS)[2] for image in chosen]
        pixels, valid = letterbox(chosen, sizes, bucket)
        (want,) = preprocessor(chosen)
        assert want.bucket == bucket and pixels.shape == want.pixels.shape and pixels.dtype == torch.float32
        torch.testing.assert_close(pixels, want.pixels, atol=5e-6, rtol=0)
        assert torch.equal(valid, want.valid)
        assert want.content_size.tolist() == [list(size) for size in sizes]
        scales = torch.tensor([placement(*image.shape[1:], BUCKETS)[1] for image in chosen], dtype=torch.float32)
        assert torch.equal(scales, want.scale)


def test_placement_and_valid_mask() -> None:
    preprocessor = Preprocessor(BUCKETS, multiple=1)
    for h, w in SHAPES:
        bucket, scale, size = placement(h, w, BUCKETS)
        assert bucket == preprocessor.bucket_for(h, w)
        assert scale == bucket / max(h, w) and max(size) == bucket
    mask = valid_mask(torch.tensor([[3, 5], [64, 1]]), 64)
    assert mask.shape == (2, 1, 64, 64) and mask.sum(dim=(1, 2, 3)).tolist() == [15, 64]
    assert mask[0, 0, :3, :5].all() and not mask[0, 0, 3:].any() and not mask[0, 0, :, 5:].any()


def test_jpeg_size_routes_only_what_nvjpeg_reads_as_pillow_does() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert jpeg_size(_jpeg(rgb)) == (37, 53)
    assert jpeg_size(_jpeg(rgb, progressive=True)) == (37, 53)
    assert jpeg_size(_jpeg(rgb[..., 0])) == (37, 53)  # grey: three equal channels either way
    whole = _jpeg(rgb)
    assert jpeg_size(whole[: len(whole) // 2]) is None  # truncated: Pillow refuses it
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG")
    assert jpeg_size(buffer.getvalue()) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow turns it
    assert jpeg_size(_jpeg(rgb, exif=exif.tobytes())) is None
    exif[0x0112] = 1
    assert jpeg_size(_jpeg(rgb, exif=exif.tobytes())) == (37, 53)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    assert jpeg_size(buffer.getvalue()) is None
    assert jpeg_size(b"") is None and jpeg_size(b"\xff\xd8 not a JPEG \xff\xd9") is None


def test_jpeg_file_reads_the_bytes_and_the_header_as_jpeg_size_does(tmp_path: Path) -> None:
    """The reader parses the header through a view of the tensor it read into: the same answer as from bytes."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)
    rotated, upright = Image.Exif(), Image.Exif()
    rotated[0x0112], upright[0x0112] = 6, 1
    blobs = {
        "plain.jpg": _jpeg(rgb),
        "progressive.jpg": _jpeg(rgb, progressive=True),
        "rotated.jpg": _jpeg(rgb, exif=rotated.tobytes()),
        "upright.jpg": _jpeg(rgb, exif=upright.tobytes()),
        "truncated.jpg": _jpeg(rgb)[:200],
        "empty.jpg": b"",
    }
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
        found = gpu_input.jpeg_file(str(tmp_path / name))
        assert (found is None) == (jpeg_size(blob) is None), name
        if found is not None:
            data, size = found
            assert size == jpeg_size(blob) == (29, 41) and bytes(data.numpy()) == blob, name
    assert gpu_input.jpeg_file(str(tmp_path / "missing.jpg")) is None


@pytest.mark.cuda
def test_jpeg_files_read_into_pinned_memory_give_the_same_shards(
    tmp_path: Path, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not gpu_input.jpeg_file(str(mixed / "img00.jpg"), pinned=True)[0].is_pinned()  # small: pageable
    monkeypatch.setattr(gpu_input, "PINNED_MIN_BYTES", 0)  # the fixture's files are small
    found = gpu_input.jpeg_file(str(mixed / "img00.jpg"), pinned=True)
    assert found is not None and found[0].is_pinned()
    assert bytes(found[0].numpy()) == (mixed / "img00.jpg").read_bytes()
    pinned = _run(mixed, tmp_path / "pinned", "cuda", True, workers=2)
    compress_dataset.PINNED_READS = False
    try:
        pageable = _run(mixed, tmp_path / "pageable", "cuda", True, workers=2)
    finally:
        compress_dataset.PINNED_READS = True
    assert pinned.device_decoded == pageable.device_decoded == 15
    assert _compare(tmp_path / "pinned", tmp_path / "pageable", exact=True) == 1.0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JPEGs (one grey, one rotated, one truncated), PNGs and a broken file, in both buckets."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(3)
    for i in range(22):
        side = (20, 64) if i % 3 else (70, 128)
        h, w = (int(v) for v in rng.integers(*side, size=2))
        base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        if i % 4 == 1:
            base.save(folder / f"img{i:02d}.png")
        elif i == 6:
            base.convert("L").save(folder / f"img{i:02d}.jpg", quality=90)
        elif i == 10:
            exif = Image.Exif()
            exif[0x0112] = 8
            base.save(folder / f"img{i:02d}.jpg", quality=90, exif=exif.tobytes())
        else:
            base.save(folder / f"img{i:02d}.jpg", quality=90)
    whole = (folder / "img02.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


def _run(
    source: Path, dest: Path, device: str, batch_decode: bool, workers: int | None = 0, **extra: object
) -> compress_dataset.DatasetStats:
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=BUCKETS), device=device)
    return compress_dataset.compress_dataset(
        source,
        dest,
        pipe,
        8,
        batch_size=4,
        workers=workers,
        shard_size=5,
        progress=False,
        batch_decode=batch_decode,
        **extra,
    )


def test_the_default_readers_follow_the_share_of_jpeg_names(tmp_path: Path, mixed: Path) -> None:
    """One reader thread when nearly every file is a JPEG (the GPU decodes them), else several (Pillow decodes the
    rest in them)."""
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for path in sorted(mixed.glob("img*.jpg")):
        shutil.copy(path, jpegs / path.name)
    assert _run(jpegs, tmp_path / "a", "cpu", True, workers=None).readers == compress_dataset.JPEG_READERS == 1
    assert _run(mixed, tmp_path / "b", "cpu", True, workers=None).readers == compress_dataset.READERS > 1
    assert _run(jpegs, tmp_path / "c", "cpu", False, workers=None).readers == compress_dataset.READERS
    assert _run(jpegs, tmp_path / "d", "cpu", True, workers=2).readers == 2


def _compare(got: Path, want: Path, exact: bool) -> float:
    """Same index and shard layout; returns the share of images whose allocation is identical."""
    assert (got / INDEX_NAME).read_text() == (want / INDEX_NAME).read_text()
    assert sorted(os.listdir(got / SHARD_DIR)) == sorted(os.listdir(want / SHARD_DIR))
    for name in os.listdir(want / SHARD_DIR):
        with (
            safe_open(os.fspath(got / SHARD_DIR / name), "pt") as a,
            safe_open(os.fspath(want / SHARD_DIR / name), "pt") as b,
        ):
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            for key in b.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.shape == y.shape and x.dtype == y.dtype, (name, key)
                if exact or key in ("region_grid", "patch_grid", "bucket", "scale", "source_size", "budget"):
                    assert torch.equal(x, y), (name, key)
    ok = [r for r in load_index(want) if r["status"] == "ok"]
    same = sum(torch.equal(load_record(got, r)["allocation"], load_record(want, r)["allocation"]) for r in ok)
    return same / len(ok)


@pytest.fixture(scope="module")
def pil_path(tmp_path_factory: pytest.TempPathFactory, mixed: Path) -> Path:
    dest = tmp_path_factory.mktemp("pil")
    stats = _run(mixed, dest, "cpu", False)
    assert stats.complete and stats.device_decoded == 0 and stats.errors == 2
    return dest


def test_batched_decoding_keeps_the_layout_index_and_answers(tmp_path: Path, mixed: Path, pil_path: Path) -> None:
    """torchvision's decoder and the batched letterbox on the CPU: the same files, records, shapes and grids."""
    stats = _run(mixed, tmp_path / "batched", "cpu", True)
    assert stats.complete and stats.errors == 2
    assert stats.device_decoded == 15 and stats.host_decoded == 7  # PNGs, the rotated JPEG; broken ones are errors
    errors = {Path(r["source"]).name: r["error"] for r in load_index(tmp_path / "batched") if r["status"] == "error"}
    assert sorted(errors) == ["broken.jpg", "truncated.jpg"] and "truncated" in errors["truncated.jpg"]
    assert _compare(tmp_path / "batched", pil_path, exact=False) >= 0.9


def test_batched_decoding_resumes_after_max_shards(tmp_path: Path, mixed: Path, pil_path: Path) -> None:
    dest = tmp_path / "resumed"
    first = _run(mixed, dest, "cpu", True, max_shards=2)
    assert not first.complete and first.shards_written == 2 and not (dest / INDEX_NAME).exists()
    second = _run(mixed, dest, "cpu", True, workers=1)  # read by a reader thread
    assert second.complete and second.shards_written == 3 and second.shards_skipped == 2
    whole = tmp_path / "whole"
    _run(mixed, whole, "cpu", True)
    _compare(dest, whole, exact=True)


def test_the_decode_thread_writes_what_the_main_thread_does(
    tmp_path: Path, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode thread (on by default on CUDA) forced on the CPU: the same shards, bit for bit."""
    plain = tmp_path / "plain"
    _run(mixed, plain, "cpu", True)
    threaded = functools.partial(compress_dataset._ShardWriter, decode_thread=True)
    monkeypatch.setattr(compress_dataset, "_ShardWriter", threaded)
    stats = _run(mixed, tmp_path / "threaded", "cpu", True, workers=1)
    assert stats.complete and stats.errors == 2 and stats.device_decoded == 15 and stats.host_decoded == 7
    assert stats.decode_thread_seconds > 0 and stats.startup_seconds > 0 and 0 < stats.drain_seconds < stats.seconds
    _compare(tmp_path / "threaded", plain, exact=True)


def test_the_next_batch_decodes_while_this_one_is_compressed(
    tmp_path: Path, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode thread gets batch k+1 before the main thread compresses batch k (so nvJPEG's host side runs
    beside the pipeline), and the graph cache's capture lock is the writer's only while the job runs."""
    order: list[str] = []

    class Logged(compress_dataset._ShardWriter):
        def __init__(self, pipe: arrcoc.Pipeline, *args: object, **kwargs: object) -> None:
            super().__init__(pipe, *args, decode_thread=True, **kwargs)
            assert pipe.graph_cache.capture_lock is self.lock
            submit = self.decoder.submit
            self.decoder.submit = lambda fn, items: order.append(f"decode {items[0].index}") or submit(fn, items)

        def _compress_decoded(self, decoded: compress_dataset._Decoded) -> None:
            order.append(f"compress {(decoded.jpegs + decoded.hosted)[0].index}")
            super()._compress_decoded(decoded)

    monkeypatch.setattr(compress_dataset, "_ShardWriter", Logged)
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=BUCKETS), device="cpu")
    stats = compress_dataset.compress_dataset(
        mixed, tmp_path / "out", pipe, 8, batch_size=2, workers=0, shard_size=40, progress=False, batch_decode=True
    )
    assert stats.complete and pipe.graph_cache.capture_lock is None
    decodes = [i for i, step in enumerate(order) if step.startswith("decode")]
    compresses = [i for i, step in enumerate(order) if step.startswith("compress")]
    assert len(decodes) == len(compresses) >= 8
    # every batch but the last is compressed only after the next one went to the decode thread
    assert all(decodes[k + 1] < compresses[k] for k in range(len(compresses) - 1))


def _loaded(mixed: Path) -> compress_dataset._Decode:
    items = list(enumerate(sorted(os.fspath(p) for p in mixed.iterdir())))
    return compress_dataset._Decode(items, BUCKETS, device_jpegs=True)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_the_reader_hands_over_every_item_once_in_order(mixed: Path, threads: int) -> None:
    dataset = _loaded(mixed)
    chunks = list(compress_dataset._ThreadedReader(dataset, threads, 4))
    count = len(dataset)
    assert [len(chunk) for chunk in chunks] == [4] * (count // 4) + ([count % 4] if count % 4 else [])
    got = [item for chunk in chunks for item in chunk]
    assert [(item.index, item.source) for item in got] == list(dataset.items)
    for item, want in zip(got, (dataset[p] for p in range(count))):
        assert (item.data is None, item.pixels is None, item.error) == (
            want.data is None,
            want.pixels is None,
            want.error,
        )
        assert item.data is None or torch.equal(item.data, want.data)
        assert item.pixels is None or torch.equal(item.pixels, want.pixels)
        assert (item.bucket, item.scale, item.content_size) == (want.bucket, want.scale, want.content_size)
    carried = [item for item in got if item.data is not None]
    assert len(carried) == 15 and all(item.data.dtype == torch.uint8 and item.data.ndim == 1 for item in carried)


def test_a_consumer_that_stops_early_leaves_no_reader_threads(mixed: Path) -> None:
    chunks = iter(compress_dataset._ThreadedReader(_loaded(mixed), 3, 2))
    assert len(next(chunks)) == 2
    chunks.close()
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("arrcoc-read")]


def test_the_batched_path_reads_in_threads_and_starts_no_worker_process(
    tmp_path: Path, mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader threads (PNGs and the rotated JPEG decoded by Pillow in them) write what one thread writes."""
    alone = tmp_path / "alone"
    _run(mixed, alone, "cpu", True)

    def no_loader(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batched path started DataLoader worker processes")

    monkeypatch.setattr(torch.utils.data, "DataLoader", no_loader)
    stats = _run(mixed, tmp_path / "threads", "cpu", True, workers=3)
    assert stats.complete and stats.errors == 2 and stats.device_decoded == 15 and stats.host_decoded == 7
    _compare(tmp_path / "threads", alone, exact=True)


@pytest.mark.cuda
def test_letterbox_on_the_gpu_matches_the_preprocessor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix-product path on CUDA (the kernels' own tests: ``test_resize_kernel.py``)."""
    monkeypatch.setattr(gpu_input, "USE_KERNEL", False)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in SHAPES]
    preprocessor = Preprocessor(BUCKETS, multiple=1)
    for bucket in BUCKETS:
        chosen = [image for image in images if placement(*image.shape[1:], BUCKETS)[0] == bucket]
        sizes = [placement(*image.shape[1:], BUCKETS)[2] for image in chosen]
        (want,) = preprocessor(chosen)
        for dtype, atol in ((torch.float32, 1e-5), (None, 2e-3)):  # None: float16 products on CUDA
            pixels, valid = letterbox([image.cuda() for image in chosen], sizes, bucket, dtype=dtype)
            torch.testing.assert_close(pixels.cpu(), want.pixels, atol=atol, rtol=0)
            assert torch.equal(valid.cpu(), want.valid)


@pytest.mark.cuda
def test_nvjpeg_decodes_close_to_pillow(mixed: Path) -> None:
    files = sorted(p for p in mixed.glob("*.jpg") if jpeg_size(p.read_bytes()) is not None)
    decoded = decode_jpegs(
        [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files], torch.device("cuda")
    )
    for path, image in zip(files, decoded):
        pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert image.shape == pil.shape and image.dtype == torch.uint8
        # a few levels apart on average (nvJPEG upsamples chroma otherwise than libjpeg); measured up to 4.7 on
        # these small, saturated images
        assert (image.cpu().int() - pil.int()).abs().float().mean() < 8.0


@pytest.mark.cuda
def test_the_gpu_path_keeps_the_layout_and_index(tmp_path: Path, mixed: Path, pil_path: Path) -> None:
    stats = _run(mixed, tmp_path / "gpu", "cuda", True, workers=2)
    assert stats.complete and stats.device_decoded == 15 and stats.host_decoded == 7
    assert all(v > 0 for v in stats.gpu_ms.values())
    assert _compare(tmp_path / "gpu", pil_path, exact=False) >= 0.6


def _placed(groups: list) -> dict[int, tuple]:
    """index -> (bucket, pixels, valid, scale, source size, content size, name) of each image."""
    out = {}
    for g in groups:
        for row, index in enumerate(g.indices):
            out[index] = (
                g.bucket,
                g.pixels[row],
                g.valid[row],
                float(g.scale[row]),
                g.source_size[row].tolist(),
                g.content_size[row].tolist(),
                g.names[row],
            )
    return out


def test_the_preprocessor_decodes_jpeg_files_in_batches_as_the_per_image_path_places_them(
    mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths given to the Preprocessor (as the Pipeline and ``arrcoc compress`` give them): JPEGs nvJPEG reads as
    Pillow does go through the batched decoder and letterbox (torchvision's CPU decoder here, libjpeg as Pillow's),
    the rest (PNGs, the rotated JPEG) the per-image path; every image keeps its bucket, place, name and order, and
    its pixels those of the per-image path."""
    from arrcoc.stages import preprocess

    paths = sorted(os.fspath(p) for p in mixed.iterdir() if p.name not in ("broken.jpg", "truncated.jpg"))
    want = _placed(Preprocessor(BUCKETS, multiple=1, batch_jpegs=False)(paths))
    monkeypatch.setattr(preprocess, "_JPEG_CHUNK", 4)  # several decode calls, buckets mixed across them
    groups = Preprocessor(BUCKETS, multiple=1, batch_jpegs=True)(paths)
    got = _placed(groups)
    assert sorted(got) == sorted(want) == list(range(len(paths)))
    assert all(g.indices == sorted(g.indices) for g in groups)
    for index, (bucket, pixels, valid, scale, source, content, name) in got.items():
        w = want[index]
        assert (bucket, scale, source, content, name) == (w[0], w[3], w[4], w[5], w[6])
        assert torch.equal(valid, w[2])
        assert (pixels - w[1]).abs().mean() < 0.1 / 255  # measured 1e-5 levels; a misplaced image is ~30


def test_a_batch_the_decoder_refuses_takes_the_per_image_path(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arrcoc.stages import preprocess

    paths = sorted(os.fspath(p) for p in mixed.glob("img*.jpg"))
    want = _placed(Preprocessor(BUCKETS, multiple=1, batch_jpegs=False)(paths))

    def refuse(*_: object) -> None:
        raise RuntimeError("injected: the decoder refuses the batch")

    monkeypatch.setattr(preprocess, "decode_jpegs", refuse)
    got = _placed(Preprocessor(BUCKETS, multiple=1, batch_jpegs=True)(paths))
    assert sorted(got) == sorted(want)
    for index, row in got.items():
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(row, want[index]))
    with pytest.raises(arrcoc.ImageLoadError, match="broken.jpg"):
        Preprocessor(BUCKETS, multiple=1, batch_jpegs=True)([*paths, os.fspath(mixed / "broken.jpg")])


@pytest.mark.cuda
def test_the_pipeline_given_jpeg_paths_on_cuda_decodes_them_on_the_gpu(
    mixed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Pipeline on CUDA, given paths, decodes the JPEGs in one nvJPEG call; each image keeps the placement and
    exact budget the same images get as Pillow-decoded arrays."""
    from arrcoc.stages import preprocess

    calls = []
    real = preprocess.decode_jpegs
    monkeypatch.setattr(
        preprocess, "decode_jpegs", lambda data, device: calls.append((len(data), device)) or real(data, device)
    )
    paths = sorted(os.fspath(p) for p in mixed.glob("img*.jpg"))
    pipe = arrcoc.Pipeline(arrcoc.PipelineConfig.from_name("tiny", buckets=BUCKETS), device="cuda")
    from_paths = pipe(paths, budget=8)
    arrays = [np.array(Image.open(p).convert("RGB")) if jpeg_size(Path(p).read_bytes()) else p for p in paths]
    from_arrays = pipe(arrays, budget=8)
    routed = sum(jpeg_size(Path(p).read_bytes()) is not None for p in paths)
    assert [(n, torch.device(d).type) for n, d in calls] == [(routed, "cuda")]
    assert torch.equal(from_paths.scale.cpu(), from_arrays.scale.cpu())
    assert torch.equal(from_paths.source_size.cpu(), from_arrays.source_size.cpu())
    assert (from_paths.mask.sum(-1).cpu() == 8).all()


def test_the_hardware_decoder_binds_the_nvjpeg_library_torchvision_ships() -> None:
    """Every nvJPEG entry point the hardware decoder calls exists under the name and is given the argument types
    it is called with; without CUDA, or switched off, there is no decoder (and nothing is loaded)."""
    import ctypes

    from arrcoc.stages import _nvjpeg_hardware

    path = _nvjpeg_hardware._library_path()
    if path is None:
        pytest.skip("this torchvision ships no nvJPEG library")
    lib = ctypes.CDLL(path)
    _nvjpeg_hardware._bind(lib)
    assert lib.nvjpegDecodeBatched.argtypes[4] is ctypes.POINTER(_nvjpeg_hardware._Image)
    assert ctypes.sizeof(_nvjpeg_hardware._Image) == 4 * ctypes.sizeof(ctypes.c_void_p) + 4 * 8
    assert _nvjpeg_hardware.decoder(torch.device("cpu")) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_nvjpeg_hardware, "USE_HARDWARE", False)
        assert _nvjpeg_hardware.decoder(torch.device("cuda", 0)) is None


def test_images_packed_one_after_another_are_read_in_place() -> None:
    """The letterbox kernel reads the hardware decoder's block as it is; anything else is gathered first."""
    block = torch.arange(3 * (4 * 5 + 2 * 3), dtype=torch.uint8)
    images = [block[:60].view(3, 4, 5), block[60:].view(3, 2, 3)]
    flat = gpu_input._packed(images, [0, 60], [60, 18])
    assert flat is not None and flat.data_ptr() == block.data_ptr() and torch.equal(flat, block)
    moved = [images[0], images[1].clone()]
    assert gpu_input._packed(moved, [0, 60], [60, 18]) is None
    assert gpu_input._packed(images[::-1], [0, 18], [18, 60]) is None
    assert gpu_input._packed([block[1:61].view(3, 4, 5)], [0], [60]).data_ptr() == block.data_ptr() + 1


@pytest.mark.cuda
def test_the_jpeg_engines_decode_what_they_take_as_the_sms_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU with JPEG engines: large baseline colour files go to the engines, into one block, progressive, grey
    and small ones to torchvision's decoder, in the caller's order; the engines' pixels are torchvision's to a few
    levels (measured: the same bytes on the H100)."""
    from arrcoc.stages import _nvjpeg_hardware

    device = torch.device("cuda")
    engine = _nvjpeg_hardware.decoder(device)
    if engine is None:
        pytest.skip("this GPU has no JPEG engines")
    generator = np.random.default_rng(0)
    files, expected = [], []
    for k, (h, w) in enumerate([(37, 53), (480, 640), (999, 1601), (64, 64), (31, 17), (600, 401)]):
        smooth = np.kron(generator.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        pixels = smooth.astype(np.uint8)
        save = {"subsampling": k % 3} if k < 4 else {}
        if k == 4:
            save = {"progressive": True}
        blob = _jpeg(pixels if k != 5 else pixels[..., 0], **save)
        files.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        expected.append(k < 4)
    taken = [engine.decodable(data) is not None for data in files]
    assert taken == expected
    large = [data.numel() >= gpu_input.ENGINE_MIN_BYTES for data in files]
    assert large == [False, False, True, False, False, False]  # the 999 x 1601 one: 298 KiB
    default = decode_jpegs(files, device)  # the engines take the large file only
    monkeypatch.setattr(gpu_input, "ENGINE_MIN_BYTES", 0)
    hardware = decode_jpegs(files, device)
    sms = gpu_input._decode_on_sms(files, device)
    for k, (a, b) in enumerate(zip(hardware, sms)):
        assert a.shape == b.shape and a.dtype == torch.uint8 and a.device.type == "cuda", k
        difference = (a.int() - b.int()).abs()
        assert difference.float().mean() < 2.0, (k, difference.float().mean())
        assert torch.equal(default[k], a if large[k] else b), k
    numels = [t.numel() for t in hardware[:4]]
    offsets = [sum(numels[:k]) for k in range(4)]
    assert gpu_input._packed(hardware[:4], offsets, numels) is not None  # one block, read in place
