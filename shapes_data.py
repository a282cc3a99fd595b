"""The synthetic visual task the embedded tiny model is trained on: coloured shapes on a light background.

Each image has any size from 100 to 1000 px per side (so any aspect ratio up to 1:10), a plain light background of a
random shade, and 1 to 3 filled shapes of ONE kind (circle, square, triangle) and ONE colour (red, green, blue, yellow),
each colour drawn in a random shade. Four kinds of question, each in the wordings people use (WORDINGS):

    What colour is the shape? / What color are they? / ...  -> red / green / blue / yellow
    What shape is it? / What kind of shapes are these? / ... -> circle / square / triangle
    How many shapes are there? / Count the shapes. / ...    -> one / two / three
    How many circles are there? / ...                        -> zero / one / two / three
    anything else ("Describe the image.")                    -> OFF_TASK_ANSWER

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
# The task's smallest shape and narrowest gap between shapes, as shares of the image's long side: 14 px and 4 px of
# the embedded model's 128-px view (the long side scaled to 128), where smaller shapes are a few blurred pixels and
# closer ones blur into one. Measured on the shipped weights: counts of two or three shapes 82-90% right with a shape
# under 11%, 98.7% above; 5 of 9 wrong with gaps under 3 px of the view.
MIN_SHAPE, MIN_GAP = 0.11, 0.03
# Training draws beyond the task, down to 8% of the long side and 3-px gaps: harder images than the task promises.
TRAINING_BOUNDS = {"min_shape": 0.08, "min_gap": 0.0}
MAX_SHAPE = 0.8  # of the image's short side: the largest a shape grows, and the floor in strips too thin for MIN_SHAPE
BACKGROUND = (205, 255)  # light shades, per channel, at most 25 apart so that they stay greyish
OFF_TASK_ANSWER = "I only know the colour, shape and number of the shapes in an image."


@dataclass(frozen=True)
class Question:
    """One wording of a question: what it asks (`kind`), its wording family, and for counts of a kind, which shape."""

    text: str
    kind: str  # one of KINDS
    family: str
    shape: str | None = None  # the shape a "How many circles ..." question counts


def _family(kind: str, family: str, texts: tuple[str, ...], shape: str | None = None) -> tuple[Question, ...]:
    return tuple(Question(text, kind, family, shape) for text in texts)


def _count_of(shape: str) -> tuple[Question, ...]:
    plural = shape + "s"
    return _family("count of a kind", plural, (
        f"How many {plural} are there?", f"How many {plural} are in the image?", f"How many {plural} do you see?",
        f"How many {plural} can you see?", f"Count the {plural}.", f"What is the number of {plural}?"), shape)


KINDS = ("colour", "shape", "count", "count of a kind", "off-task")
# Every wording the model is trained on, by family. Each family must reach the accuracy bar on its own.
WORDINGS: tuple[Question, ...] = (
    *_family("colour", "singular", ("What colour is the shape?", "What colour is it?", "What colour is this?")),
    *_family("colour", "plural", ("What colour are the shapes?", "What colour are they?", "What colour are these?")),
    *_family("colour", "color", ("What color is the shape?", "What color is it?", "What color are the shapes?",
                                 "What color are they?")),
    *_family("colour", "which colour", ("Which colour is the shape?", "Which colour are the shapes?",
                                        "Which color is it?", "Which color are they?")),
    *_family("colour", "other", ("What is the colour of the shape?", "What is the colour of the shapes?",
                                 "What colour do you see?", "Tell me the colour.", "Colour?")),
    *_family("shape", "singular", ("What shape is it?", "What shape is this?", "What shape is the shape?")),
    *_family("shape", "plural", ("What shape are they?", "What shape are these?", "What shapes are there?",
                                 "What shape are the shapes?")),
    *_family("shape", "what kind of shape", ("What kind of shape is it?", "What kind of shape is this?",
                                             "What kind of shapes are they?", "What kind of shapes are these?")),
    *_family("shape", "other", ("Which shape is it?", "What is the shape?", "Name the shape.",
                                "Is it a circle, a square or a triangle?", "Shape?")),
    *_family("count", "how many shapes", ("How many shapes are there?", "How many shapes are in the image?",
                                          "How many shapes do you see?", "How many shapes can you see?")),
    *_family("count", "other", ("How many are there?", "Count the shapes.", "What is the number of shapes?",
                                "How many objects are there?", "Number of shapes?")),
    *_count_of("circle"), *_count_of("square"), *_count_of("triangle"),
    *_family("off-task", "off-task", (
        "What is shown in the image?", "Describe the image.", "What is this?", "What is in this picture?",
        "Is there a dog?", "What does the text say?", "Who is in the photo?", "Where was this taken?",
        "What time is it?", "Hello!", "Tell me a joke.", "What is the capital of France?",
        "Write a poem about the sea.", "What is 2 + 2?", "Is this image real?", "What is the weather like?",
        "Describe the picture in detail.", "What do you see?", "Can you help me?", "What is the background?",
        "Translate this into French.", "How big is the image?", "Who made this?", "Summarise the image.",
        # Questions shaped like the task's ("What ... is this?", "How many ...", "Can you ...") about something else:
        # the sentence must follow what is asked, not the question's form.
        "What fruit is this?", "What letter is this?", "What object is this?", "What kind of food is it?",
        "How many people are there?", "How many cars are there?", "How many dogs are in the picture?",
        "Can you describe it?", "Please tell me what you see.", "Could you explain this image?", "Is it a cat?",
        "What is written here?", "Who is this?", "What is happening?", "What is the name of this place?",
        "What language is this?", "What year is it?", "Write a song.", "What is your name?",
        "Is this a photo or a drawing?", "What is the mood of the image?", "Explain the picture.", "Thanks!")),
)
BY_TEXT = {question.text: question for question in WORDINGS}
FAMILIES = tuple(dict.fromkeys((question.kind, question.family) for question in WORDINGS))
# One wording per kind of question about the shapes: the canonical questions of the README, ask.py and the tests.
COLOUR_QUESTION, SHAPE_QUESTION, COUNT_QUESTION = ("What colour is the shape?", "What shape is it?",
                                                   "How many shapes are there?")
COUNT_OF_KIND_QUESTION = "How many circles are there?"
QUESTIONS = (COLOUR_QUESTION, SHAPE_QUESTION, COUNT_QUESTION, COUNT_OF_KIND_QUESTION)


@dataclass(frozen=True)
class Scene:
    """What an image shows: the answer to each question is a function of it."""

    shape: str
    colour: str
    count: int

    def answer(self, question: str) -> str:
        """The answer to one of WORDINGS' questions."""
        asked = BY_TEXT.get(question)
        if asked is None:
            raise ValueError(f"unknown question {question!r}; expected one of shapes_data.WORDINGS")
        if asked.kind == "colour":
            return self.colour
        if asked.kind == "shape":
            return self.shape
        if asked.kind == "count":
            return COUNT_WORDS[self.count - 1]
        if asked.kind == "count of a kind":
            return COUNT_WORDS[self.count - 1] if asked.shape == self.shape else "zero"
        return OFF_TASK_ANSWER


def _shade(rng: random.Random, ranges: tuple[tuple[int, int], ...]) -> tuple[int, int, int]:
    return tuple(rng.randint(low, high) for low, high in ranges)  # type: ignore[return-value]


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(*BACKGROUND)
    return tuple(min(255, max(BACKGROUND[0], base + rng.randint(-12, 12))) for _ in range(3))  # type: ignore


def elongated_size(rng: random.Random, low: float, high: float) -> tuple[int, int]:
    """A random image size of aspect ratio `low` to `high`, wide or tall, its sides within MIN_SIDE..MAX_SIDE."""
    aspect = rng.uniform(low, high)
    short = rng.randint(MIN_SIDE, int(MAX_SIDE / aspect))
    return (int(short * aspect), short) if rng.random() < 0.5 else (short, int(short * aspect))


def _place(rng: random.Random, width: int, height: int, sizes: list[int],
           min_gap: float) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping boxes of the given sizes, anywhere up to the image's edges, with a gap of a
    random width (at least `min_gap` of the long side) between them, or None if they did not fit."""
    boxes: list[tuple[int, int, int]] = []
    gap = max(3, int(max(width, height) * min_gap), int(min(sizes) * rng.uniform(0.1, 0.5)))
    for size in sizes:
        for _ in range(200):
            x, y = rng.randint(0, width - size - 1), rng.randint(0, height - size - 1)
            if all(x + size + gap <= bx or bx + bsize + gap <= x or y + size + gap <= by or by + bsize + gap <= y
                   for bx, by, bsize in boxes):
                boxes.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def _triangle(x: float, y: float, side: float, pointing: str) -> list[tuple[float, float]]:
    """An isosceles triangle filling the box at (x, y), its apex pointing up, down, left or right."""
    mid, end = side / 2, side
    return {"up": [(x + mid, y), (x, y + end), (x + end, y + end)],
            "down": [(x + mid, y + end), (x, y), (x + end, y)],
            "left": [(x, y + mid), (x + end, y), (x + end, y + end)],
            "right": [(x + end, y + mid), (x, y), (x, y + end)]}[pointing]


def draw_scene(scene: Scene, rng: random.Random, size: tuple[int, int] | None = None,
               min_shape: float = MIN_SHAPE, min_gap: float = MIN_GAP) -> Image.Image:
    """An RGB image of `scene` with a random size (or `size`), background shade, shape shade, sizes and positions,
    anti-aliased or not; no shape under `min_shape` of the long side, none closer than `min_gap` to another."""
    if scene.shape not in SHAPES or scene.colour not in COLOURS or scene.count not in (1, 2, 3):
        raise ValueError(f"cannot draw {scene}: shape in {SHAPES}, colour in {tuple(COLOURS)}, count 1 to 3")
    while True:
        if size is None:  # each side on its own: every aspect ratio up to 1:10, most of them moderate
            width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        else:
            width, height = size
        # Shapes scale with the short side; three of them must fit, so they are smaller when there are more. An
        # elongated image has room along its long side: its shapes grow, up to MAX_SHAPE of the short side, and none
        # is under `min_shape` of the long side (or MAX_SHAPE of the short side, in strips too thin for that), so that
        # none shrinks to a few pixels once the image is padded to a square.
        low, high = {1: (0.2, 0.75), 2: (0.18, 0.5), 3: (0.15, 0.38)}[scene.count]
        short, long = min(width, height), max(width, height)
        grow = min(long / short, MAX_SHAPE / high)
        floor = min(long * min_shape, short * MAX_SHAPE)
        sizes = [int(max(short * rng.uniform(low * grow, high * grow), floor)) for _ in range(scene.count)]
        corners = _place(rng, width, height, sizes, min_gap)
        if corners is not None:
            break
    # Half the images are drawn at twice the size and scaled down: anti-aliased edges, as other programs draw them.
    scale = 2 if rng.random() < 0.5 else 1
    image = Image.new("RGB", (width * scale, height * scale), _background(rng))
    draw = ImageDraw.Draw(image)
    colour = _shade(rng, COLOURS[scene.colour])
    pointing = rng.choices(("up", "down", "left", "right"), weights=(4, 2, 1, 1))[0]
    for (x, y), side in zip(corners, sizes):
        x, y, side = x * scale, y * scale, side * scale
        if scene.shape == "circle":
            draw.ellipse((x, y, x + side, y + side), fill=colour)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + side, y + side), fill=colour)
        else:
            draw.polygon(_triangle(x, y, side, pointing), fill=colour)
    return image.resize((width, height), Image.Resampling.LANCZOS) if scale > 1 else image


EXAMPLE = Scene("triangle", "green", 1)  # assets/example.png: write_example(); the README's first example asks about it


def write_example(path: Path, seed: int = 7) -> None:
    """Draw assets/example.png: EXAMPLE at 640x480, seeded."""
    draw_scene(EXAMPLE, random.Random(seed), size=(640, 480)).save(path)


def random_scene(rng: random.Random, question: str | None = None) -> Scene:
    """A random scene of 1 to 3 shapes; for a count of a kind ("How many circles ..."), half of them of that kind."""
    asked = BY_TEXT.get(question) if question else None
    if asked is not None and asked.shape is not None and rng.random() < 0.5:
        shape = asked.shape
    elif asked is not None and asked.shape is not None:
        shape = rng.choice([other for other in SHAPES if other != asked.shape])
    else:
        shape = rng.choice(SHAPES)
    return Scene(shape, rng.choice(tuple(COLOURS)), rng.randint(1, 3))


# How often training asks each kind of question: a count of a kind needs both the shape and the count, and "zero".
KIND_WEIGHTS = {"colour": 0.2, "shape": 0.24, "count": 0.14, "count of a kind": 0.32, "off-task": 0.1}


def random_question(rng: random.Random, family: tuple[str, str] | None = None,
                    weights: dict[str, float] | None = None) -> str:
    """A random wording: of a random kind (`weights`, by default KIND_WEIGHTS) and family, or of the given
    (kind, family)."""
    if family is None:
        weights = weights or KIND_WEIGHTS
        kind = rng.choices(KINDS, weights=[weights[kind] for kind in KINDS])[0]
        family = rng.choice([pair for pair in FAMILIES if pair[0] == kind])
    return rng.choice([question.text for question in WORDINGS if (question.kind, question.family) == family])


def random_sample(rng: random.Random, weights: dict[str, float] | None = None) -> tuple[Scene, str]:
    """A random question (of a kind drawn with `weights`, by default KIND_WEIGHTS) and a random scene for it."""
    question = random_question(rng, weights=weights)
    return random_scene(rng, question), question


def write_dataset(out_dir: Path, count: int, seed: int, max_side: int | None = None,
                  weights: dict[str, float] | None = None, strips: float = 0.0) -> Path:
    """Write `count` samples (PNG images + samples.jsonl in finetune.py's format); returns the JSONL path. With
    `max_side`, larger images are saved scaled down to it (same aspect ratio): faster to write and read. `weights`:
    how often each kind of question is asked (default KIND_WEIGHTS); `strips`: the share of images elongated 1:2.5 to
    1:8 (beyond the share their random sides give). Drawn within TRAINING_BOUNDS, beyond the task's."""
    rng = random.Random(seed)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        scene, question = random_sample(rng, weights)
        name = f"images/{index:06d}.png"
        strip = strips and rng.random() < strips
        image = draw_scene(scene, rng, size=elongated_size(rng, 2.5, 8.0) if strip else None, **TRAINING_BOUNDS)
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        image.save(out_dir / name)
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
