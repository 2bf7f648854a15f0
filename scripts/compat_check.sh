#!/usr/bin/env bash
# The oldest PyTorch moco-scale supports (the one GPU nodes often carry): build .venv-compat with
# torch 2.11.0 / torchvision 0.26.0 and run the engine-equivalence and synced-BN tests there on CPU.
# CI keeps the pinned 2.14.1 of scripts/setup_env.sh. Idempotent; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS="torch==2.11.0 torchvision==0.26.0"
VENV=.venv-compat
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
stamp=$VENV/.moco-scale-installed
want="$(cat pyproject.toml scripts/compat_check.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "compat_check: installing into $VENV ($PINS)" >&2
  $VENV/bin/python -m pip install -q --upgrade pip
  $VENV/bin/python -m pip install -q $PINS
  $VENV/bin/python -m pip install -q -e ".[test]" $PINS
  echo "$want" > "$stamp"
fi
# its own JIT cache: DeepSpeed ops built against torch 2.14 do not load into 2.11 (same cache name, py311_cu130)
export PATH="$PWD/$VENV/bin:$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions"
python -c "import torch, torchvision; print(f'compat_check: torch {torch.__version__}, torchvision {torchvision.__version__}')"
if [ $# -eq 0 ]; then set -- tests/test_equivalence.py tests/test_batchnorm.py tests/test_cuda_path.py -m "not slow"; fi
exec python -m pytest -q -p no:cacheprovider "$@"
