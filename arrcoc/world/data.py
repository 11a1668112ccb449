"""A generated visual-question world: cluttered scenes, small framed text, questions whose answers live in boxes.

Every sample is a pure function of its seed (and size and family), so a dataset of any size needs no files.
Scenes hold 3-12 shapes (4 shapes x 6 colours, 3%-12% of the side) and 1-3 framed text labels (2-5 letters
or digits, one glyph about one ViT patch wide at every size) on a cluttered background (gradient, noise,
grey distractor strokes). Seven question families ask about them; each sample carries its answer and the
pixel boxes that hold the evidence, the relevance target of the participatory scorer and of the
"tokens inside the answer boxes" measurement.

Questions are unambiguous by construction: the shape a "color" or "side" question names is unique, the
colour a "shape" question names is worn by exactly one shape, and text frames never share the colour a
shape question, a count question or an exists question names.

Six families name their evidence (a colour, a shape, a framed label). The seventh, "total" ("How many shapes
are there?"), does not: its evidence is every shape in the scene, and the framed labels are distractors that
look like objects but are not shapes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import InvalidInputError

__all__ = [
    "QUESTION_FAMILIES",
    "COLORS",
    "SHAPES",
    "TEXT_ALPHABET",
    "WORDS",
    "VQASample",
    "make_sample",
    "VQADataset",
    "answer_vocabulary",
    "TOTAL_RANGE",
]

logger = logging.getLogger(__name__)

#: The question families, in the order reports list them. "total" comes last: ``make_sample(seed)`` draws a
#: family from this tuple, and with the new one last a seed that drew one of the first six before still draws it
#: (and gives the same sample) or now draws "total" (``random.choice`` reads 3 bits for 6 or 7 choices alike).
QUESTION_FAMILIES: tuple[str, ...] = ("color", "shape", "count", "text", "exists", "side", "total")

#: Colour names and their RGB, saturated so that they stand apart from the muted, grey background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (145, 40, 195),
    "cyan": (25, 205, 215),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: Glyphs of the framed text: capitals and digits minus look-alikes (O/0, I/1, S/5, Z/2, B/8).
TEXT_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY34679"

#: Every word the questions and the one-word answers use (texts to read are spelled glyph by glyph instead):
#: the small VLM's tokenizer gives each one id (see :class:`arrcoc.stages.tokenizer.CharTokenizer`).
WORDS: tuple[str, ...] = (
    "What",
    "Which",
    "How",
    "Is",
    "color",
    "shape",
    "side",
    "is",
    "the",
    "on",
    "one",
    "many",
    "shapes",
    "are",
    "there",
    "does",
    "text",
    "in",
    "box",
    "say",
    *COLORS,
    *SHAPES,
    "yes",
    "no",
    "left",
    "right",
)

MAX_COUNT = 4
#: Shapes in a "total" scene (its answers). At the top of the range, 8 shapes and up to 2 labels are about the
#: 11 tokens of the 5.5% budget at 224 px, so which tokens a method keeps decides the count; below 2 the
#: question is a presence check. The small VLM was trained to count to ``MAX_COUNT`` only, so the range stays
#: where a short fine-tune can still count with every token.
TOTAL_RANGE = (2, 8)
_MIN_OBJECTS, _MAX_OBJECTS = 3, 12
_SIZE_RANGE = (0.03, 0.12)  # object side, as a share of the image side
_GLYPH = 0.072  # glyph height as a share of the image side (about one 16-pixel patch at 224)


@dataclass(frozen=True)
class VQASample:
    """One generated question about one generated image.

    Attributes:
        image: RGB, ``size x size``.
        question: the question, plain English.
        answer: the expected answer (lower case words, a digit, or the text's capitals and digits).
        family: one of ``QUESTION_FAMILIES``.
        boxes: ``(x0, y0, x1, y1)`` pixel boxes (exclusive ends) of what holds the answer; for an "exists"
            question answered "no", the near misses (same shape or same colour) one has to look at; for a
            "total" question, every shape.
        layout: everything drawn, as ``(kind, name, box)``: a shape (kind in ``SHAPES``, name its colour), a
            text frame (``"text"``, its colour) and each of its glyphs (``"glyph"``, the character); dense
            labels for training.
    """

    image: Image.Image
    question: str
    answer: str
    family: str
    boxes: tuple[tuple[int, int, int, int], ...]
    layout: tuple[tuple[str, str, tuple[int, int, int, int]], ...] = ()


@dataclass
class _Item:
    kind: str  # a shape name, or "text"
    color: str
    side: int  # pixels; for text: the glyph height
    text: str = ""
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


def answer_vocabulary() -> dict[str, tuple[str, ...]]:
    """The closed answer set of each family (``"text"`` is open: any 2-5 glyphs of ``TEXT_ALPHABET``)."""
    return {
        "color": tuple(COLORS),
        "shape": SHAPES,
        "count": tuple(str(k) for k in range(1, MAX_COUNT + 1)),
        "text": (),
        "exists": ("yes", "no"),
        "side": ("left", "right"),
        "total": tuple(str(k) for k in range(TOTAL_RANGE[0], TOTAL_RANGE[1] + 1)),
    }


# --- drawing ------------------------------------------------------------------------------------------------
@cache
def _font() -> ImageFont.ImageFont:
    # The classic bitmap font, embedded in Pillow: the same pixels on every machine, no FreeType needed.
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


@lru_cache(maxsize=4096)
def _glyphs(text: str, height: int) -> Image.Image:
    """``text`` as a black-on-white "L" image ``height`` pixels tall (bitmap font, scaled without smoothing)."""
    font = _font()
    x0, y0, x1, y1 = font.getbbox(text)
    canvas = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 255)
    ImageDraw.Draw(canvas).text((1 - x0, 1 - y0), text, fill=0, font=font)
    ink = canvas.point(lambda v: 255 - v).getbbox()  # the font's box has empty rows above the capitals
    canvas = canvas.crop((ink[0] - 1, ink[1] - 1, ink[2] + 1, ink[3] + 1))
    width = max(1, round(canvas.width * height / canvas.height * 1.15))  # a little wider: legible strokes
    return canvas.resize((width, height), Image.NEAREST)


def _text_box_size(text: str, glyph: int) -> tuple[int, int]:
    pad = max(2, glyph // 5)
    w = _glyphs(text, glyph).width
    return w + 2 * pad, glyph + 2 * pad


def _background(rng: random.Random, size: int) -> Image.Image:
    """A muted two-colour gradient with pixel noise and grey distractor strokes."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    grey_a, grey_b = rng.randint(70, 185), rng.randint(70, 185)
    a = np.array([grey_a + rng.randint(-18, 18) for _ in range(3)], dtype=np.float32)
    b = np.array([grey_b + rng.randint(-18, 18) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * 0.5 + 0.5  # (S, S)
    pixels = a + (b - a) * t[..., None]
    pixels += nrng.normal(0, rng.uniform(4, 14), (size, size, 1)).astype(np.float32)  # grey noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 14)):  # distractor texture: grey strokes and rings, never a palette colour
        g = rng.randint(40, 220)
        grey = (g, g, g)
        x, y = rng.randrange(size), rng.randrange(size)
        r = rng.randint(size // 30, size // 6)
        if rng.random() < 0.6:
            draw.line((x, y, x + rng.randint(-r, r), y + rng.randint(-r, r)), fill=grey, width=rng.randint(1, 2))
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=grey, width=1)
    return image


def _jitter(rng: random.Random, color: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in COLORS[color])  # type: ignore[return-value]


def _draw(image: Image.Image, rng: random.Random, item: _Item) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Draw ``item``; returns its layout entries (the item, and for text each glyph's box)."""
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = item.box
    fill = _jitter(rng, item.color)
    if item.kind == "text":
        frame = max(2, item.side // 6)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(245, 245, 245), outline=fill, width=frame)
        glyphs = _glyphs(item.text, item.side)
        gx = x0 + (x1 - x0 - glyphs.width) // 2
        gy = y0 + (y1 - y0 - glyphs.height) // 2
        image.paste((15, 15, 15), (gx, gy, gx + glyphs.width, gy + glyphs.height), glyphs.point(lambda v: 255 - v))
        step = glyphs.width / len(item.text)  # the bitmap font is monospaced
        return [("text", item.color, item.box)] + [
            ("glyph", ch, (gx + round(i * step), gy, gx + round((i + 1) * step), gy + glyphs.height))
            for i, ch in enumerate(item.text)
        ]
    elif item.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif item.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif item.kind == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif item.kind == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1 - 1, cy - w // 2 + w - 1), fill=fill)
    else:  # pragma: no cover - the generator only makes the kinds above
        raise AssertionError(item.kind)
    return [(item.kind, item.color, item.box)]


# --- layout -------------------------------------------------------------------------------------------------
def _overlaps(box: tuple[int, int, int, int], placed: list[_Item], gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < p.box[2] + gap and p.box[0] < x1 + gap and y0 < p.box[3] + gap and p.box[1] < y1 + gap for p in placed
    )


def _place(
    rng: random.Random,
    item: _Item,
    placed: list[_Item],
    size: int,
    x_range: tuple[float, float] | None = None,
    tries: int = 300,
) -> bool:
    """Put ``item`` where it overlaps nothing placed (its centre inside ``x_range``, in shares of the side)."""
    if item.kind == "text":
        w, h = _text_box_size(item.text, item.side)
    else:
        w = h = item.side
    gap = max(2, size // 100)
    for _ in range(tries):
        if x_range is None:
            x0 = rng.randint(gap, size - w - gap)
        else:
            lo = max(gap, int(x_range[0] * size - w / 2))
            hi = min(size - w - gap, int(x_range[1] * size - w / 2))
            if hi < lo:
                return False
            x0 = rng.randint(lo, hi)
        y0 = rng.randint(gap, size - h - gap)
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, placed, gap):
            item.box = box
            placed.append(item)
            return True
    return False


def _shape_size(rng: random.Random, size: int) -> int:
    return max(5, round(rng.uniform(*_SIZE_RANGE) * size))


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(2, 5)))


def _scene(rng: random.Random, size: int, family: str) -> tuple[list[_Item], str, str, list[_Item]]:
    """Lay out a scene for ``family``; returns items, question, answer and the items holding the answer."""
    colors, placed = list(COLORS), []
    n = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)

    def add(kind: str, color: str, x_range: tuple[float, float] | None = None) -> _Item | None:
        item = _Item(kind, color, _shape_size(rng, size))
        return item if _place(rng, item, placed, size, x_range) else None

    def fill(allowed: list[tuple[str, str]], count: int) -> None:
        for _ in range(count):
            add(*rng.choice(allowed))

    def texts(count: int, avoid: set[str]) -> list[_Item]:
        frames = rng.sample([c for c in colors if c not in avoid], count)
        out = []
        for color in frames:
            item = _Item("text", color, max(7, round(_GLYPH * size * rng.uniform(0.9, 1.15))), _text(rng))
            if _place(rng, item, placed, size):
                out.append(item)
        return out

    pairs = [(s, c) for s in SHAPES for c in colors]
    if family in ("color", "side"):
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        x_range = None
        if family == "side":
            x_range = rng.choice([(0.06, 0.38), (0.62, 0.94)])
        target = add(shape, color, x_range)
        while target is None:  # only a crowded side can refuse; give the shape another size
            target = add(shape, color, x_range)
        texts(rng.randint(1, 2), set())
        fill([p for p in pairs if p[0] != shape], n - 1)
        if family == "color":
            return placed, f"What color is the {shape}?", color, [target]
        centre = (target.box[0] + target.box[2]) / 2
        return placed, f"Which side is the {shape} on?", "left" if centre < size / 2 else "right", [target]
    if family == "shape":
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        target = add(shape, color)
        texts(rng.randint(1, 2), {color})
        fill([p for p in pairs if p[1] != color], n - 1)
        return placed, f"What shape is the {color} one?", shape, [target]
    if family == "count":
        color, k = rng.choice(colors), rng.randint(1, MAX_COUNT)
        targets = [t for t in (add(rng.choice(SHAPES), color) for _ in range(k)) if t is not None]
        texts(rng.randint(1, 2), {color})
        fill([p for p in pairs if p[1] != color], max(0, n - k))
        return placed, f"How many {color} shapes are there?", str(len(targets)), targets
    if family == "text":
        labels = texts(rng.randint(1, 3), set())
        fill(pairs, n)
        target = rng.choice(labels)
        return placed, f"What does the text in the {target.color} box say?", target.text, [target]
    if family == "exists":
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        present = rng.random() < 0.5
        target = add(shape, color) if present else None
        near = [
            add(shape, rng.choice([c for c in colors if c != color])),
            add(rng.choice([s for s in SHAPES if s != shape]), color),
        ]
        texts(rng.randint(1, 2), {color})
        fill([p for p in pairs if p != (shape, color)], max(0, n - 3))
        answer = "yes" if target is not None else "no"
        holders = [target] if target is not None else [t for t in near if t is not None]
        return placed, f"Is there a {color} {shape}?", answer, holders
    if family == "total":
        k = rng.randint(*TOTAL_RANGE)
        shapes = []
        while len(shapes) < k:  # on an empty canvas at most 8 shapes of <= 12% of the side always fit
            shape_item = add(*rng.choice(pairs))
            if shape_item is not None:
                shapes.append(shape_item)
        texts(rng.randint(1, 2), set())  # labels of any colour: objects that are not shapes
        return placed, "How many shapes are there?", str(len(shapes)), shapes
    raise InvalidInputError(f"unknown question family {family!r}; choose one of {QUESTION_FAMILIES}")


def make_sample(seed: int, size: int = 224, family: str | None = None) -> VQASample:
    """Generate one sample, a pure function of its arguments.

    Args:
        seed: any integer; the same seed gives the same pixels, question and answer.
        size: image side in pixels (>= 64; any size, e.g. each bucket of the pipeline).
        family: one of ``QUESTION_FAMILIES``; ``None`` picks one from the seed.

    Raises:
        InvalidInputError: an unknown family or a side below 64 pixels.
    """
    if family is not None and family not in QUESTION_FAMILIES:
        raise InvalidInputError(f"unknown question family {family!r}; choose one of {QUESTION_FAMILIES}")
    if int(size) < 64:
        raise InvalidInputError(f"size must be at least 64 pixels; got {size}")
    size = int(size)
    rng = random.Random(f"arrcoc-vqa/{int(seed)}/{size}/{family}")
    family = family or rng.choice(QUESTION_FAMILIES)
    image = _background(rng, size)
    items, question, answer, holders = _scene(rng, size, family)
    layout = [entry for item in items for entry in _draw(image, rng, item)]
    boxes = tuple(h.box for h in holders if h is not None)
    return VQASample(image, question, answer, family, boxes, tuple(layout))


class VQADataset(torch.utils.data.Dataset):
    """``num_samples`` generated samples: item ``i`` is ``make_sample(seed + i, size, family)``.

    With ``families`` the family cycles through them (item ``i`` asks ``families[i % len(families)]``), so
    every family is equally represented; without, each item's seed picks its family.

    Args:
        num_samples: length of the dataset.
        seed: seed of item 0; disjoint seed ranges give disjoint splits.
        size: image side in pixels.
        families: question families to cycle through, or ``None``.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, size: int = 224, families: tuple[str, ...] | list[str] | None = None
    ) -> None:
        if num_samples < 0:
            raise InvalidInputError(f"num_samples must be >= 0; got {num_samples}")
        bad = [f for f in families or () if f not in QUESTION_FAMILIES]
        if bad or (families is not None and len(families) == 0):
            raise InvalidInputError(f"families must be a non-empty subset of {QUESTION_FAMILIES}; got {families}")
        self.num_samples, self.seed, self.size = int(num_samples), int(seed), int(size)
        self.families = tuple(families) if families is not None else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> VQASample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        family = self.families[index % len(self.families)] if self.families else None
        return make_sample(self.seed + index, self.size, family)
