"""A synthetic street-like scene, drawn offline, for the demo and for sanity tests of the scorers.

It has what relevance must tell apart: a flat sky and a flat wall (little information), a sign with small
text, a few coloured shapes, and a textured strip. ``scene_regions`` says where each part is.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

__all__ = ["demo_scene", "scene_regions"]


def scene_regions(width: int = 640, height: int = 480) -> dict[str, tuple[int, int, int, int]]:
    """Boxes ``(left, top, right, bottom)`` of the parts of :func:`demo_scene` at this size."""
    return {
        "sky": (0, 0, width, height * 2 // 5),
        "wall": (0, height * 2 // 5, width // 2, height * 4 // 5),
        "sign": (width * 3 // 5, height * 9 // 20, width * 9 // 10, height * 13 // 20),
        "ground": (0, height * 4 // 5, width, height),
    }


def demo_scene(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """Draw the scene as an RGB PIL image; the same seed draws the same picture."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    parts = scene_regions(width, height)
    sky = parts["sky"]
    for y in range(sky[1], sky[3]):  # a smooth gradient: flat to the eye, little to say
        shade = int(150 + 60 * y / max(1, sky[3]))
        draw.line([(0, y), (width, y)], fill=(shade - 40, shade - 10, 235))
    draw.rectangle(parts["wall"], fill=(182, 170, 150))
    draw.rectangle((width // 2, height * 2 // 5, width, height * 4 // 5), fill=(120, 124, 130))
    ground = parts["ground"]
    draw.rectangle(ground, fill=(100, 96, 88))
    for _ in range(6000):  # gravel: texture without meaning
        x, y = rng.randrange(width), rng.randrange(ground[1], ground[3])
        g = rng.randrange(60, 140)
        draw.point((x, y), fill=(g, g, g - 10))
    size = max(2, min(width, height) // 20)
    for _ in range(4):  # a few coloured shapes on the right side, below the sign
        x = rng.randrange(width // 2, max(width // 2 + 1, width - size))
        y = rng.randrange(height * 13 // 20, max(height * 13 // 20 + 1, height * 4 // 5 - size))
        colour = rng.choice([(220, 40, 40), (40, 160, 60), (240, 200, 30), (40, 80, 200)])
        draw.ellipse((x, y, x + size, y + size), fill=colour)
    sign = parts["sign"]
    draw.rectangle(sign, fill=(200, 30, 30), outline=(255, 255, 255), width=3)
    font = ImageFont.load_default()
    lines = ["NO PARKING", "8AM - 6PM", "MON - FRI"]
    for i, line in enumerate(lines):
        draw.text((sign[0] + 12, sign[1] + 10 + i * 16), line, fill=(255, 255, 255), font=font)
    return image
