"""Answer a question about an image with Florence-VL: the main job of this repo.

    python ask.py --image assets/example.png --question "What colour is the shape?" [--model PATH_OR_REPO]

Without --model it runs the embedded tiny model (assets/tiny-florence-vl): a miniature of the release (Llama-3
tokenizer and chat template, DaViT, the Florence-2 encoder over the three prompts, DBFusion, a small Llama) trained
here on one synthetic task (train_embedded_model.py): the colour, shape or number of the coloured shapes in an image
(EMBEDDED_SCOPE). It knows nothing else: real answers need a converted release (--model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from cli_common import (DEFAULT_MAX_NEW_TOKENS, ScriptParser, add_runtime_args, positive_int, quiet_libraries,
                        resolve_device, resolve_dtype, resolve_image, resolve_model, run)


ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "assets" / "tiny-florence-vl"
EMBEDDED_WEIGHTS = EMBEDDED_MODEL / "model.safetensors"
EMBEDDED_NOTICE = "No --model given: the embedded tiny model, which knows only coloured shapes (see README)."
EMBEDDED_SCOPE = ("The embedded tiny model answers questions about images of 1 to 3 circles, squares or triangles of "
                  "one colour (red, green, blue or yellow) on a light background, each at least a ninth of the longer "
                  "side of the image and apart from the others: their colour, their shape, how many "
                  "there are, and how many of a kind (\"How many circles are there?\"), asked in everyday wordings. "
                  "To anything else it answers that this is all it knows.")


def materialise_embedded_model(folder: Path, seed: int = 0, random_weights: bool = False) -> Path:
    """Copy the embedded tiny model into `folder` as an upload sends it, with its trained weights, or seeded random
    ones with `random_weights` (training's starting point)."""
    ignore = shutil.ignore_patterns("*.safetensors") if random_weights else None
    shutil.copytree(EMBEDDED_MODEL, folder, dirs_exist_ok=True, ignore=ignore)
    if random_weights:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        AutoModelForImageTextToText.from_config(config, trust_remote_code=True).save_pretrained(folder)
    return folder


def answer(model: str, image: Any, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           device: Optional[str] = None, dtype: str = "auto") -> str:
    """The model's answer to `question` about `image` (a PIL image, path or URL), through the image-text-to-text
    pipeline."""
    from transformers import pipeline

    device = resolve_device(device)
    pipe = pipeline("image-text-to-text", model=model, trust_remote_code=True, device=device,
                    dtype=resolve_dtype(dtype, device))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    output = pipe(text=messages, max_new_tokens=max_new_tokens, return_full_text=False,
                  generate_kwargs={"do_sample": False})
    return output[0]["generated_text"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments (the same --device/--dtype/--max-new-tokens as app.py)."""
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(ROOT / "assets" / "example.png"), help="image path or URL")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if not args.question.strip():
        parser.error("--question is empty")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    image = resolve_image(args.image)
    if args.model is None:
        print(EMBEDDED_NOTICE, file=sys.stderr)
        model = str(EMBEDDED_MODEL)
    else:
        model = resolve_model(args.model)
    text = answer(model, image, args.question, args.max_new_tokens, args.device, args.dtype)
    print(f"Q: {args.question}\nA: {text}")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(run(main))
