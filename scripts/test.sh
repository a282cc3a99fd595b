#!/usr/bin/env bash
# The test command: set up one virtualenv per supported transformers version and run the suite in each.
# Each run also loads folders saved by the other version (FLORENCE_VL_OTHER_PYTHON).
# usage: scripts/test.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
V4=4.57.6
V5=5.23.0
scripts/setup_venv.sh .venv-tf4 "$V4" || exit 1
scripts/setup_venv.sh .venv-tf5 "$V5" || exit 1
status=0
for pair in "tf4:tf5" "tf5:tf4"; do
  this=${pair%%:*} other=${pair##*:}
  echo "=== pytest under $(.venv-$this/bin/python -c 'import transformers; print("transformers", transformers.__version__)')"
  FLORENCE_VL_OTHER_PYTHON="$PWD/.venv-$other/bin/python" .venv-$this/bin/python -m pytest tests -q -p no:cacheprovider "$@" || status=1
done
exit $status
