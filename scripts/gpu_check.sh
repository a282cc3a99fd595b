#!/usr/bin/env bash
# On a GPU machine, in one go: the tests that run on every device (now on CUDA too), the docs' blocks (their GPU
# paths) and the fast-path tests, then the GPU benchmarks at the real 8B/3B shapes. Uses the test command's
# transformers 5.x virtualenv (created on first use).
# usage: bash scripts/gpu_check.sh [OUT_DIR]   (the benchmark's JSON goes to OUT_DIR/gpu_benchmark.json; default .)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
scripts/setup_venv.sh .venv-tf5 5.23.0 requirements-test.txt requirements-app.txt requirements-trl.txt
if ! .venv-tf5/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "error: torch sees no CUDA GPU here (this check is for a GPU machine)" >&2
  exit 2
fi
.venv-tf5/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_devices.py tests/test_docs.py tests/test_fast_paths.py
.venv-tf5/bin/python benchmarks/benchmark.py --device cuda --sizes tiny,base,3b,8b --batches 1,4,16 \
  --ratios breadth,static --ratio-size 8b --json "$out/gpu_benchmark.json"
for size in 8b 3b; do  # ours against its parts (decode, TTFT, image features) at the release shapes
  .venv-tf5/bin/python benchmarks/overhead.py --device cuda --size "$size" --dtype bfloat16 --rounds 15
done
