"""The one writer of Florence-VL model folders: every folder this project writes (the converter's, finetune.py's,
train_embedded_model.py's, the benchmarks') is a complete Hub repo that loads when copied alone: weights and config,
processor (tokenizer, chat template, image processor), the remote-code files themselves (never links), a card with
Hub metadata, and the example image its card opens. The shipped folder assets/tiny-florence-vl holds the same files,
its code as copies of the root's (people copy, zip and upload folders with tools that drop or break links); a test
keeps them byte-equal."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from cli_common import ROOT, looks_like_hub_id, register_model_package

register_model_package()
from florence_vl.configuration_florence_vl import REMOTE_CODE_FILES  # noqa: E402

EXAMPLE_IMAGE = ROOT / "assets" / "example.png"


def write_model_folder(folder: Path, processor: Any, card: str, model: Optional[Any] = None) -> Path:
    """Complete `folder` as a Hub repo: the model (omit it when its weights and config are written already), the
    processor, the remote-code files, the card (README.md) and assets/example.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    copy_remote_code(folder)
    (folder / "README.md").write_text(card)
    (folder / "assets").mkdir(exist_ok=True)
    shutil.copyfile(EXAMPLE_IMAGE, folder / "assets" / "example.png")
    for path in folder.rglob("*.safetensors"):  # written through a temporary file (mode 600): readable like the rest
        path.chmod(0o644)
    return folder


def copy_remote_code(folder: Path) -> None:
    """The root's remote-code files into `folder`, as files (never links): the folder travels alone."""
    for name in REMOTE_CODE_FILES:
        target = Path(folder) / name
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(ROOT / name, target)


def derived_card(base: str, title: str, what: str) -> str:
    """The card of a model trained from `base` (a folder or a Hub id): the base card's Hub metadata (licence, tags),
    `base_model` naming the base when it is a Hub id, a title and what was done."""
    meta: dict[str, Any] = {}
    readme = Path(base) / "README.md"
    if readme.is_file() and readme.read_text().startswith("---\n"):
        meta = yaml.safe_load(readme.read_text().split("\n---\n", 1)[0][4:]) or {}
    meta.setdefault("license", "other")
    meta["library_name"], meta["pipeline_tag"] = "transformers", "image-text-to-text"
    meta["tags"] = sorted(set(meta.get("tags") or []) | {"florence-vl", "custom_code"})
    if not Path(base).exists() and looks_like_hub_id(base):
        meta["base_model"] = [base]
    usage = ('```python\nfrom transformers import pipeline\n\n'
             'pipe = pipeline("image-text-to-text", model="path/or/hub-id/of/this/folder", trust_remote_code=True)\n'
             'messages = [{"role": "user", "content": [{"type": "image", "image": "assets/example.png"},\n'
             '                                         {"type": "text", "text": "What colour is the shape?"}]}]\n'
             'print(pipe(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])\n```\n')
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {title}\n\n{what}\n\n"
            f"A complete Florence-VL folder (code, weights, processor, chat template): it loads with "
            f"`trust_remote_code=True` from anywhere, copied alone or uploaded to the Hub.\n\n{usage}")
