"""The Triton kernel behind :func:`arrcoc.stages.balance.frame_patches` on CUDA: the whole border search in one
launch, where torch takes two launches per step of the fill and about 25 more (about 40 on a 14 x 14 grid, 90 on
64 x 64).

Imported only when a CUDA call first needs it, so that importing arrcoc does not import Triton. One program per
image, its grid in registers. Each 8-neighbour dilation stores the grid to a ``(B, N)`` work buffer and reads each
cell's neighbours back after a barrier (threads read cells other threads wrote). Every value is 0 or 1 and the
sums count cells, so the result is the torch form's, bit for bit, but where a patch's chroma (``sqrt(a² + b²)``,
rounded once here, by ``torch.linalg.vector_norm`` there) lies within a rounding of the bound itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import launch_device

__all__ = ["launch"]


@triton.jit
def _dilate(cells, work_row, row, col, gh, gw, offs, inside_grid, off_grid):
    """8-neighbour dilation of ``cells`` (int32 0/1, one program's grid) through the work buffer; cells off the grid
    count as ``off_grid``."""
    tl.debug_barrier()  # earlier reads of the buffer are done
    tl.store(work_row + offs, cells, mask=inside_grid)
    tl.debug_barrier()  # every cell is written before any is read
    out = cells
    for dr in tl.static_range(-1, 2):
        for dc in tl.static_range(-1, 2):
            r, c = row + dr, col + dc
            on_grid = inside_grid & (r >= 0) & (r < gh) & (c >= 0) & (c < gw)
            out = tl.maximum(out, tl.load(work_row + r * gw + c, mask=on_grid, other=off_grid))
    return out


@triton.jit
def frame_kernel(
    flat_ptr,  # (B, N) float32, patches flat_patch apart
    valid_ptr,  # (B, N) float32 share of each patch that is image
    colour_ptr,  # (B, N, >= 3) float32 L*a*b* / 100, patches colour_patch and channels colour_channel apart (COLOUR)
    out_ptr,  # (B, N) uint8 out
    work_ptr,  # (B, N) int32 scratch
    gh,
    gw,
    steps,
    solid,
    touched,
    chroma,
    flat_image,
    flat_patch,
    colour_image,
    colour_patch,
    colour_channel,
    BLOCK: tl.constexpr,
    COLOUR: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    n = gh * gw
    offs = tl.arange(0, BLOCK)
    inside_grid = offs < n
    row, col = offs // gw, offs % gw
    base = image * n
    flat = tl.load(flat_ptr + image * flat_image + offs * flat_patch, mask=inside_grid, other=0.0)
    valid = (tl.load(valid_ptr + base + offs, mask=inside_grid, other=0.0) > 0).to(tl.int32)
    colourless = tl.full([BLOCK], 1, tl.int32)  # without colour, any colour may be a fill
    if COLOUR:  # the chroma, sqrt(a² + b²), below the bound: black, grey or white
        a_star = colour_ptr + image * colour_image + offs * colour_patch + colour_channel
        a = tl.load(a_star, mask=inside_grid, other=0.0)
        b = tl.load(a_star + colour_channel, mask=inside_grid, other=0.0)
        colourless = (tl.sqrt_rn(a * a + b * b) < chroma).to(tl.int32)
    work_row = work_ptr + base
    # the image's edge: image patches with a neighbour that is padding or off the grid
    edge = valid * _dilate(1 - valid, work_row, row, col, gh, gw, offs, inside_grid, 1)
    inside = (flat >= solid).to(tl.int32) * valid * colourless
    passable = tl.maximum(inside, edge * (flat >= touched).to(tl.int32))
    fill = inside * edge  # where a fill starts: a solid patch on the edge
    for _ in range(steps):
        fill = _dilate(fill, work_row, row, col, gh, gw, offs, inside_grid, 0) * passable
    border = _dilate(fill, work_row, row, col, gh, gw, offs, inside_grid, 0) * valid  # the fill and its rim
    rest = valid * (1 - border)
    framed = (tl.max(fill, 0) > 0) & (2 * tl.sum(inside * rest, 0) < tl.sum(rest, 0))
    out = tl.maximum(border, inside) * framed.to(tl.int32)
    tl.store(out_ptr + base + offs, out.to(tl.uint8), mask=inside_grid)


def launch(
    flat: Tensor, patch_valid: Tensor, colour: Tensor | None, solid: float, touched: float, chroma: float
) -> Tensor:
    """``flat`` and ``patch_valid`` ``(B, gh, gw)``, ``colour`` ``(B, gh, gw, 3)`` or ``None`` -> the border,
    ``(B, gh, gw)`` bool, as :func:`arrcoc.stages.balance.frame_patches` finds it; grids of at most
    :data:`arrcoc.stages.balance.FRAME_CELL_LIMIT` patches. ``flat`` and ``colour`` are read where they lie (the
    texture's channels) when each image's patches are one stride apart, as in any slice of a contiguous tensor."""
    b, gh, gw = flat.shape
    flat, flat_strides = _in_line(flat.float())
    valid = patch_valid.float().contiguous()
    colour_strides = (0, 0, 0)
    if colour is not None:
        colour, strides = _in_line(colour.float())
        colour_strides = (*strides, colour.stride(3))
    out = torch.empty(b, gh, gw, dtype=torch.uint8, device=flat.device)
    if b == 0 or gh * gw == 0:
        return out.bool()
    work = torch.empty(b, gh * gw, dtype=torch.int32, device=flat.device)
    block = triton.next_power_of_2(gh * gw)
    steps = max(1, max(gh, gw) // 2)
    with launch_device(flat):
        frame_kernel[(b,)](
            flat, valid, colour if colour is not None else flat, out, work, gh, gw, steps, solid, touched,
            float(chroma), *flat_strides, *colour_strides,
            BLOCK=block, COLOUR=colour is not None, num_warps=max(1, min(16, block // 256)), enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(torch.bool)


def _in_line(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """``x`` ``(B, gh, gw, ...)``, or a copy, whose patches (row-major) lie one stride apart in each image, and its
    image and patch strides."""
    gh, gw = x.shape[1:3]
    if gh > 1 and gw > 1 and x.stride(1) != gw * x.stride(2):
        x = x.contiguous()
    return x, (x.stride(0), x.stride(2) if gw > 1 else x.stride(1))
