"""vLLM offline throughput against transformers `generate` on the same image requests, same machine, same dtype.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--size base|embedded] [--requests 8] [--new-tokens 16]

Runs in the vLLM virtualenv (scripts/setup_vllm_venv.sh). Random weights (nothing is downloaded): `base` is
benchmark.py's base size (Florence-2-base tower and encoder, a 0.49B Llama-style LLM; 768x768 images, 577 visual
tokens) with the embedded model's tokenizer; `embedded` is the embedded tiny model (a seconds-long smoke run).
Each side answers the same `--requests` chats (a different image and question each) with exactly `--new-tokens`
greedy tokens: transformers as one left-padded batch, vLLM as concurrent requests of one `LLM.chat` call. Both get a
warm-up request first; the engine's start-up is not timed. Prints requests/s, tokens/s and the ratio vLLM / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# vLLM's engine in this process (one process measures both sides), a small CPU KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402  (sets the offline Hub, exposes the repo as package florence_vl)
import torch  # noqa: E402
from ask import materialise_embedded_model  # noqa: E402
from model_folder import derived_card, write_model_folder  # noqa: E402
from shapes_data import QUESTIONS, draw_scene, random_scene  # noqa: E402
from train_embedded_model import chat_batch  # noqa: E402

SIZES = ("base", "embedded")


def build_folder(size: str, folder: Path, dtype: torch.dtype) -> Path:
    """A complete remote-code folder of `size` with random weights (config, weights, code, tokenizer, template)."""
    embedded = materialise_embedded_model(folder / "embedded")
    if size == "embedded":
        return embedded
    from transformers import AutoProcessor

    from florence_vl.processing_florence_vl import FlorenceVLProcessor, default_image_processor

    out = folder / size
    model = benchmark.build_model(size, torch.device("cpu"), dtype)
    tokenizer_side = AutoProcessor.from_pretrained(embedded, trust_remote_code=True)
    processor = FlorenceVLProcessor(image_processor=default_image_processor(), tokenizer=tokenizer_side.tokenizer,
                                    chat_template=tokenizer_side.chat_template, image_token=tokenizer_side.image_token)
    model.config.image_token_id = processor.image_token_id
    card = derived_card(str(embedded), f"Florence-VL {size} (random weights)", "Random weights, for benchmarks.")
    return write_model_folder(out, processor, card, model=model)


def requests(count: int, seed: int = 0) -> list[tuple[object, str]]:
    """`count` (image, question) pairs: drawn scenes of different sizes, the three task questions in turn."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        question = QUESTIONS[index % len(QUESTIONS)]
        pairs.append((draw_scene(random_scene(rng, question), rng), question))
    return pairs


def time_transformers(folder: Path, pairs: list, new_tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds for transformers to answer all pairs as one batch (after a one-request warm-up)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def run(batch: list) -> None:
        inputs = chat_batch(processor, [image for image, _ in batch], [question for _, question in batch])
        with torch.no_grad():
            model.generate(**inputs.to(device).to(dtype), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
        benchmark.synchronize(device)

    run(pairs[:1])
    started = time.perf_counter()
    run(pairs)
    return time.perf_counter() - started


def time_vllm(folder: Path, pairs: list, new_tokens: int, dtype: torch.dtype) -> float:
    """Seconds for vLLM to answer all pairs as concurrent requests of one call (after a one-request warm-up)."""
    import vllm

    llm = vllm.LLM(model=str(folder), trust_remote_code=True, model_impl="transformers",
                   dtype=str(dtype).replace("torch.", ""), max_model_len=1024, enforce_eager=True, seed=0)
    params = vllm.SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0)

    def run(batch: list) -> None:
        chats = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                               {"type": "text", "text": q}]}] for image, q in batch]
        outputs = llm.chat(chats, params, use_tqdm=False)
        assert all(len(output.outputs[0].token_ids) == new_tokens for output in outputs)

    run(pairs[:1])
    started = time.perf_counter()
    run(pairs)
    return time.perf_counter() - started


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="of the transformers side (vLLM uses its platform's device)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    import transformers
    import vllm

    pairs = requests(args.requests)
    with tempfile.TemporaryDirectory(prefix="florence_vl_vllm_bench_") as scratch:
        folder = build_folder(args.size, Path(scratch), dtype)
        hf_seconds = time_transformers(folder, pairs, args.new_tokens, dtype, device)
        vllm_seconds = time_vllm(folder, pairs, args.new_tokens, dtype)
    tokens = args.requests * args.new_tokens
    result = {
        "machine": benchmark.machine(device), "vllm": vllm.__version__,
        "transformers": transformers.__version__, "size": args.size, "dtype": args.dtype,
        "requests": args.requests, "new_tokens": args.new_tokens,
        "transformers_seconds": hf_seconds, "vllm_seconds": vllm_seconds, "ratio": hf_seconds / vllm_seconds,
    }
    print(f"Machine: {result['machine']}; vLLM {result['vllm']}; {args.dtype}; size {args.size}; "
          f"{args.requests} image requests x {args.new_tokens} new tokens")
    print("| engine | seconds | requests/s | tokens/s |\n| --- | ---: | ---: | ---: |")
    for name, seconds in (("transformers generate (one batch)", hf_seconds), ("vLLM LLM.chat (concurrent)", vllm_seconds)):
        print(f"| {name} | {seconds:.2f} | {args.requests / seconds:.2f} | {tokens / seconds:.1f} |")
    print(f"vLLM / transformers throughput: {result['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
