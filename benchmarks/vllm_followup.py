"""Does vLLM reuse its prefix cache (and so skip the image encoder) for a follow-up question about the same image?

    .venv-vllm/bin/python benchmarks/vllm_followup.py [--size base|embedded] [--rounds 5]

Runs in the vLLM virtualenv. One engine with automatic prefix caching (vLLM's default; `--enable-prefix-caching`
on the server) answers, each round on a new image, a first question and then the follow-up chat (image, question,
answer, next question), one token each: the time to first token of both, and how many prompt tokens vLLM found in
its prefix cache (`RequestOutput.num_cached_tokens`). Control: the same follow-up on an engine without prefix caching.
Prints the median follow-up / first ratio for each engine. Random weights at `base` (577 visual tokens per image);
`embedded` is the embedded tiny model.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from vllm_throughput import SIZES, build_folder  # noqa: E402

from shapes_data import draw_scene, random_scene  # noqa: E402

FIRST, FOLLOW_UP = "How many shapes are there?", "What colour are they?"


def turns(image, answer: Optional[str]) -> list[dict]:
    """The first question about `image`, or, given its answer, the follow-up chat."""
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": FIRST}]}]
    if answer is not None:
        chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    return chat


def measure(folder: Path, prefix_caching: bool, rounds: int) -> dict[str, list[float]]:
    """Per round (a new image each): TTFT of the first question, of the follow-up, and the follow-up's cached tokens."""
    import vllm

    llm = vllm.LLM(model=str(folder), trust_remote_code=True, model_impl="transformers", dtype="float32",
                   max_model_len=2048, enforce_eager=True, seed=0, enable_prefix_caching=prefix_caching)
    params = vllm.SamplingParams(max_tokens=1, temperature=0.0)
    rng = random.Random(0)
    result: dict[str, list[float]] = {"first": [], "follow_up": [], "cached_tokens": [], "prompt_tokens": []}
    for index in range(rounds + 1):  # the first round warms up
        image = draw_scene(random_scene(rng), rng)
        start = time.perf_counter()
        first = llm.chat([turns(image, None)], params, use_tqdm=False)[0]
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        follow = llm.chat([turns(image, first.outputs[0].text or "one")], params, use_tqdm=False)[0]
        follow_s = time.perf_counter() - start
        if index:
            result["first"].append(first_s)
            result["follow_up"].append(follow_s)
            result["cached_tokens"].append(follow.num_cached_tokens or 0)
            result["prompt_tokens"].append(len(follow.prompt_token_ids))
    del llm
    gc.collect()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """Measure with and without prefix caching; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="base")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="florence_vl_vllm_followup_") as tmp:
        folder = build_folder(args.size, Path(tmp), torch.float32)
        for caching in (True, False):
            run = measure(folder, caching, args.rounds)
            ratios = [f / s for f, s in zip(run["follow_up"], run["first"])]
            print(f"prefix caching {'on ' if caching else 'off'}: follow-up TTFT / first x{statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f}); first {statistics.median(run['first']):.3f} s; "
                  f"follow-up prompt {run['prompt_tokens'][0]} tokens, {statistics.median(run['cached_tokens']):.0f} "
                  "found in the prefix cache", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
