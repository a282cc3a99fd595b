"""Why bfloat16 is slower than float32 on this CPU: the same model and inputs profiled in both dtypes, side by side.

    python benchmarks/cpu_dtype_profile.py [--size base] [--new-tokens 12] [--top 12]

Profiles `get_image_features` (DaViT + the Florence-2 encoder over three prompts + DBFusion) and a greedy `generate`
of --new-tokens tokens with torch.profiler, in float32 and bfloat16, and prints the operators by the time they take in
bfloat16, with their float32 time and the ratio, so the operators that make bfloat16 slower stand out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_model, machine, sample_inputs  # noqa: E402


def profiled(fn) -> tuple[float, dict[str, float]]:
    """Wall seconds of one call of `fn` (after a warm-up) and its self CPU seconds per operator."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall, {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base", choices=("tiny", "base"))
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    print(f"Machine: {machine(device)}; size {args.size}")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(args.size, device, dtype)
        inputs = sample_inputs(model, batch=1)
        with torch.no_grad():
            features = profiled(lambda: model.get_image_features(inputs["pixel_values"]).pooler_output)
            generate = profiled(lambda: model.generate(**inputs, max_new_tokens=args.new_tokens,
                                                       min_new_tokens=args.new_tokens, do_sample=False))
        results[dtype] = {"image features": features, f"generate {args.new_tokens} tokens": generate}
        del model
    for stage in results[torch.float32]:
        wall32, ops32 = results[torch.float32][stage]
        wall16, ops16 = results[torch.bfloat16][stage]
        print(f"\n{stage}: float32 {wall32:.2f} s, bfloat16 {wall16:.2f} s ({wall16 / wall32:.2f}x)")
        print(f"  {'operator':40s} {'bf16 s':>8s} {'fp32 s':>8s} {'ratio':>6s}")
        for op in sorted(ops16, key=ops16.get, reverse=True)[: args.top]:
            fp32 = ops32.get(op, 0.0)
            ratio = f"{ops16[op] / fp32:.2f}" if fp32 > 0 else "new"
            print(f"  {op[:40]:40s} {ops16[op]:8.3f} {fp32:8.3f} {ratio:>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
