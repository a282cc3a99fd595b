"""The synthetic visual task the embedded tiny model is trained on: coloured shapes on a light background.

Each image has any size from 100 to 1000 px per side (so any aspect ratio up to 1:10), a plain light background of a
random shade, and 1 to 3 filled shapes of ONE kind (circle, square, triangle) and ONE colour (red, green, blue, yellow),
each colour drawn in a random shade. Three questions, each answered with one word:

    What colour is the shape?   -> red / green / blue / yellow      (one shape)
    What shape is it?           -> circle / square / triangle       (one shape)
    How many shapes are there?  -> one / two / three                (1 to 3 shapes)

    python shapes_data.py OUT_DIR --count 1000 --seed 0      # OUT_DIR/samples.jsonl + OUT_DIR/images/*.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
COUNT_QUESTION = "How many shapes are there?"
QUESTIONS = (COLOUR_QUESTION, SHAPE_QUESTION, COUNT_QUESTION)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
# Each colour as per-channel ranges: any shade that a person would still call by that name.
COLOURS = {
    "red": ((170, 255), (0, 70), (0, 70)),
    "green": ((0, 70), (120, 220), (0, 80)),
    "blue": ((0, 60), (0, 110), (160, 255)),
    "yellow": ((215, 255), (195, 240), (0, 60)),
}
MIN_SIDE, MAX_SIDE = 100, 1000  # image sides in pixels
BACKGROUND = (205, 255)  # light shades, per channel, at most 25 apart so that they stay greyish


@dataclass(frozen=True)
class Scene:
    """What an image shows: the answer to each question is a function of it."""

    shape: str
    colour: str
    count: int

    def answer(self, question: str) -> str:
        """The one-word answer to one of QUESTIONS."""
        if question == COLOUR_QUESTION:
            return self.colour
        if question == SHAPE_QUESTION:
            return self.shape
        if question == COUNT_QUESTION:
            return COUNT_WORDS[self.count - 1]
        raise ValueError(f"unknown question {question!r}; expected one of {QUESTIONS}")


def _shade(rng: random.Random, ranges: tuple[tuple[int, int], ...]) -> tuple[int, int, int]:
    return tuple(rng.randint(low, high) for low, high in ranges)  # type: ignore[return-value]


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(*BACKGROUND)
    return tuple(min(255, max(BACKGROUND[0], base + rng.randint(-12, 12))) for _ in range(3))  # type: ignore


def _place(rng: random.Random, width: int, height: int, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping boxes (with a gap) of the given sizes, or None if they did not fit."""
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(200):
            x, y = rng.randint(2, width - size - 2), rng.randint(2, height - size - 2)
            gap = max(4, size // 5)
            if all(x + size + gap <= bx or bx + bsize + gap <= x or y + size + gap <= by or by + bsize + gap <= y
                   for bx, by, bsize in boxes):
                boxes.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def draw_scene(scene: Scene, rng: random.Random, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image of `scene` with a random size (or `size`), background shade, shape shade, sizes and positions."""
    if scene.shape not in SHAPES or scene.colour not in COLOURS or scene.count not in (1, 2, 3):
        raise ValueError(f"cannot draw {scene}: shape in {SHAPES}, colour in {tuple(COLOURS)}, count 1 to 3")
    while True:
        if size is None:  # each side on its own: every aspect ratio up to 1:10, most of them moderate
            width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        else:
            width, height = size
        # Shapes scale with the short side; three of them must fit, so they are smaller when there are more. An
        # elongated image has room along its long side: its shapes grow, up to 0.8 of the short side, so that they do
        # not shrink to a few pixels once the image is padded to a square.
        low, high = {1: (0.35, 0.7), 2: (0.25, 0.45), 3: (0.22, 0.35)}[scene.count]
        grow = min(max(width, height) / min(width, height), 0.8 / high)
        sizes = [int(min(width, height) * rng.uniform(low * grow, high * grow)) for _ in range(scene.count)]
        corners = _place(rng, width, height, sizes)
        if corners is not None:
            break
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    colour = _shade(rng, COLOURS[scene.colour])
    for (x, y), side in zip(corners, sizes):
        if scene.shape == "circle":
            draw.ellipse((x, y, x + side, y + side), fill=colour)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + side, y + side), fill=colour)
        else:  # an upright or upside-down isosceles triangle filling its box
            top, bottom = (y, y + side) if rng.random() < 0.75 else (y + side, y)
            draw.polygon([(x + side / 2, top), (x, bottom), (x + side, bottom)], fill=colour)
    return image


EXAMPLE = Scene("triangle", "green", 1)  # assets/example.png: write_example(); the README's first example asks about it


def write_example(path: Path, seed: int = 7) -> None:
    """Draw assets/example.png: EXAMPLE at 640x480, seeded."""
    draw_scene(EXAMPLE, random.Random(seed), size=(640, 480)).save(path)


def random_scene(rng: random.Random, question: str) -> Scene:
    """A random scene for `question`: colour and shape questions show one shape, count questions 1 to 3."""
    count = rng.randint(1, 3) if question == COUNT_QUESTION else 1
    return Scene(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), count)


def random_sample(rng: random.Random) -> tuple[Scene, str]:
    """A random question and a random scene for it."""
    question = rng.choice(QUESTIONS)
    return random_scene(rng, question), question


def write_dataset(out_dir: Path, count: int, seed: int) -> Path:
    """Write `count` samples (PNG images + samples.jsonl in finetune.py's format); returns the JSONL path."""
    rng = random.Random(seed)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        scene, question = random_sample(rng)
        name = f"images/{index:06d}.png"
        draw_scene(scene, rng).save(out_dir / name)
        lines.append(json.dumps({"image": name, "question": question, "answer": scene.answer(question)}))
    path = out_dir / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_dataset(args.out_dir, args.count, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
