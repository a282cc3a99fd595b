"""A second, independent drawing program for the embedded model's task, never used in training: the tests measure
whether the model learnt the task or shapes_data.py's way of drawing it.

Same task (one kind and one colour of shape per image, 1 to 3 shapes, a light background), drawn differently: common
photo and banner aspect ratios instead of independent sides, named colours and backgrounds from PIL's colour table,
equilateral triangles (regular_polygon) instead of isosceles ones filling a box, shape sizes relative to the image's
cell (one cell per shape along the long side, a tenth of each cell kept free between shapes) rather than to the
short side, positions anywhere in the cell including against the image's edges, and anti-aliasing by 4x
supersampling (box filter) or none.
"""

from __future__ import annotations

import random

from PIL import Image, ImageColor, ImageDraw

ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0, 4.0)
NAMED = {
    "red": ("red", "crimson", "firebrick", "#d62728"),
    "green": ("green", "forestgreen", "limegreen", "#2ca02c"),
    "blue": ("blue", "mediumblue", "#1f4fd0", "#2040e0"),
    "yellow": ("yellow", "gold", "#f0e000", "#ffd800"),
}
BACKGROUNDS = ("white", "ivory", "whitesmoke", "linen", "honeydew", "aliceblue", "lavender", "beige", "mintcream",
               "gainsboro", "oldlace", "seashell")


def draw(scene, rng: random.Random, size: tuple[int, int] | None = None) -> Image.Image:
    """An image of `scene` (shapes_data.Scene: shape, colour, count) in this program's own style."""
    if size is None:
        aspect = rng.choice(ASPECTS)
        long = rng.randint(150, 1000)
        short = max(100, round(long / aspect))
        size = (long, short) if rng.random() < 0.6 else (short, long)
    width, height = size
    supersample = 4 if rng.random() < 0.5 else 1
    image = Image.new("RGB", (width * supersample, height * supersample), ImageColor.getrgb(rng.choice(BACKGROUNDS)))
    pen = ImageDraw.Draw(image)
    colour = ImageColor.getrgb(rng.choice(NAMED[scene.colour]))
    wide = width >= height
    cell = (width if wide else height) / scene.count  # one cell per shape along the long side
    across = height if wide else width
    for index in range(scene.count):
        side = min(cell * 0.9, across) * rng.uniform(0.3, 0.95)
        along = index * cell + rng.uniform(0, cell * 0.9 - side) + (cell * 0.1 if index else 0)  # a gap between
        other = rng.uniform(0, across - side)
        x, y = (along, other) if wide else (other, along)
        x, y, side = x * supersample, y * supersample, side * supersample
        box = (x, y, x + side - 1, y + side - 1)
        if scene.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif scene.shape == "square":
            pen.rectangle(box, fill=colour)
        else:  # an equilateral triangle, apex up or down, its centre moved so that it spans the box's height
            rotation = rng.choice((0, 180))
            shift = 0.1 if rotation == 0 else -0.1
            pen.regular_polygon((x + side / 2, y + side * (0.5 + shift), side * 0.55), 3, rotation=rotation,
                                fill=colour)
    if supersample > 1:
        image = image.resize((width, height), Image.Resampling.BOX)
    return image
