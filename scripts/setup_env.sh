#!/usr/bin/env bash
# Create .venv (if missing) and install moco-scale with pinned torch/torchvision.
# Idempotent: a stamp of the install inputs skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.moco-scale-installed
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (torch/torchvision pinned: $TORCH_PINS)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q $TORCH_PINS
  .venv/bin/python -m pip install -q -e ".[test]" $TORCH_PINS
  echo "$want" > "$stamp"
fi
