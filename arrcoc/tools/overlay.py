"""Pictures of a result: the relevance heat map, the region grid and the tokens per region over the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..outputs import CompressionOutput, ScoreOutput

__all__ = ["render_overlay", "render_token_boxes", "heat_colors"]

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
        array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # ok-sync: drawing
        return Image.fromarray(array, "RGB")
    return image.convert("RGB")


def render_overlay(image: Image.Image | Tensor, result: ScoreOutput, index: int = 0, *, alpha: float = 0.45,
                   max_side: int = 1280) -> Image.Image:
    """Draw image ``index`` of ``result`` over its source.

    Args:
        image: the source, as a PIL image or a ``(3, H, W)`` float tensor in [0, 1] (``load_image``'s output).
        result: what the pipeline returned for it.
        index: which image of the result.
        alpha: opacity of the heat map.
        max_side: the picture is scaled down so its long side is at most this (aspect kept).

    Returns:
        An RGB image with the same aspect ratio as the source: relevance as a heat map, the region grid, and,
        for a :class:`CompressionOutput`, each region's number of tokens written in its cell.
    """
    base = _to_pil(image)
    width, height = base.size
    zoom = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * zoom)), max(1, round(height * zoom)))
    base = base.resize(size, Image.Resampling.LANCZOS) if size != base.size else base.copy()

    rh, rw = (int(v) for v in result.region_grid[index])
    cell = result.patch_pixels(index) * result.region_size * zoom * width / float(result.source_size[index, 1])
    relevance = result.relevance[index, :rh, :rw].float().cpu().numpy()  # ok-sync: drawing
    heat = heat_colors(relevance / max(float(relevance.max()), 1e-12))  # (rh, rw, 3)
    heat_image = Image.fromarray(heat, "RGB").resize((max(1, round(rw * cell)), max(1, round(rh * cell))), Image.Resampling.NEAREST)
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
    if isinstance(result, CompressionOutput):
        font = ImageFont.load_default(size=max(8, min(24, int(cell / 3))))
        allocation = result.allocation[index, :rh, :rw].cpu()  # ok-sync: drawing
        for row in range(rh):
            for col in range(rw):
                centre = ((col + 0.5) * cell, (row + 0.5) * cell)
                if centre[0] < size[0] and centre[1] < size[1]:
                    draw.text(centre, str(int(allocation[row, col])), fill=(255, 255, 255), font=font, anchor="mm",
                              stroke_width=2, stroke_fill=(0, 0, 0))
    return picture


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
