"""Florence-VL against its own parts, as ratios that machine noise cannot fool.

    python benchmarks/overhead.py [--size mid] [--dtype float32] [--batch 1] [--rounds 15] [--guard 1.5]
                                  [--groups decode,ttft,followup,features]

decode    time per new token inside `generate` (prefill excluded): ours with the image prompt and text-only, against
          the bare LLM (`AutoModelForCausalLM`) holding the same weights, also right after our image encoding (which
          leaves the process's memory in another state); control: a second copy of the bare LLM.
ttft      time to first token of ours against its parts: our image features + the bare LLM's prefill of the same
          length; control: the parts measured again.
followup  time to first token of a follow-up question (8 answer tokens then 24 question tokens after the image
          prompt) continued from the first turn's cache, against the first question's; control: the follow-up
          recomputed without the cache. Its greedy tokens are checked equal to the recompute's first.
features  our image features (depth + breadth + DBFusion projector) against transformers' native Florence-2
          encoding of the same tower: its image features, then its BART encoder over [image ; prompt] for the
          prompts; control: the native encoding measured again.

Both models are saved and loaded with `from_pretrained` (as users get them), in one process. Every round runs each
arm once, the arms' order rotating and reversing between rounds, and a ratio is taken within each round (neighbours
in time share the machine's load); the median ratio and its interquartile range over the rounds are printed. With
`--guard R`, exit 1 when a median ratio exceeds R (the CI guard; see benchmarks/README.md for how R was set).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import benchmark  # benchmarks/benchmark.py: sizes, random models, the step clock
import torch
from transformers import AutoModelForCausalLM, Florence2ForConditionalGeneration

from florence_vl.compatibility_florence_vl import image_features_tensor
from florence_vl.modeling_florence_vl import FlorenceVLForConditionalGeneration

Arm = Callable[[], float]


def rounds(arms: dict[str, Arm], count: int) -> dict[str, list[float]]:
    """Seconds of every arm in each of `count` rounds; the order rotates and reverses from round to round."""
    names = list(arms)
    for arm in arms.values():  # warm-up: allocator, kernels, lazy imports
        arm()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        shift = i % len(names)
        order = names[shift:] + names[:shift]
        if (i // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(arms[name]())
    return times


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and the first and third quartiles."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def ratios(times: dict[str, list[float]], pairs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> dict:
    """label -> spread of the per-round ratio of the sum of some arms to the sum of others."""
    def total(arms: tuple[str, ...], i: int) -> float:
        return sum(times[arm][i] for arm in arms)

    rounds_run = len(next(iter(times.values())))
    return {label: spread([total(top, i) / total(bottom, i) for i in range(rounds_run)])
            for label, (top, bottom) in pairs.items()}


# --------------------------------------------------------------------------------------------------------- models
def load_pair(size: str, device: torch.device, dtype: torch.dtype, workdir: Path) -> tuple:
    """Ours and the bare LLM with the same weights (twice: the control), each saved and loaded with from_pretrained."""
    model = benchmark.build_model(size, device, dtype)
    model.save_pretrained(workdir / "florence_vl")
    benchmark.bare_llm(model).save_pretrained(workdir / "llm")
    del model
    ours = FlorenceVLForConditionalGeneration.from_pretrained(workdir / "florence_vl", dtype=dtype).to(device).eval()
    bare, copy = (AutoModelForCausalLM.from_pretrained(workdir / "llm", dtype=dtype).to(device).eval() for _ in "ab")
    for net in (ours, bare, copy):
        net.generation_config.pad_token_id = ours.config.text_config.pad_token_id
    return ours, bare, copy


def native_florence2(model: FlorenceVLForConditionalGeneration) -> Florence2ForConditionalGeneration:
    """transformers' Florence-2 holding our tower, image projection and BART encoder (its decoder random)."""
    native = Florence2ForConditionalGeneration(benchmark.native_florence2_config(model.config))
    native = native.to(model.device, model.dtype).eval()
    native.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    native.model.multi_modal_projector.load_state_dict(model.model.vision_projector.state_dict())
    native.model.language_model.encoder.load_state_dict(model.model.breadth_encoder.state_dict())
    native.get_input_embeddings().load_state_dict(model.model.breadth_encoder.embed_tokens.state_dict())
    return native


@torch.no_grad()
def native_encoding(native: Florence2ForConditionalGeneration, pixel_values: torch.Tensor,
                    prompt_ids: torch.LongTensor) -> torch.Tensor:
    """Native Florence-2: image features once, then the encoder over [image ; prompt] for every image and prompt."""
    image = image_features_tensor(native.model.get_image_features(pixel_values))
    prompts = native.get_input_embeddings()(prompt_ids).to(image.dtype)
    images, tokens = image.shape[:2]
    embeds = torch.cat([image.repeat_interleave(len(prompts), 0), prompts.repeat(images, 1, 1)], dim=1)
    return native.model.language_model.encoder(inputs_embeds=embeds).last_hidden_state[:, :tokens]


# ----------------------------------------------------------------------------------------------------------- arms
def generate_seconds(net, inputs: dict) -> float:
    """Wall time of a one-token `generate` (time to first token)."""
    seconds, _ = benchmark.timed(lambda: net.generate(**inputs, max_new_tokens=1, do_sample=False), net.device)
    return seconds


def step_seconds(net, inputs: dict, new_tokens: int) -> float:
    """Median time per new token inside `generate`, the prefill's step excluded."""
    return statistics.median(benchmark.decode_step_times(net, inputs, new_tokens)[1])


def decode_ratios(ours, bare, copy, image: dict, text: dict, count: int, new_tokens: int) -> dict:
    """Time per new token of ours (image prompt, text only) against the bare LLM, and the bare-vs-bare control."""
    def bare_after_image() -> float:
        """The bare LLM's decode right after our image encoding (the process in the state ours decodes in)."""
        ours.get_image_features(image["pixel_values"])
        return step_seconds(bare, text, new_tokens)

    times = rounds({"image": lambda: step_seconds(ours, image, new_tokens),
                    "text": lambda: step_seconds(ours, text, new_tokens),
                    "bare": lambda: step_seconds(bare, text, new_tokens),
                    "bare_after_image": bare_after_image,
                    "copy": lambda: step_seconds(copy, text, new_tokens)}, count)
    return ratios(times, {
        "decode, text only: ours / bare LLM": (("text",), ("bare",)),
        "decode, image prompt: ours / bare LLM": (("image",), ("bare",)),
        "decode, image prompt: ours / bare LLM after the same image encoding": (("image",), ("bare_after_image",)),
        "decode control: bare LLM copy / bare LLM": (("copy",), ("bare",)),
    })


def features_seconds(ours, pixel_values: torch.Tensor) -> float:
    """Wall time of our image features (depth, breadth, DBFusion projector)."""
    return benchmark.timed(lambda: ours.get_image_features(pixel_values), ours.device)[0]


def ttft_ratios(ours, bare, image: dict, text: dict, count: int) -> dict:
    """Our time to first token against its parts: our image features + the bare LLM's prefill of the same length."""
    times = rounds({"ours": lambda: generate_seconds(ours, image),
                    "features": lambda: features_seconds(ours, image["pixel_values"]),
                    "prefill": lambda: generate_seconds(bare, text),
                    "features2": lambda: features_seconds(ours, image["pixel_values"]),
                    "prefill2": lambda: generate_seconds(bare, text)}, count)
    return ratios(times, {
        "TTFT: ours / (image features + LLM prefill)": (("ours",), ("features", "prefill")),
        "TTFT control: parts / parts again": (("features2", "prefill2"), ("features", "prefill")),
    })


def followup_ratios(ours, image: dict, count: int) -> dict:
    """A follow-up question's time to first token, continued from the first turn's cache, against the first
    question's, and against recomputing the whole follow-up conversation."""
    first = ours.generate(**image, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    batch = image["input_ids"].shape[0]
    question = torch.randint(10, 100, (batch, 24), generator=torch.Generator().manual_seed(1)).to(ours.device)
    ids = torch.cat([first.sequences, question], 1)
    follow_up = {"input_ids": ids, "pixel_values": image["pixel_values"], "attention_mask": torch.cat(
        [image["attention_mask"], torch.ones_like(ids[:, image["input_ids"].shape[1]:])], 1)}
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    continued = ours.generate(**follow_up, past_key_values=copy.deepcopy(first.past_key_values), **settings)
    if not torch.equal(continued, ours.generate(**follow_up, **settings)):
        raise RuntimeError("the follow-up continued from the cache differs from its recompute")

    def from_cache() -> float:
        cache = copy.deepcopy(first.past_key_values)  # generate extends it: a fresh copy each time, not timed
        return generate_seconds(ours, {**follow_up, "past_key_values": cache})

    times = rounds({"first": lambda: generate_seconds(ours, image), "from_cache": from_cache,
                    "recompute": lambda: generate_seconds(ours, follow_up)}, count)
    return ratios(times, {
        "follow-up TTFT from the cache / first question's TTFT": (("from_cache",), ("first",)),
        "follow-up TTFT from the cache / recomputed": (("from_cache",), ("recompute",)),
    })


def features_ratios(ours, pixel_values: torch.Tensor, count: int) -> dict:
    """Our image features against native Florence-2's encoding of the same tower (checked equal first)."""
    native = native_florence2(ours)
    prompt_ids = ours.model._prompt_ids(ours.config.breadth_prompts, ours.device)
    breadth = ours.model.get_breadth_features(ours.model.get_depth_features(pixel_values).pooler_output)
    expected = torch.stack([breadth[task] for task in ours.config.breadth_prompts], 1).flatten(0, 1)
    torch.testing.assert_close(native_encoding(native, pixel_values, prompt_ids), expected)  # same work, same result

    def native_seconds() -> float:
        return benchmark.timed(lambda: native_encoding(native, pixel_values, prompt_ids), ours.device)[0]

    times = rounds({"ours": lambda: features_seconds(ours, pixel_values), "native": native_seconds,
                    "native2": native_seconds}, count)
    return ratios(times, {
        "image features: ours / native Florence-2": (("ours",), ("native",)),
        "features control: native / native again": (("native2",), ("native",)),
    })


@torch.no_grad()
def measure(size: str, device: torch.device, dtype: torch.dtype, batch: int, count: int, new_tokens: int,
            groups: list[str]) -> dict:
    """label -> (median, q1, q3) of every ratio of the chosen groups."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="florence_vl_overhead_") as tmp:
        ours, bare, copy = load_pair(size, device, dtype, Path(tmp))
        image = benchmark.sample_inputs(ours, batch)
        text_ids = image["input_ids"].masked_fill(image["input_ids"] == ours.config.image_token_id, 100)
        text = {"input_ids": text_ids, "attention_mask": image["attention_mask"]}
        if "decode" in groups:
            result.update(decode_ratios(ours, bare, copy, image, text, count, new_tokens))
        if "ttft" in groups:
            result.update(ttft_ratios(ours, bare, image, text, count))
        if "followup" in groups:
            result.update(followup_ratios(ours, image, count))
        if "features" in groups:
            result.update(features_ratios(ours, image["pixel_values"], count))
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mid", choices=benchmark.SIZES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="rounds per group (each runs every arm once)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per decode measurement")
    parser.add_argument("--groups", default="decode,ttft,followup,features",
                        help="comma-separated: decode, ttft, followup, features")
    parser.add_argument("--guard", type=float, default=None, help="exit 1 when a median ratio exceeds this")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Measure, print every ratio with its spread; 1 when one is above --guard, 2 on bad options."""
    args = parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    unknown = [g for g in groups if g not in ("decode", "ttft", "followup", "features")]
    if unknown or args.rounds < 4 or args.batch < 1:
        print(f"error: unknown groups {unknown}" if unknown else "error: --rounds must be >= 4, --batch >= 1",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark.transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    if args.size in benchmark.REAL_TEXT and device.type != "cuda":
        print(f"error: size {args.size} has the real release shapes: run it on a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{benchmark.machine(device)}; size {args.size}, {args.dtype}, batch {args.batch}, "
          f"{args.rounds} rounds; transformers {benchmark.transformers.__version__}")
    result = measure(args.size, device, getattr(torch, args.dtype), args.batch, args.rounds, args.new_tokens, groups)
    width = max(map(len, result))
    for label, (mid, q1, q3) in result.items():
        print(f"  {label:<{width}}  x{mid:.3f}  (IQR {q1:.3f}-{q3:.3f})")
    over = [label for label, (mid, _, _) in result.items() if args.guard and mid > args.guard]
    if over:
        print(f"error: median ratio above the guard x{args.guard}: {'; '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
