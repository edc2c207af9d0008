"""Deterministic drawings: simple scenes, pictograms, labelled diagrams and typographic images.

The built-in multimodal sets (scripts/make_multimodal_sets.py) and the typographic attack draw every
image they use here; nothing is downloaded. Drawing is deterministic: integer coordinates, colours and
positions chosen by a seeded `random.Random`, and the font Pillow ships (`ImageFont.load_default(size)`:
Aileron through FreeType, basic layout), so one Pillow version gives the same pixels on every machine.

- `shapes_scene`, `count_scene`, `position_scene`: coloured geometric shapes (colour, count, shape and
  left/right questions).
- `object_scene`, `diagram`: pictograms of everyday and dangerous items drawn from a few primitives
  (`OBJECTS`), optionally with a label on the item or callout labels around it.
- `sign`: a word on a sign (text-reading questions).
- `typographic`: FigStep-style text image: the instruction as a heading, then empty numbered items.
- `png_bytes` / `save_png`: PNG encoding without metadata (same bytes for the same pixels), written atomically.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_file

Box = tuple[int, int, int, int]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 92, 200), "yellow": (240, 200, 20),
    "orange": (250, 127, 14), "purple": (128, 64, 170), "black": (25, 25, 25), "pink": (240, 120, 180),
    "brown": (140, 86, 50), "grey": (127, 127, 127),
}
INK = (25, 25, 25)
PAPER = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` pixels (needs Pillow >= 10.1 built with FreeType, as the wheels are)."""
    try:
        loaded = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        raise RuntimeError("drawing text needs Pillow >= 10.1 (pip install -U pillow)") from None
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow has no FreeType support, so its default font cannot be scaled; "
                           "install a Pillow wheel (pip install --force-reinstall pillow)")
    return loaded


def canvas(size: int | tuple[int, int] = 256, background=PAPER) -> Image.Image:
    width, height = (size, size) if isinstance(size, int) else size
    return Image.new("RGB", (width, height), background)


def _rgb(colour) -> tuple[int, int, int]:
    return COLOURS[colour] if isinstance(colour, str) else tuple(colour)


# ---------------------------------------------------------------- geometric shapes


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box: Box, colour) -> None:
    """A filled `shape` (one of SHAPES) inscribed in `box`, outlined in ink."""
    x0, y0, x1, y1 = box
    fill = _rgb(colour)
    cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, min(x1 - x0, y1 - y0) // 2
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=INK, width=2)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=INK, width=2)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=INK, width=2)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=INK, width=2)
    elif shape == "hexagon":
        d.regular_polygon((cx, cy, r), 6, fill=fill, outline=INK, width=2)
    elif shape == "star":
        import math
        points = [(round(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / 5)),
                   round(cy - (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / 5))) for i in range(10)]
        d.polygon(points, fill=fill, outline=INK, width=2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _cells(size: int, grid: int) -> list[Box]:
    step = size // grid
    return [(c * step, r * step, (c + 1) * step, (r + 1) * step) for r in range(grid) for c in range(grid)]


def _shrink(box: Box, margin: int) -> Box:
    return box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin


def shapes_scene(shapes: Sequence[tuple[str, str]], *, size: int = 256, seed: int = 0) -> Image.Image:
    """The (shape, colour) pairs in distinct cells of a grid (positions and sizes from `seed`)."""
    grid = 1 if len(shapes) == 1 else 2 if len(shapes) <= 4 else 3 if len(shapes) <= 9 else 4
    if len(shapes) > grid * grid:
        raise ValueError(f"at most 16 shapes fit a scene, got {len(shapes)}")
    rng = random.Random(seed)
    cells = rng.sample(_cells(size, grid), len(shapes))
    image = canvas(size)
    d = ImageDraw.Draw(image)
    for (shape, colour), cell in zip(shapes, cells):
        side = cell[2] - cell[0]
        margin = rng.randint(side // 10, side // 5)
        draw_shape(d, shape, _shrink(cell, margin), colour)
    return image


def count_scene(shape: str, colour: str, n: int, *, distractors: Sequence[tuple[str, str]] = (),
                size: int = 256, seed: int = 0) -> Image.Image:
    """`n` copies of one coloured shape, plus other (shape, colour) distractors, scattered over a grid."""
    return shapes_scene([(shape, colour)] * n + list(distractors), size=size, seed=seed)


def position_scene(left: tuple[str, str], right: tuple[str, str], *, size: int = 256, seed: int = 0) -> Image.Image:
    """Two (shape, colour) pairs, one in the left half and one in the right half."""
    rng = random.Random(seed)
    image = canvas(size)
    d = ImageDraw.Draw(image)
    half = size // 2
    for (shape, colour), x in ((left, 0), (right, half)):
        side = rng.randint(half * 6 // 10, half * 8 // 10)
        x0 = x + (half - side) // 2
        y0 = rng.randint(size // 10, size - side - size // 10)
        draw_shape(d, shape, (x0, y0, x0 + side, y0 + side), colour)
    return image


# ---------------------------------------------------------------- text


def wrap(text: str, size: int, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels at font `size` (a longer word gets its own line)."""
    f = font(size)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and f.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _fit_lines(text: str, width: int, height: int, start: int, smallest: int = 10) -> tuple[list[str], int]:
    """The largest font size <= start at which `text`, wrapped to `width`, fits `height`."""
    for size in range(start, smallest - 1, -1):
        lines = wrap(text, size, width)
        if len(lines) * round(size * 1.25) <= height and all(font(size).getlength(l) <= width for l in lines):
            return lines, size
    # Too long even at the smallest size: keep the lines that fit, the last one ending in "..."
    lines = wrap(text, smallest, width)[:max(1, height // round(smallest * 1.25))]
    lines[-1] = lines[-1][:max(0, len(lines[-1]) - 3)] + "..."
    return lines, smallest


def text_block(d: ImageDraw.ImageDraw, text: str, box: Box, *, size: int = 24, fill=INK, centre: bool = True) -> None:
    """`text` wrapped and shrunk to fit `box`, centred (or left-aligned)."""
    x0, y0, x1, y1 = box
    lines, size = _fit_lines(text, x1 - x0, y1 - y0, size)
    f, step = font(size), round(size * 1.25)
    y = y0 + max(0, ((y1 - y0) - step * len(lines)) // 2) if centre else y0
    for line in lines:
        x = x0 + ((x1 - x0) - round(f.getlength(line))) // 2 if centre else x0
        d.text((x, y), line, font=f, fill=fill)
        y += step


def label_tag(d: ImageDraw.ImageDraw, text: str, centre: tuple[int, int], *, size: int = 16, max_width: int = 200,
              fill=PAPER) -> Box:
    """A boxed label centred at `centre` (wrapped to `max_width`); returns its box."""
    lines, size = _fit_lines(text, max_width, size * 3, size)
    f, step = font(size), round(size * 1.25)
    width = max(round(f.getlength(line)) for line in lines) + 10
    height = step * len(lines) + 8
    x0, y0 = centre[0] - width // 2, centre[1] - height // 2
    d.rectangle((x0, y0, x0 + width, y0 + height), fill=fill, outline=INK, width=2)
    text_block(d, "\n".join(lines), (x0 + 5, y0 + 4, x0 + width - 5, y0 + height - 4), size=size)
    return x0, y0, x0 + width, y0 + height


def sign(text: str, *, size: int = 256, colour: str = "blue", seed: int = 0) -> Image.Image:
    """`text` in large letters on a coloured sign on a post (text-reading questions)."""
    rng = random.Random(seed)
    image = canvas(size, (235, 242, 250))
    d = ImageDraw.Draw(image)
    top = rng.randint(size // 8, size // 4)
    board = (size // 12, top, size - size // 12, top + size * 2 // 5)
    d.rectangle((size // 2 - 6, board[3], size // 2 + 6, size), fill=COLOURS["grey"], outline=INK)
    d.rounded_rectangle(board, radius=10, fill=_rgb(colour), outline=INK, width=3)
    ink = INK if colour in ("yellow", "orange", "pink") else PAPER
    text_block(d, text, _shrink(board, 12), size=size // 7, fill=ink)
    return image


def typographic(text: str, *, items: int = 3, size: int | tuple[int, int] = 512, font_size: int = 34,
                heading_share: float = 0.5) -> Image.Image:
    """FigStep-style typographic image: `text` as a heading, then `items` empty numbered items to fill in.

    The heading is wrapped and shrunk to fit the top `heading_share` of the image (text too long even at
    10 pixels is cut, ending in "..."); the numbers are spread over the rest."""
    image = canvas(size)
    width, height = image.size
    d = ImageDraw.Draw(image)
    margin = width // 16
    split = round(height * heading_share)
    text_block(d, text, (margin, margin, width - margin, split - margin // 2), size=font_size, centre=False)
    step = (height - split - margin) // max(items, 1)
    f = font(font_size)
    for i in range(items):
        d.text((margin, split + i * step), f"{i + 1}.", font=f, fill=INK)
    return image


# ---------------------------------------------------------------- pictograms


class _Pen:
    """Draws in unit coordinates of a box: (0, 0) its top-left corner, (1, 1) its bottom-right."""

    def __init__(self, d: ImageDraw.ImageDraw, box: Box):
        self.d, self.box = d, box

    def p(self, x: float, y: float) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return round(x0 + x * (x1 - x0)), round(y0 + y * (y1 - y0))

    def b(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        return (*self.p(x0, y0), *self.p(x1, y1))

    def rect(self, x0, y0, x1, y1, fill, width=2):
        self.d.rectangle(self.b(x0, y0, x1, y1), fill=_rgb(fill), outline=INK, width=width)

    def rrect(self, x0, y0, x1, y1, fill, radius=8):
        self.d.rounded_rectangle(self.b(x0, y0, x1, y1), radius=radius, fill=_rgb(fill), outline=INK, width=2)

    def oval(self, x0, y0, x1, y1, fill, width=2):
        self.d.ellipse(self.b(x0, y0, x1, y1), fill=_rgb(fill), outline=INK, width=width)

    def poly(self, points, fill):
        self.d.polygon([self.p(x, y) for x, y in points], fill=_rgb(fill), outline=INK, width=2)

    def line(self, points, width=3, fill=INK):
        self.d.line([self.p(x, y) for x, y in points], fill=_rgb(fill), width=width)


def _flask(p: _Pen, c):
    p.poly([(0.42, 0.05), (0.58, 0.05), (0.58, 0.35), (0.85, 0.92), (0.15, 0.92), (0.42, 0.35)], (225, 240, 250))
    p.poly([(0.3, 0.6), (0.7, 0.6), (0.85, 0.92), (0.15, 0.92)], c)


def _bottle(p: _Pen, c):
    p.rect(0.42, 0.04, 0.58, 0.14, "black")
    p.rect(0.44, 0.14, 0.56, 0.3, (225, 240, 250))
    p.rrect(0.28, 0.3, 0.72, 0.95, c, radius=10)
    p.rect(0.32, 0.5, 0.68, 0.75, PAPER)


def _jar(p: _Pen, c):
    p.rect(0.25, 0.12, 0.75, 0.22, "grey")
    p.rrect(0.2, 0.22, 0.8, 0.92, c, radius=12)
    p.rect(0.28, 0.45, 0.72, 0.7, PAPER)


def _pills(p: _Pen, c):
    for x, y in ((0.1, 0.2), (0.45, 0.45), (0.15, 0.65)):
        p.d.rounded_rectangle(p.b(x, y, x + 0.45, y + 0.18), radius=12, fill=_rgb(c), outline=INK, width=2)
        p.line([(x + 0.225, y), (x + 0.225, y + 0.18)], width=2)


def _syringe(p: _Pen, c):
    p.line([(0.05, 0.5), (0.2, 0.5)], width=2)
    p.rect(0.2, 0.42, 0.7, 0.58, (225, 240, 250))
    p.rect(0.2, 0.44, 0.45, 0.56, c)
    p.line([(0.7, 0.5), (0.9, 0.5)], width=5)
    p.rect(0.9, 0.38, 0.94, 0.62, "black")


def _petri(p: _Pen, c):
    p.oval(0.08, 0.25, 0.92, 0.85, (235, 235, 220), width=3)
    rng = random.Random(7)
    for _ in range(14):
        x, y = rng.uniform(0.25, 0.7), rng.uniform(0.38, 0.68)
        p.oval(x, y, x + 0.06, y + 0.06, c, width=1)


def _cylinder(p: _Pen, c):
    p.rect(0.42, 0.04, 0.58, 0.14, "black")
    p.line([(0.58, 0.09), (0.75, 0.09)], width=4)
    p.rrect(0.3, 0.14, 0.7, 0.95, c, radius=18)


def _pipe(p: _Pen, c):
    p.rect(0.15, 0.38, 0.85, 0.62, c)
    p.rect(0.08, 0.34, 0.17, 0.66, "black")
    p.rect(0.83, 0.34, 0.92, 0.66, "black")
    p.line([(0.5, 0.38), (0.55, 0.2), (0.65, 0.12)], width=2)


def _box(p: _Pen, c):
    p.rect(0.1, 0.3, 0.9, 0.9, c)
    p.rect(0.45, 0.3, 0.55, 0.9, (230, 210, 160))
    p.poly([(0.1, 0.3), (0.25, 0.15), (0.75, 0.15), (0.9, 0.3)], (200, 160, 110))


def _laptop(p: _Pen, c):
    p.rect(0.15, 0.12, 0.85, 0.62, "black")
    p.rect(0.2, 0.17, 0.8, 0.57, c)
    p.poly([(0.15, 0.62), (0.85, 0.62), (0.97, 0.8), (0.03, 0.8)], "grey")


def _phone(p: _Pen, c):
    p.rrect(0.3, 0.05, 0.7, 0.95, "black", radius=14)
    p.rect(0.34, 0.13, 0.66, 0.82, c)
    p.oval(0.46, 0.85, 0.54, 0.92, "grey")


def _usb(p: _Pen, c):
    p.rrect(0.1, 0.35, 0.65, 0.65, c, radius=8)
    p.rect(0.65, 0.4, 0.9, 0.6, "grey")
    p.rect(0.72, 0.45, 0.77, 0.5, "black")
    p.rect(0.8, 0.45, 0.85, 0.5, "black")


def _card(p: _Pen, c):
    p.rrect(0.05, 0.22, 0.95, 0.78, c, radius=10)
    p.rect(0.05, 0.3, 0.95, 0.4, "black")
    p.rect(0.12, 0.47, 0.28, 0.6, "yellow")


def _id_card(p: _Pen, c):
    p.rrect(0.05, 0.2, 0.95, 0.8, c, radius=10)
    p.rect(0.1, 0.3, 0.35, 0.7, PAPER)
    p.oval(0.17, 0.35, 0.28, 0.5, "grey")
    p.poly([(0.13, 0.7), (0.32, 0.7), (0.3, 0.55), (0.15, 0.55)], "grey")
    for y in (0.35, 0.47, 0.59):
        p.line([(0.42, y), (0.88, y)], width=3)


def _lock(p: _Pen, c):
    p.d.arc(p.b(0.3, 0.08, 0.7, 0.6), 180, 360, fill=INK, width=8)
    p.line([(0.3, 0.34), (0.3, 0.45)], width=8)
    p.line([(0.7, 0.34), (0.7, 0.45)], width=8)
    p.rrect(0.2, 0.42, 0.8, 0.92, c, radius=8)
    p.oval(0.45, 0.58, 0.55, 0.7, "black")


def _key(p: _Pen, c):
    p.oval(0.05, 0.3, 0.4, 0.7, c, width=3)
    p.oval(0.15, 0.43, 0.25, 0.57, PAPER)
    p.rect(0.38, 0.45, 0.95, 0.55, c)
    p.rect(0.75, 0.55, 0.8, 0.68, c)
    p.rect(0.86, 0.55, 0.91, 0.65, c)


def _envelope(p: _Pen, c):
    p.rect(0.08, 0.25, 0.92, 0.8, c)
    p.line([(0.08, 0.25), (0.5, 0.58), (0.92, 0.25)], width=3)


def _document(p: _Pen, c):
    p.poly([(0.2, 0.05), (0.65, 0.05), (0.8, 0.2), (0.8, 0.95), (0.2, 0.95)], c)
    p.poly([(0.65, 0.05), (0.65, 0.2), (0.8, 0.2)], "grey")
    for y in (0.32, 0.44, 0.56, 0.68, 0.8):
        p.line([(0.28, y), (0.72, y)], width=3)


def _banknote(p: _Pen, c):
    p.rect(0.03, 0.25, 0.97, 0.75, c, width=3)
    p.rect(0.08, 0.3, 0.92, 0.7, c, width=1)
    p.oval(0.38, 0.33, 0.62, 0.67, PAPER)


def _house(p: _Pen, c):
    p.rect(0.18, 0.45, 0.82, 0.95, c)
    p.poly([(0.1, 0.47), (0.5, 0.1), (0.9, 0.47)], "brown")
    p.rect(0.43, 0.65, 0.57, 0.95, "brown")
    p.rect(0.25, 0.55, 0.37, 0.67, (200, 230, 250))
    p.rect(0.63, 0.55, 0.75, 0.67, (200, 230, 250))


def _car(p: _Pen, c):
    p.poly([(0.25, 0.45), (0.35, 0.28), (0.65, 0.28), (0.75, 0.45)], (200, 230, 250))
    p.rrect(0.05, 0.45, 0.95, 0.72, c, radius=10)
    p.oval(0.15, 0.62, 0.33, 0.82, "black")
    p.oval(0.67, 0.62, 0.85, 0.82, "black")


def _tree(p: _Pen, c):
    p.rect(0.43, 0.55, 0.57, 0.95, "brown")
    p.oval(0.15, 0.05, 0.85, 0.65, c)


def _sun(p: _Pen, c):
    import math
    for i in range(12):
        a = math.pi * i / 6
        p.line([(0.5 + 0.3 * math.cos(a), 0.5 + 0.3 * math.sin(a)), (0.5 + 0.45 * math.cos(a), 0.5 + 0.45 * math.sin(a))],
               width=4, fill=c)
    p.oval(0.25, 0.25, 0.75, 0.75, c)


def _cup(p: _Pen, c):
    p.d.arc(p.b(0.6, 0.38, 0.88, 0.68), 270, 90, fill=INK, width=6)
    p.poly([(0.15, 0.3), (0.75, 0.3), (0.7, 0.9), (0.2, 0.9)], c)


def _book(p: _Pen, c):
    p.rect(0.2, 0.08, 0.8, 0.92, c, width=3)
    p.rect(0.2, 0.08, 0.28, 0.92, "black")
    p.rect(0.34, 0.2, 0.74, 0.45, PAPER)


def _disc(p: _Pen, c):
    p.oval(0.1, 0.1, 0.9, 0.9, c, width=3)
    p.oval(0.38, 0.38, 0.62, 0.62, PAPER)
    p.oval(0.46, 0.46, 0.54, 0.54, "black")


def _poster(p: _Pen, c):
    p.rect(0.15, 0.03, 0.85, 0.97, c, width=3)
    p.poly([(0.2, 0.7), (0.4, 0.4), (0.55, 0.6), (0.65, 0.5), (0.8, 0.7)], PAPER)


def _apple(p: _Pen, c):
    p.oval(0.15, 0.25, 0.85, 0.92, c)
    p.line([(0.5, 0.28), (0.52, 0.1)], width=4, fill="brown")
    p.oval(0.53, 0.08, 0.72, 0.2, "green")


def _knife(p: _Pen, c):
    p.poly([(0.1, 0.45), (0.6, 0.42), (0.6, 0.58), (0.2, 0.55)], (210, 215, 220))
    p.rrect(0.6, 0.4, 0.95, 0.6, c, radius=6)


def _pistol(p: _Pen, c):
    p.rect(0.1, 0.3, 0.85, 0.45, c)
    p.poly([(0.55, 0.45), (0.8, 0.45), (0.88, 0.85), (0.65, 0.85)], c)
    p.d.arc(p.b(0.42, 0.38, 0.62, 0.65), 0, 180, fill=INK, width=4)


def _drone(p: _Pen, c):
    p.line([(0.2, 0.3), (0.8, 0.7)], width=5)
    p.line([(0.8, 0.3), (0.2, 0.7)], width=5)
    for x, y in ((0.2, 0.3), (0.8, 0.3), (0.2, 0.7), (0.8, 0.7)):
        p.oval(x - 0.15, y - 0.06, x + 0.15, y + 0.06, (200, 200, 200))
    p.rrect(0.38, 0.4, 0.62, 0.6, c, radius=6)


def _router(p: _Pen, c):
    p.line([(0.25, 0.45), (0.2, 0.1)], width=4)
    p.line([(0.75, 0.45), (0.8, 0.1)], width=4)
    p.rrect(0.08, 0.45, 0.92, 0.75, c, radius=8)
    for i in range(5):
        p.oval(0.2 + 0.12 * i, 0.57, 0.25 + 0.12 * i, 0.63, "green")


def _server(p: _Pen, c):
    for i in range(4):
        y = 0.08 + 0.22 * i
        p.rect(0.2, y, 0.8, y + 0.2, c)
        p.oval(0.27, y + 0.07, 0.33, y + 0.13, "green")
        p.line([(0.45, y + 0.1), (0.72, y + 0.1)], width=3)


def _camera(p: _Pen, c):
    p.rect(0.35, 0.2, 0.55, 0.32, "black")
    p.rrect(0.1, 0.3, 0.9, 0.8, c, radius=10)
    p.oval(0.35, 0.37, 0.65, 0.73, "black")
    p.oval(0.43, 0.47, 0.57, 0.63, (120, 160, 220))


def _person(p: _Pen, c):
    p.oval(0.38, 0.05, 0.62, 0.29, (250, 220, 190))
    p.poly([(0.32, 0.32), (0.68, 0.32), (0.72, 0.65), (0.28, 0.65)], c)
    p.line([(0.4, 0.65), (0.36, 0.95)], width=8)
    p.line([(0.6, 0.65), (0.64, 0.95)], width=8)


def _bubble(p: _Pen, c):
    p.rrect(0.05, 0.1, 0.95, 0.7, c, radius=20)
    p.poly([(0.2, 0.69), (0.35, 0.69), (0.15, 0.9)], c)


def _megaphone(p: _Pen, c):
    p.poly([(0.15, 0.4), (0.75, 0.12), (0.75, 0.88), (0.15, 0.6)], c)
    p.rect(0.05, 0.4, 0.15, 0.6, "black")
    p.rect(0.3, 0.6, 0.4, 0.85, "black")


def _newspaper(p: _Pen, c):
    p.rect(0.05, 0.08, 0.95, 0.92, c, width=3)
    p.rect(0.1, 0.55, 0.45, 0.86, "grey")
    for y in (0.6, 0.7, 0.8):
        p.line([(0.52, y), (0.9, y)], width=3)


def _ballot(p: _Pen, c):
    p.rect(0.15, 0.35, 0.85, 0.92, c)
    p.rect(0.35, 0.32, 0.65, 0.38, "black")
    p.poly([(0.4, 0.05), (0.62, 0.05), (0.62, 0.34), (0.4, 0.34)], PAPER)


def _mushroom(p: _Pen, c):
    p.rect(0.4, 0.45, 0.6, 0.92, (240, 230, 210))
    p.d.chord(p.b(0.1, 0.1, 0.9, 0.8), 180, 360, fill=_rgb(c), outline=INK, width=2)
    for x, y in ((0.3, 0.3), (0.5, 0.2), (0.66, 0.32)):
        p.oval(x, y, x + 0.07, y + 0.07, PAPER, width=1)


def _umbrella(p: _Pen, c):
    p.d.chord(p.b(0.05, 0.1, 0.95, 0.8), 180, 360, fill=_rgb(c), outline=INK, width=2)
    p.line([(0.5, 0.45), (0.5, 0.85)], width=4)
    p.d.arc(p.b(0.5, 0.78, 0.64, 0.92), 0, 180, fill=INK, width=4)


def _clock(p: _Pen, c):
    p.oval(0.1, 0.1, 0.9, 0.9, c, width=4)
    p.oval(0.18, 0.18, 0.82, 0.82, PAPER)
    p.line([(0.5, 0.5), (0.5, 0.25)], width=4)
    p.line([(0.5, 0.5), (0.68, 0.58)], width=4)


def _fish(p: _Pen, c):
    p.oval(0.1, 0.3, 0.7, 0.7, c)
    p.poly([(0.68, 0.5), (0.92, 0.3), (0.92, 0.7)], c)
    p.oval(0.2, 0.42, 0.26, 0.48, "black")


def _battery(p: _Pen, c):
    p.rect(0.1, 0.3, 0.85, 0.7, c)
    p.rect(0.85, 0.42, 0.92, 0.58, "black")
    p.rect(0.1, 0.3, 0.3, 0.7, "black")


def _bag(p: _Pen, c):
    p.d.arc(p.b(0.3, 0.05, 0.7, 0.45), 180, 360, fill=INK, width=5)
    p.rrect(0.12, 0.25, 0.88, 0.92, c, radius=10)


def _bicycle(p: _Pen, c):
    p.oval(0.05, 0.45, 0.4, 0.8, PAPER, width=4)
    p.oval(0.6, 0.45, 0.95, 0.8, PAPER, width=4)
    p.line([(0.22, 0.62), (0.45, 0.35), (0.7, 0.35), (0.78, 0.62)], width=5, fill=c)
    p.line([(0.45, 0.35), (0.5, 0.62), (0.7, 0.35)], width=5, fill=c)
    p.line([(0.22, 0.62), (0.5, 0.62)], width=5, fill=c)


OBJECTS: dict[str, Callable[[_Pen, object], None]] = {
    "flask": _flask, "bottle": _bottle, "jar": _jar, "pills": _pills, "syringe": _syringe, "petri dish": _petri,
    "gas cylinder": _cylinder, "pipe": _pipe, "box": _box, "laptop": _laptop, "phone": _phone, "usb stick": _usb,
    "credit card": _card, "id card": _id_card, "padlock": _lock, "key": _key, "envelope": _envelope,
    "document": _document, "banknote": _banknote, "house": _house, "car": _car, "tree": _tree, "sun": _sun,
    "cup": _cup, "book": _book, "disc": _disc, "poster": _poster, "apple": _apple, "knife": _knife,
    "pistol": _pistol, "drone": _drone, "router": _router, "server": _server, "camera": _camera,
    "person": _person, "speech bubble": _bubble, "megaphone": _megaphone, "newspaper": _newspaper,
    "ballot box": _ballot, "mushroom": _mushroom, "umbrella": _umbrella, "clock": _clock, "fish": _fish,
    "battery": _battery, "bag": _bag, "bicycle": _bicycle,
}
# Where a label written ON the object goes (unit box), for objects with a flat face; others get a tag below.
_FACES: dict[str, tuple[float, float, float, float]] = {
    "bottle": (0.32, 0.5, 0.68, 0.75), "jar": (0.28, 0.45, 0.72, 0.7), "laptop": (0.2, 0.17, 0.8, 0.57),
    "phone": (0.34, 0.13, 0.66, 0.82), "book": (0.34, 0.2, 0.74, 0.45), "poster": (0.18, 0.06, 0.82, 0.38),
    "document": (0.25, 0.1, 0.62, 0.28), "newspaper": (0.08, 0.11, 0.92, 0.5), "speech bubble": (0.1, 0.14, 0.9, 0.66),
    "box": (0.12, 0.5, 0.44, 0.85), "server": (0.36, 0.09, 0.78, 0.26), "banknote": (0.38, 0.33, 0.62, 0.67),
}
_WHITE_FACES = ("bottle", "jar", "book", "banknote")


def draw_object(d: ImageDraw.ImageDraw, name: str, box: Box, colour="grey", label: str | None = None, *,
                on_face: bool = True, label_size: int = 22) -> None:
    """The pictogram `name` (one of OBJECTS) in `box`, with `label` on its face (objects with a flat face,
    when `on_face`) or on a tag below it (the pictogram then shrinks to leave the tag room)."""
    try:
        drawer = OBJECTS[name]
    except KeyError:
        raise ValueError(f"unknown object {name!r}; known: {', '.join(OBJECTS)}") from None
    tagged = bool(label) and not (on_face and name in _FACES)
    if tagged:
        band = (box[3] - box[1]) // 4
        side = box[3] - box[1] - band
        x0 = (box[0] + box[2] - side) // 2
        drawer(_Pen(d, (x0, box[1], x0 + side, box[1] + side)), colour)
        label_tag(d, label, ((box[0] + box[2]) // 2, box[3] - band // 2), size=label_size,
                  max_width=box[2] - box[0])
        return
    pen = _Pen(d, box)
    drawer(pen, colour)
    if label:
        face = pen.b(*_FACES[name])
        fill = PAPER if name in _WHITE_FACES else _rgb(colour)
        dark = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] < 140
        text_block(d, label, _shrink(face, 3), size=label_size, fill=PAPER if dark else INK)


def object_scene(name: str, *, colour="grey", label: str | None = None, size: int = 256) -> Image.Image:
    """One pictogram filling most of the image, optionally labelled."""
    image = canvas(size)
    m = size // 10
    draw_object(ImageDraw.Draw(image), name, (m, m, size - m, size - m), colour, label)
    return image


def diagram(parts: Sequence[tuple[str, str, str | None]], *, title: str | None = None,
            callouts: Sequence[str] = (), arrows: bool = True, size: int = 320) -> Image.Image:
    """A labelled diagram: up to three (object, colour, label) pictograms in a row, joined by arrows, an
    optional title on top and callout notes at the bottom."""
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"a diagram has 1 to 3 parts, got {len(parts)}")
    image = canvas(size)
    d = ImageDraw.Draw(image)
    top = size // 6 if title else size // 12
    bottom = size - (size // 5 if callouts else size // 12)
    if title:
        text_block(d, title, (8, 6, size - 8, top - 4), size=26)
    n = len(parts)
    gap = size // 10 if n > 1 else 0
    side = min((size - 16 - gap * (n - 1)) // n, bottom - top)
    x = (size - side * n - gap * (n - 1)) // 2
    y = top + (bottom - top - side) // 2
    centres = []
    for name, colour, label in parts:
        draw_object(d, name, (x, y, x + side, y + side), colour, label, on_face=False, label_size=20)
        centres.append((x, x + side))
        x += side + gap
    if arrows:
        mid = y + side // 2
        for (_, right), (left, _) in zip(centres, centres[1:]):
            d.line((right + 2, mid, left - 6, mid), fill=INK, width=3)
            d.polygon([(left - 2, mid), (left - 10, mid - 6), (left - 10, mid + 6)], fill=INK)
    for i, note in enumerate(callouts):
        width = size // max(len(callouts), 1)
        label_tag(d, note, (i * width + width // 2, bottom + (size - bottom) // 2), size=16, max_width=width - 12,
                  fill=(255, 245, 200))
    return image


def blank(size: int = 336, shade: int = 128) -> Image.Image:
    """A plain grey image: the starting point of an image attack on a behaviour that has no image."""
    return canvas(size, (shade, shade, shade))


# ---------------------------------------------------------------- encoding


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes without metadata (no timestamps), so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(png_bytes(image))
