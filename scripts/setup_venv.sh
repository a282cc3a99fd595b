#!/usr/bin/env bash
# Create (or reuse) a virtualenv with torch 2.13.0 (installed first and pinned: an unpinned torch pulls GBs of CUDA
# packages), this repo's requirements and the given transformers version. Says what it installs; pip shows progress.
# usage: scripts/setup_venv.sh [VENV_DIR [TRANSFORMERS_VERSION [REQUIREMENTS_FILE...]]]
#   defaults: .venv, 5.23.0, requirements.txt + requirements-app.txt: the one environment for every script
#   (ask.py, app.py, convert_checkpoint.py, finetune.py, train_embedded_model.py, benchmarks/)
# CPU-only machine: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup_venv.sh ...  (torch's CPU build,
# about 200 MB instead of several GB of CUDA libraries from the default index on Linux)
set -euo pipefail
venv=${1:-.venv} version=${2:-5.23.0}
shift $(( $# < 2 ? $# : 2 ))
requirements=("$@")
[ ${#requirements[@]} -gt 0 ] || requirements=(requirements.txt requirements-app.txt)
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac  # relative to the caller's directory
cd "$(dirname "$0")/.."
stamp="$venv/.florence_vl_setup"
want="torch==2.13.0 transformers==$version $(sha1sum "${requirements[@]}" requirements.txt | cut -c1-12 | tr '\n' ' ')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on "$@"; }
echo "Setting up the virtualenv $venv (first run only; a few minutes)"
python3 -m venv "$venv"
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
echo "[1/2] torch 2.13.0 ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}(set TORCH_INDEX_URL for the CPU-only build: see README)"
pip_install "${torch_index[@]}" "torch==2.13.0"
req_args=()
for file in "${requirements[@]}"; do req_args+=(-r "$file"); done
echo "[2/2] transformers $version and ${requirements[*]}"
pip_install "${req_args[@]}" "transformers==$version"
echo "$want" > "$stamp"
echo "Virtualenv ready: $venv"
