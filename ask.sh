#!/usr/bin/env bash
# The main job: set up a virtualenv (first run only) and answer questions about an image (one conversation).
# usage: ./ask.sh [--image PATH_OR_URL] [--question TEXT]... [--model CONVERTED_FOLDER_OR_HUB_ID] [--device D] [--dtype T]
# Runs from the caller's directory, so relative --image and --model paths mean what the user typed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/scripts/setup_venv.sh" "$here/.venv" >&2  # the repo's one environment for every script (first run only)
FLORENCE_VL_COMMAND=$(basename "$0") exec "$here/.venv/bin/python" "$here/ask.py" "$@"  # errors name ask.sh
