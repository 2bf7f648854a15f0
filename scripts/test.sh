#!/usr/bin/env bash
# Set up .venv if needed, lint, and run the test suite (CPU, gloo, real launchers).
# Extra arguments go to pytest, e.g. scripts/test.sh -k equivalence, or -m slow for the slow ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# DeepSpeed JIT-builds its CPU communication op: in a folder of this .venv, not the shared ~/.cache (see
# moco_scale/engines/extensions.py: a killed build there can stall every later launch on the machine)
export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
ruff check moco_scale tests scripts
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
