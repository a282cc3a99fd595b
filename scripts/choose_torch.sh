#!/usr/bin/env bash
# Print the pip arguments that install torch 2.13.0 for this machine, one per line; say the choice in one line on
# stderr. Used by scripts/setup_venv.sh (so by ask.sh's first run).
#   TORCH_INDEX_URL set          -> torch from that index (the user's explicit choice, as before)
#   an NVIDIA GPU, or not Linux  -> torch from the user's own pip settings (PyPI's Linux build bundles CUDA)
#   Linux without NVIDIA GPU     -> torch's CPU build (about 200 MB instead of several GB of CUDA libraries):
#       from TORCH_CPU_INDEX_URL (default download.pytorch.org/whl/cpu) added to the user's pip settings, or, when
#       that index does not answer within 5 s, from the user's pip settings alone (a mirror or wheel folder that has
#       `torch==2.13.0+cpu`); pip retries an unreachable index for minutes, so it is probed first.
set -euo pipefail
version=2.13.0
cpu_index=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if [ -n "${TORCH_INDEX_URL:-}" ]; then
  echo "torch $version from TORCH_INDEX_URL ($TORCH_INDEX_URL)" >&2
  printf '%s\n' --index-url "$TORCH_INDEX_URL" "torch==$version"
elif [ "$(uname -s)" != Linux ] || nvidia-smi -L >/dev/null 2>&1; then
  echo "torch $version from your pip settings (NVIDIA GPU found, or not Linux)" >&2
  printf '%s\n' "torch==$version"
elif python3 - "$cpu_index/torch/" <<'EOF' >/dev/null 2>&1; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
EOF
  echo "No NVIDIA GPU found: installing torch $version's CPU build (about 200 MB) from $cpu_index" >&2
  printf '%s\n' --extra-index-url "$cpu_index" "torch==$version+cpu"
else
  echo "No NVIDIA GPU found and $cpu_index did not answer: torch $version's CPU build from your pip settings" >&2
  printf '%s\n' "torch==$version+cpu"
fi
