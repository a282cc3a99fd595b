"""Answer questions about an image with Florence-VL: the main job of this repo.

    python ask.py --image assets/example.png --question "What colour is the shape?" [--model PATH_OR_REPO]
    python ask.py --image assets/example.png --question "How many shapes?" --question "What colour are they?"
    python ask.py --image assets/example.png       # at a terminal: asks for questions until an empty line or Ctrl-D

Several questions are one conversation: each is answered in turn, continuing from the cache of the turns before it
(the image and the earlier turns are not computed again; the answers are those of recomputing the whole chat).
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
from typing import Any, Iterator, Optional

from cli_common import (DEFAULT_MAX_NEW_TOKENS, ScriptParser, add_runtime_args, positive_int, quiet_libraries,
                        resolve_device, resolve_dtype, resolve_image, resolve_model, run)


ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "assets" / "tiny-florence-vl"
EMBEDDED_WEIGHTS = EMBEDDED_MODEL / "model.safetensors"
DEFAULT_QUESTION = "What colour is the shape?"
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


def load_model(model: str, device: Optional[str] = None, dtype: str = "auto") -> tuple[Any, Any]:
    """The model (greedy answers, eval mode) and its processor from a converted folder or Hub id, on `device`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(device)
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    loaded = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True,
                                                         dtype=resolve_dtype(dtype, device))
    return loaded.to(device).eval(), processor


class Conversation:
    """One chat with the model: each question is answered greedily, continuing from the cache of the turns before it
    (transformers' multi-turn pattern: the whole chat rendered again, the previous turn's `past_key_values` passed)."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.messages: list[dict[str, Any]] = []
        self.cache: Any = None

    def ask(self, question: str, image: Any = None, streamer: Any = None) -> str:
        """The answer to `question` (about `image` when given: a PIL image, path or URL, shown in this turn)."""
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        inputs = self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, past_key_values=self.cache, max_new_tokens=self.max_new_tokens,
                                     do_sample=False, return_dict_in_generate=True, streamer=streamer)
        answer = self.processor.decode(output.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.cache = output.past_key_values
        return answer


def questions_from_terminal() -> Iterator[str]:
    """Questions typed at the terminal, until an empty line or end of input (the prompt goes to stderr, so stdout
    holds the answers only)."""
    while True:
        print("Q: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        question = line.strip()
        if not question:
            if not line:
                print(file=sys.stderr)  # Ctrl-D: end the prompt's line
            return
        yield question


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments (the same --device/--dtype/--max-new-tokens as app.py)."""
    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(ROOT / "assets" / "example.png"), help="image path or URL")
    parser.add_argument("--question", action="append", help="a question about the image; repeat it for a "
                        "conversation (default: at a terminal, asked for; else \"What colour is the shape?\")")
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: the embedded tiny model)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if any(not question.strip() for question in args.question or []):
        parser.error("--question is empty")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Answer each question in turn, one conversation about the image."""
    args = parse_args(argv)
    image = resolve_image(args.image)
    if args.model is None:
        print(EMBEDDED_NOTICE, file=sys.stderr)
        model = str(EMBEDDED_MODEL)
    else:
        model = resolve_model(args.model)
    interactive = args.question is None and sys.stdin.isatty()
    questions = questions_from_terminal() if interactive else args.question or [DEFAULT_QUESTION]
    conversation = Conversation(*load_model(model, args.device, args.dtype), max_new_tokens=args.max_new_tokens)
    for number, question in enumerate(questions):
        text = conversation.ask(question, image if number == 0 else None)
        print(f"A: {text}" if interactive else f"Q: {question}\nA: {text}", flush=True)
    return 0


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(run(main))
