#!/usr/bin/env bash
# Create (or reuse) a virtualenv with torch 2.13.0 (installed first and pinned: an unpinned torch pulls GBs of CUDA
# packages), this repo's requirements and the given transformers version. Says what it installs; pip shows progress.
# usage: scripts/setup_venv.sh [VENV_DIR [TRANSFORMERS_VERSION [REQUIREMENTS_FILE...]]]
#   defaults: .venv, 5.23.0, requirements.txt + requirements-app.txt: the one environment for every script
#   (ask.py, app.py, convert_checkpoint.py, finetune.py, train_embedded_model.py, benchmarks/)
# Which torch build (CPU on Linux without an NVIDIA GPU, TORCH_INDEX_URL to choose): scripts/choose_torch.sh.
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
echo -n "[1/2] "
mapfile -t torch_args < <(scripts/choose_torch.sh)
if ! pip_install "${torch_args[@]}"; then
  [ "${torch_args[-1]}" = "torch==2.13.0+cpu" ] || exit 1
  echo "Your pip settings have no torch 2.13.0+cpu: installing torch 2.13.0 from them instead (it may bundle CUDA)"
  pip_install "torch==2.13.0"
fi
req_args=()
for file in "${requirements[@]}"; do req_args+=(-r "$file"); done
echo "[2/2] transformers $version and ${requirements[*]}"
pip_install "${req_args[@]}" "transformers==$version"
echo "$want" > "$stamp"
echo "Virtualenv ready: $venv"
