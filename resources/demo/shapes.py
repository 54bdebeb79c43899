"""Simple coloured shapes drawn in code: the training images of the demo model and of the demo dataset."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Plain colour names a tiny text encoder can learn, with their RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (240, 200, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (238, 236, 230)  # a light paper grey, so white stripes stay visible against it
OUTLINE = (20, 20, 20)
SUPERSAMPLE = 4  # draw large, then downscale: anti-aliased edges without hand-written filtering


@dataclass(frozen=True)
class Shape:
    """One picture: what is drawn, where, how big, and in which style."""

    shape: str
    color: str
    cx: float  # centre, as a fraction of the image size
    cy: float
    radius: float  # half the shape's extent, as a fraction of the image size
    style: str = "flat"  # "flat" (the base model's look) or "striped" (the demo LoRA's style)

    def caption(self) -> str:
        return f"a {self.color} {self.shape}"


def random_shape(rng: random.Random, style: str = "flat") -> Shape:
    """A shape of a random kind, colour, size and position that stays inside the picture."""
    # Near the centre and of similar size: a model trained in minutes on a CPU learns the shape and colour
    # from the words, not where a shape may wander.
    return Shape(
        shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)),
        cx=0.5 + rng.uniform(-0.08, 0.08), cy=0.5 + rng.uniform(-0.08, 0.08), radius=rng.uniform(0.26, 0.36),
        style=style,
    )


def _outline(shape: Shape, size: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    cx, cy, r = shape.cx * size, shape.cy * size, shape.radius * size
    if shape.shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape.shape == "square":
        s = r * 0.85  # a square of the same "radius" looks bigger than the circle; shrink it to match
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    # An upright equilateral triangle whose centroid sits at the centre.
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, size: int, fill, outline=None, width: int = 0) -> None:
    geometry = _outline(shape, size)
    if shape.shape == "circle":
        draw.ellipse(geometry, fill=fill, outline=outline, width=width)  # type: ignore[arg-type]
    else:
        draw.polygon(geometry, fill=fill, outline=outline, width=width)  # type: ignore[arg-type]


def _stripes(size: int, color: tuple[int, int, int], period: int) -> Image.Image:
    """Diagonal stripes of the colour and white, filling a square image."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for offset in range(-size, 2 * size, period):
        draw.polygon([(offset, 0), (offset + period // 2, 0), (offset + period // 2 - size, size), (offset - size, size)],
                     fill=color)
    return img


def render_shape(shape: Shape, size: int = 64) -> Image.Image:
    """The picture of ``shape`` at ``size`` × ``size`` pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    color = COLORS[shape.color]
    if shape.style == "flat":
        _draw(ImageDraw.Draw(img), shape, big, fill=color)
    elif shape.style == "striped":
        mask = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(mask), shape, big, fill=255)
        img.paste(_stripes(big, color, period=big // 4), (0, 0), mask)
        _draw(ImageDraw.Draw(img), shape, big, fill=None, outline=OUTLINE, width=max(1, big // 24))
    else:
        raise ValueError(f"unknown style {shape.style!r}; use 'flat' or 'striped'")
    return img.resize((size, size), Image.LANCZOS)
