"""Preprocess: every input kind and PIL mode, buckets and letterboxing, EXIF, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from arrcoc.errors import ImageLoadError, InvalidInputError, InvalidTypeError
from arrcoc.stages.preprocess import Preprocessor, load_image

MODES = [
    "RGB",
    "RGBA",
    "LA",
    "La",
    "RGBa",
    "RGBX",
    "PA",
    "P",
    "L",
    "1",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "I",
    "F",
]


def _picture(mode: str, size: tuple[int, int] = (120, 80)) -> Image.Image:
    base = Image.new("RGB", size, (30, 120, 200))
    ImageDraw.Draw(base).rectangle((10, 10, 60, 50), fill=(250, 200, 20))
    if mode.startswith("I"):
        wide = base.convert("L").convert("I").point(lambda v: v * 200)  # use the 16-bit range
        return wide if mode == "I" else wide.convert(mode)
    if mode == "F":
        return Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0, mode="F")
    if mode == "PA":
        return base.convert("P").convert("PA")
    if mode == "La":
        return base.convert("LA").convert("La")
    return base.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode(mode: str, tmp_path) -> None:
    image = _picture(mode)
    tensor = load_image(image)
    assert tensor.shape == (3, 80, 120) and tensor.dtype == torch.float32
    assert 0 <= tensor.min() and tensor.max() <= 1 and tensor.std() > 0.01
    for suffix in (".png", ".tiff"):
        path = tmp_path / f"img{suffix}"
        try:
            image.save(path)
        except (OSError, KeyError, ValueError):
            continue  # this format cannot store this mode
        assert load_image(path).shape == (3, 80, 120)


def test_alpha_is_composited_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert torch.allclose(load_image(clear), torch.ones(3, 4, 4))


def test_sixteen_bit_range() -> None:
    data = np.full((4, 4), 65535, dtype=np.uint16)
    data[0, 0] = 0
    out = load_image(data)
    assert out[0, 0, 0] == 0 and out[0, 1, 1] == 1
    assert torch.equal(load_image(torch.from_numpy(data.astype(np.int32)).to(torch.uint16)), out)


def test_exif_orientation(tmp_path) -> None:
    image = Image.new("RGB", (60, 20), (200, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).shape == (3, 60, 20)


@pytest.mark.parametrize(
    "size, bucket, content",
    [
        ((300, 100), 384, (128, 384)),
        ((1, 1), 224, (224, 224)),
        ((224, 224), 224, (224, 224)),
        ((5000, 300), 1024, (61, 1024)),
        ((800, 2000), 1024, (1024, 410)),
    ],
)
def test_buckets_and_letterbox(size: tuple[int, int], bucket: int, content: tuple[int, int]) -> None:
    width, height = size
    (batch,) = Preprocessor()(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    assert batch.bucket == bucket and batch.pixels.shape == (1, 3, bucket, bucket)
    assert batch.content_size[0].tolist() == list(content)
    h, w = content
    assert batch.valid[0, 0, :h, :w].all() and batch.valid.sum() == h * w
    assert (batch.pixels[0, :, h:, :] == 0).all() and (batch.pixels[0, :, :, w:] == 0).all()
    assert batch.scale[0] == pytest.approx(bucket / max(size))
    assert batch.source_size[0].tolist() == [height, width]


def test_tensor_layouts_agree() -> None:
    g = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    reference = load_image(chw)
    assert torch.equal(load_image(chw.permute(1, 2, 0)), reference)  # channel-last
    assert torch.equal(load_image(chw.permute(1, 2, 0).numpy()), reference)  # numpy HWC
    torch.testing.assert_close(load_image(chw.float() / 255), reference, atol=1e-6, rtol=0)
    assert load_image(chw[0]).shape == (3, 40, 50)  # (H, W) gray
    assert load_image(chw.double() / 255).dtype == torch.float32


def test_batch_tensor_and_mixed_list(tmp_path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (500, 300), (1, 2, 3)).save(path)
    batch4 = torch.rand(2, 3, 100, 100)
    groups = Preprocessor()([str(path), batch4, Image.new("L", (230, 10))])
    assert [g.bucket for g in groups] == [224, 384, 512]
    assert [g.indices for g in groups] == [[1, 2], [3], [0]]
    assert groups[2].names == [str(path)]


def test_alone_equals_in_batch() -> None:
    image = torch.rand(3, 123, 77, generator=torch.Generator().manual_seed(1))
    (alone,) = Preprocessor()(image)
    groups = Preprocessor()([torch.rand(3, 64, 64), image, torch.rand(3, 900, 10)])
    (group,) = [g for g in groups if 1 in g.indices]
    row = group.indices.index(1)
    assert torch.equal(group.pixels[row], alone.pixels[0]) and torch.equal(group.valid[row], alone.valid[0])
    assert group.scale[row] == alone.scale[0]


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, name",
    [(b"\x89PNG not really" * 20, "corrupt.png"), (None, "truncated.jpg"), (b"just some text\n", "notes.txt")],
)
def test_broken_files_name_the_file(tmp_path, content, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if content is not None else _jpeg_bytes()[:600])
    with pytest.raises(ImageLoadError, match=name):
        load_image(path)
    with pytest.raises(ImageLoadError, match=f"image 1 .*{name}"):
        Preprocessor()([torch.rand(3, 8, 8), str(path)])


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (torch.tensor([[[0.5, float("nan")]]]), InvalidInputError, "NaN"),
        (torch.full((3, 4, 4), 1.5), InvalidInputError, "outside"),
        (torch.full((3, 4, 4), -0.1), InvalidInputError, r"min -0\.1"),
        (torch.ones(3, 4, 4, dtype=torch.bool), InvalidTypeError, "bool"),
        (torch.rand(2, 8, 8), InvalidInputError, "channels"),
        (torch.rand(1, 1, 3, 8, 8), InvalidInputError, "shape"),
        (torch.rand(3, 0, 8), InvalidInputError, "empty"),
        (np.zeros((4, 4), dtype=object), InvalidTypeError, "object"),
        (42, InvalidTypeError, "int"),
    ],
)
def test_bad_arrays(value, error, match: str) -> None:
    with pytest.raises(error, match=match):
        Preprocessor()(value)


def test_empty_list_and_bad_buckets() -> None:
    with pytest.raises(InvalidInputError, match="empty list"):
        Preprocessor()([])
    with pytest.raises(InvalidInputError, match="multiples of 32"):
        Preprocessor((224, 300))


def test_every_pillow_mode_is_covered() -> None:
    assert set(MODES) == set(Image.MODES)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_damaged_files_of_each_format(tmp_path, fmt: str, damage: str) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 64).convert("L" if fmt == "GIF" else "RGB").save(buffer, fmt)
    data = buffer.getvalue()
    data = {"truncated": data[: len(data) // 2], "header": bytes(16) + data[16:], "empty": b""}[damage]
    path = tmp_path / f"{damage}.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=path.name):
        load_image(path)


def test_any_decoder_failure_is_an_image_load_error(tmp_path, monkeypatch) -> None:
    """Pillow's plugins raise struct.error, EOFError, IndexError... on bad data: all mean 'cannot read'."""
    import struct

    path = tmp_path / "odd.png"
    Image.new("RGB", (4, 4)).save(path)

    def fails(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "load", fails)
    with pytest.raises(ImageLoadError, match=r"odd\.png.*struct\.error: unpack"):
        load_image(path)


def test_bomb_header_respects_the_default_limit(tmp_path) -> None:
    from arrcoc.tools.fuzz import _png_header

    limit = Image.MAX_IMAGE_PIXELS
    for width, height in ((limit // 1000 + 1, 1000), (100_000, 100_000)):  # warning zone, error zone
        path = tmp_path / f"bomb-{width}.png"
        path.write_bytes(_png_header(width, height, 2))
        with pytest.raises(ImageLoadError, match=f"MAX_IMAGE_PIXELS = {limit}"):
            load_image(path)


def test_odd_arrays_and_tensors() -> None:
    reference = load_image(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    assert torch.equal(load_image((np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(">u2")), reference)
    with pytest.raises(InvalidInputError, match="empty batch"):
        Preprocessor()(torch.zeros(0, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="empty batch"):
        Preprocessor()(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(InvalidTypeError, match="sparse"):
        load_image(torch.zeros(3, 4, 4).to_sparse())
    with pytest.raises(InvalidInputError, match="meta"):
        load_image(torch.zeros(3, 4, 4, device="meta"))
    with pytest.raises(InvalidTypeError, match="complex"):
        load_image(np.zeros((4, 4), np.complex64))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_batch_at_a_bucket_size_equals_the_per_image_path(dtype: torch.dtype) -> None:
    """(B, 3, S, S) at a bucket size takes one batched path (no per-image host reads); its result is the
    per-image path's, field by field."""
    pre = Preprocessor(buckets=(32, 64))
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8)
    if dtype != torch.uint8:
        batch = (batch.to(torch.float64) / 255).to(dtype)
    [fast] = pre(batch)
    [slow] = pre(list(batch))  # a list of images always takes the per-image path
    assert fast.bucket == slow.bucket == 64 and fast.indices == slow.indices and fast.names == slow.names
    for field in ("pixels", "valid", "scale", "source_size", "content_size"):
        a, b = getattr(fast, field), getattr(slow, field)
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), field


def test_a_bucket_batch_out_of_range_names_the_image_as_before() -> None:
    pre = Preprocessor(buckets=(32,))
    batch = torch.rand(3, 3, 32, 32)
    batch[2, 0, 0, 0] = 1.5
    with pytest.raises(InvalidInputError, match=r"image 2 \(Tensor\).*\[0, 1\]"):
        pre(batch)
    batch[2, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"image 2 \(Tensor\).*finite"):
        pre(batch)
    # Other shapes keep the per-image path: letterboxed, with the same names.
    [odd] = pre(torch.rand(2, 3, 20, 32))
    assert odd.content_size.tolist() == [[20, 32], [20, 32]] and odd.names == ["image 0 (Tensor)", "image 1 (Tensor)"]
