"""``python -m arrcoc.tools.gallery``: where the shipped pipeline puts its tokens on real photographs, without a question.

For each photo of scikit-image's bundle (:data:`PHOTOS`) and each budget, the patches arrcoc keeps (the shipped
:class:`arrcoc.Pipeline`, no query) beside the patches DivPrune keeps on the very same encoder features. Kept
patches are shown as they are, the rest dimmed. Writes ``<out>/<photo>.png`` (rows: budgets; columns: arrcoc,
DivPrune) and ``<out>/gallery.json`` (per photo and budget: the kept patches of both, and arrcoc's balance report),
so the gallery can be re-drawn after a default changes and the sentences of ``docs/gallery.md`` checked again.

Needs scikit-image (``pip install scikit-image``) and Pillow; imports neither until :func:`main` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PHOTOS", "DEFAULT_BUDGETS", "load_photo", "kept_patches", "render", "run", "main"]

logger = logging.getLogger(__name__)

#: scikit-image's bundled photographs used by default: faces, animals, objects, text, a fundus photo with its black
#: mask, a microscope slide, astronomy, and a plain grey scene.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle",
    "page",
    "retina",
    "rocket",
    "text",
)
DEFAULT_BUDGETS: tuple[int, ...] = (16, 64, 256)


def load_photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a scikit-image photo (gray ones repeated to three channels, alpha dropped)."""
    import skimage.data

    loader: Callable[[], Any] = skimage.data.stereo_motorcycle if name == "motorcycle" else getattr(skimage.data, name)
    image = loader()
    image = image[0] if isinstance(image, tuple) else image  # the stereo pair: its left view
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def kept_patches(positions: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(gh, gw)`` bool: the patches covered by one image's kept tokens.

    Args:
        positions: ``(T, 4)`` ``(row, col, height, width)`` in patches.
        mask: ``(T,)`` bool, True on real tokens.
        grid: ``(gh, gw)``.
    """
    kept = torch.zeros(grid, dtype=torch.bool)
    for (row, col, height, width), real in zip(positions.tolist(), mask.tolist()):  # ok-sync: drawing
        if real:
            kept[row : row + height, col : col + width] = True
    return kept


def render(image: np.ndarray, kept: Tensor, patch: int, dim: float = 0.3, tint: float = 0.35) -> np.ndarray:
    """The image with the patches in ``kept`` tinted yellow (visible on dark photos too) and the others dimmed.

    Args:
        image: ``(H, W, 3)`` uint8; pixels past the grid's extent count as not kept.
        kept: ``(gh, gw)`` bool.
        patch: patch side in pixels.
    """
    grid = np.kron(kept.numpy(), np.ones((patch, patch), bool))[: image.shape[0], : image.shape[1]]
    inside = np.zeros(image.shape[:2] + (1,), bool)
    inside[: grid.shape[0], : grid.shape[1], 0] = grid
    pixels = image.astype(np.float32)
    shown = np.where(inside, (1 - tint) * pixels + tint * np.array([255.0, 230.0, 0.0]), dim * pixels)
    return shown.round().clip(0, 255).astype(np.uint8)


def _sheet(rows: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str], side: int = 288) -> Any:
    """A grid of panels, each scaled to ``side`` pixels on its long edge, with labels; a PIL image."""
    from PIL import Image, ImageDraw

    panels = [[Image.fromarray(p) for p in row] for row in rows]
    scale = side / max(panels[0][0].size)
    w, h = (max(1, round(v * scale)) for v in panels[0][0].size)
    left, top, gap = 64, 18, 4
    sheet = Image.new("RGB", (left + len(column_labels) * (w + gap), top + len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(column_labels):
        draw.text((left + j * (w + gap) + 4, 3), label, fill="black")
    for i, (row, label) in enumerate(zip(panels, row_labels)):
        draw.text((4, top + i * (h + gap) + h // 2 - 6), label, fill="black")
        for j, panel in enumerate(row):
            sheet.paste(panel.resize((w, h), Image.Resampling.LANCZOS), (left + j * (w + gap), top + i * (h + gap)))
    return sheet


@torch.no_grad()
def run(
    out: str | Path, photos: Sequence[str] = PHOTOS, budgets: Sequence[int] = DEFAULT_BUDGETS, pipeline: Any = None
) -> dict[str, Any]:
    """Draw the gallery into ``out``; returns what ``gallery.json`` holds.

    Args:
        out: output folder (created).
        photos: names from :data:`PHOTOS` (any ``skimage.data`` photo, or ``"motorcycle"``).
        budgets: tokens per image; a budget above a photo's real patches is capped to them.
        pipeline: an :class:`arrcoc.Pipeline` (default: ``Pipeline.from_pretrained()``, the shipped one).
    """
    from ..pipeline import Pipeline
    from ..reducers import VisualInput, create_reducer

    images = {name: load_photo(name) for name in photos}  # an unknown name fails before the pipeline loads
    pipe = pipeline if pipeline is not None else Pipeline.from_pretrained()
    divprune = create_reducer("divprune")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"budgets": list(budgets), "photos": {}}
    for name, image in images.items():
        batch = pipe.preprocessor(torch.from_numpy(image).permute(2, 0, 1).float() / 255, device=pipe.device)[0]
        encoder = pipe.encoder(batch.bucket)
        features, _ = encoder.features(batch.pixels)  # (1, gh, gw, D): what both methods read
        _, patch_valid = encoder.layout(batch.pixels, batch.valid)
        grid = tuple(features.shape[1:3])
        patch = batch.bucket // grid[0]
        real = int((patch_valid > 0).sum())  # ok-sync: host-side set-up
        h, w = (int(v) for v in batch.content_size[0])
        canvas = (batch.pixels[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()  # ok-sync: drawing
        rows, entry = [], {"grid": list(grid), "real_patches": real, "bucket": batch.bucket, "budgets": {}}
        for budget in budgets:
            k = min(budget, real)
            ours = pipe(batch, budget=k)
            theirs = divprune(VisualInput(features, patch_valid=patch_valid, pixels=batch.pixels, valid=batch.valid), k)
            kept_ours = kept_patches(ours.positions[0].cpu(), ours.mask[0].cpu(), grid)  # ok-sync: drawing
            kept_theirs = kept_patches(theirs.positions[0].cpu(), torch.ones(k, dtype=torch.bool), grid)  # ok-sync
            rows.append([render(canvas, kept_ours, patch)[:h, :w], render(canvas, kept_theirs, patch)[:h, :w]])
            entry["budgets"][str(budget)] = {
                "tokens": k,
                "arrcoc": kept_ours.nonzero().tolist(),  # ok-sync: the JSON record
                "divprune": kept_theirs.nonzero().tolist(),  # ok-sync
                "balance": {
                    key: value[0].tolist()  # ok-sync: the JSON record
                    for key, value in ours.balance.items()
                    if value[0].ndim <= 1
                },
            }
        sheet = _sheet(rows, [f"{b} tokens" for b in budgets], ["arrcoc (no question)", "DivPrune"])
        sheet.quantize(256).save(out / f"{name}.png", optimize=True)  # a palette keeps docs/ small
        record["photos"][name] = entry
        logger.info("%s: %dx%d patches, %d real", name, grid[0], grid[1], real)
    (out / "gallery.json").write_text(json.dumps(record, separators=(",", ":")))
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m arrcoc.tools.gallery [--out DIR] [--photos a,b] [--budgets 16,64,256]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m arrcoc.tools.gallery",
        description="arrcoc's kept patches beside DivPrune's on scikit-image's photographs, no question.",
    )
    parser.add_argument("--out", default="docs/gallery", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--photos",
        default=",".join(PHOTOS),
        help="comma-separated skimage.data names (default: the fourteen of docs/gallery.md)",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, DEFAULT_BUDGETS)),
        help="tokens per image, comma-separated (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="arrcoc: %(message)s")
    from ..errors import ArrcocError

    try:
        budgets = [int(v) for v in args.budgets.split(",") if v.strip()]
        run(args.out, [v.strip() for v in args.photos.split(",") if v.strip()], budgets)
    except (ArrcocError, ValueError, AttributeError, ModuleNotFoundError) as err:
        print(f"arrcoc: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
