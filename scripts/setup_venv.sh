#!/usr/bin/env bash
# Create (or reuse) a virtualenv with torch 2.13.0 (CPU wheel first: an unpinned torch pulls GBs of CUDA
# packages), this repo's requirements and the given transformers version.
# usage: scripts/setup_venv.sh VENV_DIR TRANSFORMERS_VERSION [REQUIREMENTS_FILE...]   (default: requirements-test.txt)
set -euo pipefail
venv=$1 version=$2
shift 2
requirements=("$@")
[ ${#requirements[@]} -gt 0 ] || requirements=(requirements-test.txt)
cd "$(dirname "$0")/.."
stamp="$venv/.florence_vl_setup"
want="torch==2.13.0 transformers==$version $(sha1sum "${requirements[@]}" requirements.txt | cut -c1-12 | tr '\n' ' ')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "Setting up $venv (transformers $version)..."
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
req_args=()
for file in "${requirements[@]}"; do req_args+=(-r "$file"); done
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${req_args[@]}" "transformers==$version"
echo "$want" > "$stamp"
