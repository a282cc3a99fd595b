"""lmms-eval hooks of the `florence_vl_shapes` task: images from the task folder, the question as the prompt, exact
match of the whole answer (a word, or the off-task sentence). Copied next to the task's data by
evaluation/make_shapes_task.py."""

from pathlib import Path
from typing import Any

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The sample's image (paths are relative to the task folder)."""
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    """The question as asked."""
    return doc["question"]


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1 when the whole answer is the expected one (case, full stops and spacing aside): a right word followed by more
    text does not count."""
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}
