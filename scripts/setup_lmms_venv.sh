#!/usr/bin/env bash
# Create (or reuse) the lmms-eval virtualenv for docs/evaluation.md's recipe (lmms-eval's `openai` adapter talking to
# a vLLM server of the model): scripts/setup_venv.sh with requirements-lmms.txt (what that adapter and the task
# machinery import), then lmms-eval 0.7.3 itself without its declared dependencies (requirements-lmms.txt says why).
# usage: scripts/setup_lmms_venv.sh [VENV_DIR]   (default .venv-lmms)
set -euo pipefail
LMMS_EVAL_VERSION=0.7.3
venv=${1:-.venv-lmms}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
cd "$(dirname "$0")/.."
scripts/setup_venv.sh "$venv" 5.23.0 requirements-lmms.txt
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('lmms-eval') != '$LMMS_EVAL_VERSION')" \
    2>/dev/null; then
  echo "lmms-eval $LMMS_EVAL_VERSION (without its declared dependencies)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
fi
"$venv/bin/python" -c "import lmms_eval.models.chat.openai" || { echo "error: lmms-eval does not import in $venv" >&2; exit 1; }
