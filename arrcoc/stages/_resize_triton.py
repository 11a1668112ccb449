"""The Triton kernels behind :func:`arrcoc.stages.gpu_input.letterbox` on CUDA: a bucket's antialiased bilinear
resize, read straight from the images' packed bytes, in two launches (along each row, then along each column).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. The matrix-product
form (the CPU's) pads every image to the batch's largest source, so a batch of photos moves ``B x 3 x 1,600 x 1,600``
values, and builds dense weight matrices as large, to make ``B x 3 x 384 x 384``; here each output value reads only
the taps of its filter, about ``2 * scale + 1`` along each axis, from its own image (64 photos on the H200: 2.6 ms of
device time against 11.6; ``bench/results/dataset-steps-nvidia-h200.txt``). The weights are the ones ``F.interpolate(..., mode="bilinear", antialias=True)`` uses,
computed in float32 where they are read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch"]

#: Output rows (or source rows, in the first pass) and columns of one program.
BLOCK_ROWS = 16
BLOCK_COLS = 64


@triton.jit
def _tile(BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's plane (``image * 3 + channel``), image, channel, and its block's row and column indices."""
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(2) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return plane, (plane // 3).to(tl.int64), plane % 3, rows, cols  # the image in 64 bits: offsets past 2**31


@triton.jit
def _meta(meta_ptr, image):
    """An image's row of ``meta``: offset into the packed bytes, height, width, content height, content width."""
    row = meta_ptr + image * 5
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _footprint(source, content, outputs):
    """Where the filters of output pixels ``outputs`` sit along an axis of ``source`` pixels resized to ``content``:
    ``(centre, first source pixel with weight, 1 / half-width)``, in source pixel units."""
    scale = source.to(tl.float32) / content.to(tl.float32)  # source pixels per output pixel
    support = tl.maximum(scale, 1.0)  # the filter widens when shrinking
    center = scale * (outputs.to(tl.float32) + 0.5)
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    return center, first, 1.0 / support


@triton.jit
def _tap(first, tap, center, inverse, ok, source):
    """Each output pixel's source pixel ``first + tap``, whether it is read, and its antialiased bilinear (triangle)
    weight: 0 for an output pixel outside ``ok`` and past the ``source`` pixels."""
    position = first + tap
    inside = ok & (position < source)
    weight = tl.maximum(1.0 - tl.abs((position.to(tl.float32) + 0.5 - center) * inverse), 0.0)
    return position, inside, tl.where(inside, weight, 0.0)


@triton.jit
def _along_rows_kernel(
    flat_ptr,  # every image's (3, h, w) uint8 bytes, one after another
    meta_ptr,  # (B, 5) int64: offset into flat, h, w, content h, content w
    out_ptr,  # (B, 3, span_h, S) float32: each source row resampled to the content width (rows past h unwritten)
    taps,
    stride_ob,
    stride_oc,
    stride_oh,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    plane, image, channel, rows, cols = _tile(BLOCK_ROWS, BLOCK_COLS)  # rows: source rows; cols: output columns
    offset, height, width, _, content = _meta(meta_ptr, image)
    center, first, inverse = _footprint(width, content, cols)  # (COLS,) each
    row_ok = rows < height
    col_ok = cols < content
    base = flat_ptr + offset + (channel * height + rows.to(tl.int64)) * width  # (ROWS,) each row's start
    total = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    norm = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for tap in range(0, taps):
        x, inside, w = _tap(first, tap, center, inverse, col_ok, width)  # (COLS,) each
        value = tl.load(base[:, None] + x[None, :], mask=row_ok[:, None] & inside[None, :], other=0)
        total += value.to(tl.float32) * w[None, :]
        norm += w
    total = total / tl.maximum(norm, 1e-30)[None, :]
    out = out_ptr + image * stride_ob + channel * stride_oc + rows[:, None] * stride_oh + cols[None, :]
    tl.store(out, total, mask=row_ok[:, None] & col_ok[None, :])  # all the second pass reads


@triton.jit
def _along_columns_kernel(
    rows_ptr,  # (B, 3, span_h, S) float32: the first pass
    meta_ptr,  # (B, 5) int64
    out_ptr,  # (B, 3, S, S) float32 in [0, 1], pad_value beyond the content
    taps,
    level,  # the input's full scale (255 for bytes)
    pad_value,
    stride_rb,
    stride_rc,
    stride_rh,
    bucket,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    plane, image, channel, rows, cols = _tile(BLOCK_ROWS, BLOCK_COLS)  # output rows and columns
    _, height, _, content_h, content_w = _meta(meta_ptr, image)
    center, first, inverse = _footprint(height, content_h, rows)  # (ROWS,) each
    row_ok = rows < content_h
    col_ok = cols < content_w
    source = rows_ptr + image * stride_rb + channel * stride_rc
    total = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    norm = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for tap in range(0, taps):
        y, inside, w = _tap(first, tap, center, inverse, row_ok, height)  # (ROWS,) each
        value = tl.load(
            source + y[:, None] * stride_rh + cols[None, :], mask=inside[:, None] & col_ok[None, :], other=0.0
        )
        total += value * w[:, None]
        norm += w
    total = total / tl.maximum(norm, 1e-30)[:, None] / level
    # as the Preprocessor: antialiased resampling can overshoot slightly
    total = tl.minimum(tl.maximum(total, 0.0), 1.0)
    total = tl.where(row_ok[:, None] & col_ok[None, :], total, pad_value)
    out = out_ptr + plane.to(tl.int64) * bucket * bucket + rows[:, None] * bucket + cols[None, :]
    tl.store(out, total, mask=(rows[:, None] < bucket) & (cols[None, :] < bucket))


def taps(source: int, content: int) -> int:
    """Source pixels one output pixel's filter can reach along an axis (an upper bound: extra taps weigh 0)."""
    return math.ceil(2 * max(source / content, 1.0)) + 1


def launch(
    flat: Tensor,
    meta: Tensor,
    shapes: list[tuple[int, int]],
    sizes: list[tuple[int, int]],
    bucket: int,
    pad_value: float,
) -> Tensor:
    """Resize and pad a bucket's images: ``(B, 3, S, S)`` float32 in [0, 1].

    Args:
        flat: every image's ``(3, h, w)`` uint8 bytes one after another (1-D).
        meta: ``(B, 5)`` int64 on ``flat``'s device: offset into ``flat``, ``h``, ``w``, content ``h``, content ``w``.
        shapes, sizes: the same sources' ``(h, w)`` and contents' ``(h, w)`` as host ints (the launch's bounds).
        bucket: the square side ``S``; pad_value: the value beyond each image's content.
    """
    count = len(shapes)
    span_h = max(h for h, _ in shapes)
    taps_w = max(taps(w, cw) for (_, w), (_, cw) in zip(shapes, sizes))
    taps_h = max(taps(h, ch) for (h, _), (ch, _) in zip(shapes, sizes))
    rows = torch.empty(count, 3, span_h, bucket, dtype=torch.float32, device=flat.device)  # (B, 3, H, S)
    pixels = torch.empty(count, 3, bucket, bucket, dtype=torch.float32, device=flat.device)  # (B, 3, S, S)
    grid = (count * 3, triton.cdiv(span_h, BLOCK_ROWS), triton.cdiv(bucket, BLOCK_COLS))
    _along_rows_kernel[grid](
        flat, meta, rows, taps_w, *rows.stride()[:3], BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=4
    )
    grid = (count * 3, triton.cdiv(bucket, BLOCK_ROWS), triton.cdiv(bucket, BLOCK_COLS))
    _along_columns_kernel[grid](
        rows,
        meta,
        pixels,
        taps_h,
        255.0,
        float(pad_value),
        *rows.stride()[:3],
        bucket,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=BLOCK_COLS,
        num_warps=4,
    )
    return pixels
