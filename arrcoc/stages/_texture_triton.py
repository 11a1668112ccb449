"""The Triton kernels behind :func:`arrcoc.stages.texture.texture_features` on CUDA: the Lab colour of every pixel
in one pass, then every patch's six texture values, one program per patch.

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. The torch form runs
about forty elementwise, convolution and pooling kernels over the full-resolution float32 planes (the Lab colour,
the Sobel response, the eroded validity, the flatness windows), each a round trip through memory; here the Lab
planes are written once and each patch's program reads them with their neighbours and keeps the rest in registers:
recomputing a neighbour's lightness where it is read (powers and cube roots nine times over) costs more than one
pass over memory (docs/decisions.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .texture import _flat_step

__all__ = ["launch"]


@triton.jit
def _linear(c):
    """sRGB in [0, 1] -> linear light (IEC 61966-2-1)."""
    return tl.where(c <= 0.04045, c / 12.92, tl.exp2(2.4 * tl.log2(tl.maximum((c + 0.055) / 1.055, 0.0))))


@triton.jit
def _cie_f(t):
    """CIE 1976's ``f``: a cube root above ``(6/29)**3``, a line below it."""
    return tl.where(
        t > 0.008856451679035631, tl.exp2(tl.log2(tl.maximum(t, 1e-12)) / 3.0), t * 7.787037037037037 + 4.0 / 29.0
    )


@triton.jit
def lab_kernel(
    pixels_ptr,  # (B, 3, H, W) float, RGB in [0, 1]
    matrix_ptr,  # (3, 3) float32, white-normalised sRGB -> XYZ
    lab_ptr,  # (B, 3, H, W) float32 out, contiguous: L/100, a/100, b/100
    width,
    area,  # H * W
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < area
    at = pixels_ptr + image * stride_pb + (offsets // width) * stride_ph + (offsets % width) * stride_pw
    r = _linear(tl.load(at, mask=ok, other=0.0).to(tl.float32))
    g = _linear(tl.load(at + stride_pc, mask=ok, other=0.0).to(tl.float32))
    b = _linear(tl.load(at + 2 * stride_pc, mask=ok, other=0.0).to(tl.float32))
    fx = _cie_f(tl.load(matrix_ptr) * r + tl.load(matrix_ptr + 1) * g + tl.load(matrix_ptr + 2) * b)
    fy = _cie_f(tl.load(matrix_ptr + 3) * r + tl.load(matrix_ptr + 4) * g + tl.load(matrix_ptr + 5) * b)
    fz = _cie_f(tl.load(matrix_ptr + 6) * r + tl.load(matrix_ptr + 7) * g + tl.load(matrix_ptr + 8) * b)
    out = lab_ptr + image * 3 * area + offsets
    tl.store(out, 1.16 * fy - 0.16, mask=ok)
    tl.store(out + area, 5.0 * (fx - fy), mask=ok)
    tl.store(out + 2 * area, 2.0 * (fy - fz), mask=ok)


@triton.jit
def texture_kernel(
    lab_ptr,  # (B, 3, H, W) float32, contiguous: lab_kernel's
    valid_ptr,  # (B, 1, H, W) float, 1 on image pixels
    out_ptr,  # (B, gh, gw, 6) float32, contiguous
    height,
    width,
    stride_vb,
    stride_vh,
    stride_vw,
    flat_range,
    PH: tl.constexpr,
    PW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    STEP: tl.constexpr,  # flatness is read on every STEP-th pixel
    RADIUS: tl.constexpr,  # its window's half-side, in samples
    SAMPLES_H: tl.constexpr,
    SAMPLES_W: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    patch_row, patch_col = tl.program_id(1), tl.program_id(2)
    area = height * width
    light_of = lab_ptr + image * 3 * area  # the L plane; a and b follow
    valid = valid_ptr + image * stride_vb

    # the patch's pixels: Lab, validity
    ry = tl.arange(0, BLOCK_H)[:, None]
    rx = tl.arange(0, BLOCK_W)[None, :]
    inside = (ry < PH) & (rx < PW)
    y = patch_row * PH + ry
    x = patch_col * PW + rx
    light = tl.load(light_of + y * width + x, mask=inside, other=0.0)
    a = tl.load(light_of + area + y * width + x, mask=inside, other=0.0)
    b = tl.load(light_of + 2 * area + y * width + x, mask=inside, other=0.0)
    v = tl.load(valid + y * stride_vh + x * stride_vw, mask=inside, other=0.0).to(tl.float32)

    # Sobel on lightness (the bucket's edge replicated), zero within one pixel of padding (validity eroded by one)
    grad_x = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    grad_y = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    interior = v
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            if dy * dy + dx * dx > 0:
                ny = tl.minimum(tl.maximum(y + dy, 0), height - 1)
                nx = tl.minimum(tl.maximum(x + dx, 0), width - 1)
                near = tl.load(light_of + ny * width + nx, mask=inside, other=0.0)
                grad_x += near * (dx * (2 - dy * dy) / 8.0)
                grad_y += near * (dy * (2 - dx * dx) / 8.0)
                ok = inside & (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)
                nv = tl.load(valid + (y + dy) * stride_vh + (x + dx) * stride_vw, mask=ok, other=3.0e38)
                interior = tl.minimum(interior, nv.to(tl.float32))
    edge = tl.sqrt(grad_x * grad_x + grad_y * grad_y) * interior

    # the patch's means over its image pixels, and the lightness's standard deviation
    patch_area = PH * PW
    weight = tl.sum(tl.sum(v, 1), 0) / patch_area
    denom = tl.maximum(weight, 1e-6)
    mean_l = tl.sum(tl.sum(light * v, 1), 0) / patch_area / denom
    mean_a = tl.sum(tl.sum(a * v, 1), 0) / patch_area / denom
    mean_b = tl.sum(tl.sum(b * v, 1), 0) / patch_area / denom
    mean_edge = tl.sum(tl.sum(edge * v, 1), 0) / patch_area / denom
    mean_l2 = tl.sum(tl.sum(light * light * v, 1), 0) / patch_area / denom
    contrast = tl.sqrt(tl.maximum(mean_l2 - mean_l * mean_l, 0.0))

    # flatness on every STEP-th pixel: a sample is flat when the image samples of its window span < flat_range
    sy = tl.arange(0, SAMPLES_H)[:, None]
    sx = tl.arange(0, SAMPLES_W)[None, :]
    sampled = (sy < PH // STEP) & (sx < PW // STEP)
    y = patch_row * PH + sy * STEP
    x = patch_col * PW + sx * STEP
    high = tl.full([SAMPLES_H, SAMPLES_W], float("-inf"), tl.float32)
    low = tl.full([SAMPLES_H, SAMPLES_W], float("inf"), tl.float32)
    for dy in tl.static_range(-RADIUS, RADIUS + 1):
        for dx in tl.static_range(-RADIUS, RADIUS + 1):
            ny = y + dy * STEP
            nx = x + dx * STEP
            ok = sampled & (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
            near = tl.load(light_of + ny * width + nx, mask=ok, other=0.0)
            picture = tl.load(valid + ny * stride_vh + nx * stride_vw, mask=ok, other=0.0) > 0
            high = tl.where(ok, tl.maximum(high, tl.where(picture, near, -1.0)), high)  # padding below every value
            low = tl.where(ok, tl.minimum(low, tl.where(picture, near, 2.0)), low)  # and above every value
    centre = sampled & (tl.load(valid + y * stride_vh + x * stride_vw, mask=sampled, other=0.0) > 0)
    flat = centre & (high - low < flat_range)
    samples = (PH // STEP) * (PW // STEP)
    image_share = tl.sum(tl.sum(centre.to(tl.float32), 1), 0) / samples
    flat_share = tl.sum(tl.sum(flat.to(tl.float32), 1), 0) / samples / tl.maximum(image_share, 1e-6)

    keep = (weight > 0).to(tl.float32)
    out = out_ptr + ((image * tl.num_programs(1) + patch_row) * tl.num_programs(2) + patch_col) * 6
    tl.store(out, mean_l * keep)
    tl.store(out + 1, mean_a * keep)
    tl.store(out + 2, mean_b * keep)
    tl.store(out + 3, mean_edge * keep)
    tl.store(out + 4, contrast * keep)
    tl.store(out + 5, flat_share * keep)


#: Pixels per program of the Lab pass.
LAB_BLOCK = 1024


def launch(pixels: Tensor, valid: Tensor, grid: tuple[int, int], matrix: Tensor, flat_range: float) -> Tensor:
    """``(B, gh, gw, 6)`` float32: :func:`arrcoc.stages.texture.texture_features` of ``pixels`` ``(B, 3, H, W)``
    and ``valid`` ``(B, 1, H, W)`` on the ``grid`` ``(gh, gw)``, with ``matrix`` the white-normalised sRGB -> XYZ
    matrix (float32, on the pixels' device)."""
    count, _, height, width = pixels.shape
    gh, gw = grid
    ph, pw = height // gh, width // gw
    step = _flat_step((ph, pw))  # as the torch form
    out = torch.empty(count, gh, gw, 6, dtype=torch.float32, device=pixels.device)
    if count == 0:
        return out
    lab = torch.empty(count, 3, height, width, dtype=torch.float32, device=pixels.device)
    lab_kernel[(count, triton.cdiv(height * width, LAB_BLOCK))](
        pixels, matrix.contiguous(), lab, width, height * width, *pixels.stride(), BLOCK=LAB_BLOCK, num_warps=4
    )
    texture_kernel[(count, gh, gw)](
        lab,
        valid,
        out,
        height,
        width,
        valid.stride(0),
        valid.stride(2),
        valid.stride(3),
        flat_range,
        PH=ph,
        PW=pw,
        BLOCK_H=triton.next_power_of_2(ph),
        BLOCK_W=triton.next_power_of_2(pw),
        STEP=step,
        RADIUS=1 if step == 2 else 2,
        SAMPLES_H=triton.next_power_of_2(ph // step),
        SAMPLES_W=triton.next_power_of_2(pw // step),
        num_warps=4,
    )
    return out
