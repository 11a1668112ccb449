"""The letterbox's Triton kernels (``arrcoc.stages._resize_triton``): the Preprocessor's pixels, each image's
independent of the batch around it, and the padding at ``pad_value``.

On CPU the kernels run in Triton's interpreter, in one subprocess (``TRITON_INTERPRET`` must be set before Triton is
imported); the images are small because the interpreter runs each program in Python. The ``cuda`` tests run the
compiled kernels through :func:`letterbox` on photo-sized images.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from arrcoc.stages import gpu_input
from arrcoc.stages.gpu_input import letterbox, placement
from arrcoc.stages.preprocess import Preprocessor

HAS_TRITON = importlib.util.find_spec("triton") is not None
BUCKETS = (32, 64)
#: up- and down-sampling (down by 4.7, a filter of 11 taps), portrait and landscape, an exact fit, one pixel row
SHAPES = [(20, 32), (32, 15), (1, 5), (150, 40), (32, 32), (40, 64), (64, 30), (90, 300), (64, 64)]


def _images(shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]


def _packed(images: list[torch.Tensor], buckets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """``flat``, ``meta``, source shapes and content sizes of images, as :func:`letterbox` hands them over."""
    shapes = [tuple(image.shape[1:]) for image in images]
    sizes = [placement(h, w, buckets)[2] for h, w in shapes]
    offsets = [0]
    for image in images[:-1]:
        offsets.append(offsets[-1] + image.numel())
    meta = torch.tensor([[o, h, w, ch, cw] for o, (h, w), (ch, cw) in zip(offsets, shapes, sizes)])
    return torch.cat([image.reshape(-1) for image in images]), meta, shapes, sizes


def _interpret_all() -> dict[str, object]:
    """Every check through the interpreted kernels; run with ``TRITON_INTERPRET=1`` before Triton is imported."""
    from arrcoc.stages import _resize_triton

    images = _images(SHAPES)
    preprocessor = Preprocessor(BUCKETS, multiple=1)
    out: dict[str, object] = {}
    for bucket in BUCKETS:
        chosen = [image for image in images if placement(*image.shape[1:], BUCKETS)[0] == bucket]
        flat, meta, shapes, sizes = _packed(chosen, BUCKETS)
        got = _resize_triton.launch(flat, meta, shapes, sizes, bucket, 0.0)
        (want,) = preprocessor(chosen)
        out[f"error-{bucket}"] = (got - want.pixels).abs().max().item()
        padded = _resize_triton.launch(flat, meta, shapes, sizes, bucket, 0.5)
        content = want.valid.bool().expand_as(padded)
        out[f"pad-{bucket}"] = bool((padded[~content] == 0.5).all()) and torch.equal(padded[content], got[content])
        # alone, each image reads the same bits (the batch's widest filter only adds taps of weight 0)
        out[f"alone-{bucket}"] = all(
            torch.equal(_resize_triton.launch(*_packed([image], BUCKETS), bucket, 0.0)[0], got[row])
            for row, image in enumerate(chosen)
        )
    return out


@pytest.mark.parametrize("bucket", BUCKETS)
def test_interpreted_kernels_give_the_preprocessors_pixels(interpreted: dict[str, object], bucket: int) -> None:
    assert interpreted[f"error-{bucket}"] < 1e-6, interpreted


@pytest.mark.parametrize("bucket", BUCKETS)
def test_interpreted_kernels_pad_with_pad_value(interpreted: dict[str, object], bucket: int) -> None:
    assert interpreted[f"pad-{bucket}"]


@pytest.mark.parametrize("bucket", BUCKETS)
def test_interpreted_kernels_resize_each_image_as_alone(interpreted: dict[str, object], bucket: int) -> None:
    assert interpreted[f"alone-{bucket}"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_taps_reach_every_weighted_source_pixel() -> None:
    from arrcoc.stages import _resize_triton
    from arrcoc.stages.gpu_input import resize_weights

    for source, content in ((1600, 384), (300, 64), (150, 32), (5, 32), (384, 384), (1001, 7), (97, 96)):
        weights = resize_weights(torch.tensor([source]), torch.tensor([content]), source, content, torch.float64)[0]
        reach = (weights > 0).sum(-1).max().item()  # (S, W): the most source pixels one output pixel weighs
        assert reach <= _resize_triton.taps(source, content), (source, content, reach)


@pytest.mark.cuda
@pytest.mark.parametrize("pad_value", [0.0, 0.5])
def test_the_kernels_on_the_gpu_give_the_preprocessors_pixels(pad_value: float) -> None:
    shapes = [(960, 1280), (1600, 640), (300, 384), (384, 384), (1, 900), (200, 150), (1199, 1601)]
    buckets = (224, 384)
    images = _images(shapes, seed=1)
    preprocessor = Preprocessor(buckets, multiple=1, pad_value=pad_value)
    assert gpu_input.USE_KERNEL
    for bucket in buckets:
        chosen = [image for image in images if placement(*image.shape[1:], buckets)[0] == bucket]
        sizes = [placement(*image.shape[1:], buckets)[2] for image in chosen]
        (want,) = preprocessor(chosen)
        pixels, valid = letterbox([image.cuda() for image in chosen], sizes, bucket, pad_value=pad_value)
        # float32 filter centres sit about 1e-4 source pixels apart near x = 1,600: 3.0e-5 measured, against 3.9e-3
        # for one 8-bit level (the CPU interpreter's small images agree to 2e-7)
        torch.testing.assert_close(pixels.cpu(), want.pixels, atol=1e-4, rtol=0)
        assert torch.equal(valid.cpu(), want.valid)


if __name__ == "__main__":  # the interpreter run behind `interpreted`: prints one JSON line
    print(json.dumps(_interpret_all()))
