"""lmms-eval hooks of the `florence_vl_shapes` task: images from the task folder, the question as the prompt, exact
match of the one-word answer. Copied next to the task's data by evaluation/make_shapes_task.py."""

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


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1 when the answer's first word (lower case, without punctuation) is the expected word."""
    words = results[0].strip().lower().replace(".", " ").split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}
