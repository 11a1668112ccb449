"""Pictures of a result: the relevance heat map, the region grid and the tokens per region over the image, with a
colour bar and a legend; and the kept patches themselves."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..outputs import CompressionOutput, ScoreOutput

__all__ = ["render_overlay", "render_kept_tokens", "render_token_boxes", "kept_tokens", "heat_colors"]

# Anchors of a perceptually ordered dark-to-bright ramp (after matplotlib's "inferno").
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB of the same shape plus a last axis of 3."""
    position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    t = (position - low)[..., None]
    return ((1 - t) * _RAMP[low] + t * _RAMP[low + 1]).round().astype(np.uint8)


def _to_pil(image: Image.Image | Tensor) -> Image.Image:
    if isinstance(image, Tensor):
        array = (
            (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # ok-sync
        )  # drawing
        return Image.fromarray(array, "RGB")
    return image.convert("RGB")


def _fit(image: Image.Image | Tensor, max_side: int) -> Image.Image:
    """``image`` as RGB, scaled down (aspect kept) so that its long side is at most ``max_side``."""
    base = _to_pil(image)
    zoom = min(1.0, max_side / max(base.size))
    size = (max(1, round(base.width * zoom)), max(1, round(base.height * zoom)))
    return base.resize(size, Image.Resampling.LANCZOS) if size != base.size else base.copy()


def render_overlay(
    image: Image.Image | Tensor,
    result: ScoreOutput,
    index: int = 0,
    *,
    alpha: float = 0.45,
    max_side: int = 1280,
    legend: bool = True,
) -> Image.Image:
    """Draw image ``index`` of ``result`` over its source.

    Args:
        image: the source, as a PIL image or a ``(3, H, W)`` float tensor in [0, 1] (``load_image``'s output).
        result: what the pipeline returned for it.
        index: which image of the result.
        alpha: opacity of the heat map.
        max_side: the picture is scaled down so its long side is at most this (aspect kept).
        legend: add a strip below with the colour bar (relevance, low to high) and what the lines and numbers
            mean.

    Returns:
        An RGB image whose top ``W x H`` part has the source's aspect ratio: relevance as a heat map, the region
        grid, and, for a :class:`CompressionOutput`, each region's number of tokens, small, with a dark halo, in
        its cell's top-left corner (the content stays visible). With ``legend``, a strip below it.
    """
    base = _fit(image, max_side)
    size = base.size
    rh, rw = (int(v) for v in result.region_grid[index])
    cell = result.patch_pixels(index) * result.region_size * size[0] / float(result.source_size[index, 1])
    relevance = result.relevance[index, :rh, :rw].float().cpu().numpy()  # ok-sync: drawing
    heat = heat_colors(relevance / max(float(relevance.max()), 1e-12))  # (rh, rw, 3)
    heat_image = Image.fromarray(heat, "RGB").resize(
        (max(1, round(rw * cell)), max(1, round(rh * cell))), Image.Resampling.NEAREST
    )
    layer = base.copy()
    layer.paste(heat_image.crop((0, 0, size[0], size[1])), (0, 0))
    picture = Image.blend(base, layer, alpha)

    draw = ImageDraw.Draw(picture)
    for col in range(1, rw):  # region borders inside the picture
        x = round(col * cell)
        if x < size[0]:
            draw.line([(x, 0), (x, size[1] - 1)], fill=(255, 255, 255), width=1)
    for row in range(1, rh):
        y = round(row * cell)
        if y < size[1]:
            draw.line([(0, y), (size[0] - 1, y)], fill=(255, 255, 255), width=1)
    compressed = isinstance(result, CompressionOutput)
    if compressed:
        font = ImageFont.load_default(size=max(7, min(14, int(cell / 5))))
        allocation = result.allocation[index, :rh, :rw].cpu()  # ok-sync: drawing
        inset = max(2, round(cell / 16))
        for row in range(rh):
            for col in range(rw):
                corner = (col * cell + inset, row * cell + inset)
                if corner[0] < size[0] and corner[1] < size[1]:
                    draw.text(
                        corner,
                        str(int(allocation[row, col])),
                        fill=(255, 255, 255),
                        font=font,
                        anchor="lt",
                        stroke_width=1,
                        stroke_fill=(0, 0, 0),
                    )
    if not legend:
        return picture
    budget = int(result.budget[index]) if compressed else None
    return _with_legend(picture, budget, result.region_size)


def _with_legend(picture: Image.Image, budget: int | None, region_size: int) -> Image.Image:
    """``picture`` above a strip: the colour bar of relevance (low to high), then what the grid and numbers are."""
    width = picture.width
    font_size = max(9, min(16, round(width / 40)))
    font = ImageFont.load_default(size=font_size)
    pad = max(3, font_size // 2)
    strip = Image.new("RGB", (width, 3 * font_size + 4 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    low, high = "relevance: low", "high"
    x0 = pad + round(draw.textlength(low, font=font)) + pad
    x1 = width - pad - round(draw.textlength(high, font=font)) - pad
    bar_top, bar_bottom = pad, pad + font_size
    draw.text((pad, (bar_top + bar_bottom) / 2), low, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((width - pad, (bar_top + bar_bottom) / 2), high, fill=(0, 0, 0), font=font, anchor="rm")
    if x1 > x0:
        ramp = heat_colors(np.linspace(0.0, 1.0, x1 - x0))[None].repeat(bar_bottom - bar_top, axis=0)
        strip.paste(Image.fromarray(ramp, "RGB"), (x0, bar_top))
        draw.rectangle((x0 - 1, bar_top - 1, x1, bar_bottom), outline=(0, 0, 0))
    grid = f"lines: regions of {region_size}x{region_size} patches"
    lines = [grid if budget is None else f"{grid}; numbers: tokens kept per region ({budget} in all)"]
    if draw.textlength(lines[0], font=font) > width - 2 * pad:
        lines = [f"lines: {region_size}x{region_size}-patch regions"] + (
            [] if budget is None else [f"numbers: tokens ({budget} in all)"]
        )
        strip = strip.resize((width, strip.height + (len(lines) - 1) * (font_size + pad)))
        strip.paste((255, 255, 255), (0, bar_bottom + 1, width, strip.height))
        draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((pad, bar_bottom + pad + i * (font_size + pad)), line, fill=(0, 0, 0), font=font, anchor="lt")
    out = Image.new("RGB", (width, picture.height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def kept_tokens(result: CompressionOutput, index: int = 0) -> list[list[int]]:
    """``[row, col, height, width]`` in patches of the area of each token image ``index`` keeps, in token order."""
    keep = result.mask[index].cpu()  # ok-sync: reporting
    return result.positions[index].cpu()[keep].tolist()  # ok-sync: reporting


def render_kept_tokens(
    image: Image.Image | Tensor, result: CompressionOutput, index: int = 0, *, max_side: int = 1280
) -> Image.Image:
    """The patches image ``index`` keeps, as they lie in its source: the rest dimmed, each token's area outlined
    (:func:`render_token_boxes`); scaled down as :func:`render_overlay` scales (no legend)."""
    base = _fit(image, max_side)
    side = result.patch_pixels(index) * base.width / float(result.source_size[index, 1])  # picture pixels per patch
    boxes = []
    for row, col, height, width in kept_tokens(result, index):
        x0, y0 = round(col * side), round(row * side)
        x1, y1 = min(base.width, round((col + width) * side)), min(base.height, round((row + height) * side))
        if x1 > x0 and y1 > y0:  # a token never stands for padding; its patch may only overhang the edge
            boxes.append((x0, y0, x1, y1))
    return render_token_boxes(base, boxes)


def render_token_boxes(image: Image.Image, boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    """``image`` dimmed outside the areas that visual tokens cover, each ``(x0, y0, x1, y1)`` pixel box outlined."""
    rgb = image.convert("RGB")
    dim = Image.blend(rgb, Image.new("RGB", image.size, (0, 0, 0)), 0.6)
    for box in boxes:
        dim.paste(rgb.crop(box), box[:2])
    draw = ImageDraw.Draw(dim)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255))
    return dim
