#!/usr/bin/env bash
# Create (or reuse) the lmms-eval virtualenv for docs/evaluation.md's recipe (lmms-eval's `openai` adapter talking to
# a vLLM server of the model): lmms-eval 0.7.3 without its declared dependencies, then requirements-lmms.txt (what
# that adapter and its task machinery import; the reason is in that file).
# usage: scripts/setup_lmms_venv.sh [VENV_DIR]   (default .venv-lmms)
set -euo pipefail
LMMS_EVAL_VERSION=0.7.3
venv=${1:-.venv-lmms}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
cd "$(dirname "$0")/.."
stamp="$venv/.florence_vl_setup"
want="lmms-eval==$LMMS_EVAL_VERSION $(sha1sum requirements-lmms.txt | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$@"; }
echo "Setting up the lmms-eval virtualenv $venv (first run only)"
python3 -m venv "$venv"
mapfile -t torch_args < <(scripts/choose_torch.sh)
pip_install "${torch_args[@]}"
pip_install --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
pip_install -r requirements-lmms.txt
"$venv/bin/python" -c "import lmms_eval.models.chat.openai; print('lmms-eval', '$LMMS_EVAL_VERSION', 'ready')"
echo "$want" > "$stamp"
