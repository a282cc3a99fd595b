"""Answer a question about an image with Florence-VL: the main job of this repo.

    python ask.py --image assets/example.png --question "What is shown in the image?" [--model PATH_OR_REPO]

Without --model it runs the embedded tiny model (assets/tiny-random-florence-vl): its config, tokenizer and chat
template are real, its weights are RANDOM (seeded), so its answers are gibberish. It exercises exactly the code path
of a converted release: remote code loaded with trust_remote_code=True, the processor, the pipeline.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "assets" / "tiny-random-florence-vl"
REMOTE_CODE = ("configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py")


def materialise_embedded_model(folder: Path, seed: int = 0) -> Path:
    """Write the embedded tiny model into `folder`: its files, this repo's code, seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    shutil.copytree(EMBEDDED_MODEL, folder, dirs_exist_ok=True)
    for name in REMOTE_CODE:
        shutil.copy(ROOT / name, folder / name)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, trust_remote_code=True)
    model.save_pretrained(folder)
    return folder


def answer(model: str, image: str, question: str, max_new_tokens: int = 64, device: str | None = None) -> str:
    """The model's answer to `question` about `image` (a path or URL), through the image-text-to-text pipeline."""
    import torch
    from transformers import pipeline

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = pipeline("image-text-to-text", model=model, trust_remote_code=True, device=device, dtype=dtype)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    output = pipe(text=messages, max_new_tokens=max_new_tokens, return_full_text=False, generate_kwargs={"do_sample": False})
    return output[0]["generated_text"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(ROOT / "assets" / "example.png"), help="image path or URL")
    parser.add_argument("--question", default="What is shown in the image?")
    parser.add_argument("--model", help="converted Florence-VL folder or Hub id (default: embedded tiny model)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    args = parser.parse_args(argv)

    if args.image and not args.image.startswith(("http://", "https://")) and not Path(args.image).is_file():
        parser.error(f"no image file at {args.image}")
    with tempfile.TemporaryDirectory(prefix="florence_vl_tiny_") as scratch:
        model = args.model
        if model is None:
            print("No --model given: using the embedded tiny model with RANDOM weights (answers are gibberish).")
            model = str(materialise_embedded_model(Path(scratch) / "tiny-random-florence-vl"))
        text = answer(model, args.image, args.question, args.max_new_tokens, args.device)
    print(f"Q: {args.question}\nA: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
