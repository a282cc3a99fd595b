#!/usr/bin/env bash
# The main job: set up a virtualenv (first run only) and answer a question about an image.
# usage: ./ask.sh [--image PATH_OR_URL] [--question TEXT] [--model CONVERTED_FOLDER_OR_HUB_ID]
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh .venv 5.23.0 requirements.txt >&2
exec .venv/bin/python ask.py "$@"
