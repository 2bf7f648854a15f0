#!/usr/bin/env bash
# Run on a machine with a package index: put into .whl/ (git-ignored) the wheels an air-gapped GPU node
# lacks to run scripts/gpu_check.sh: deepspeed 0.19.8 as a pure-Python wheel built here with its ops off
# (they JIT-build on first use; gpu_check uses none of them) and the dependencies such a node is missing.
# The target node: Python 3.12, x86-64, torch/torchvision/timm/scikit-learn/tensorboard/matplotlib/tqdm,
# einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py preinstalled; nothing already there is fetched.
# scikit-image (and its small dependencies the node lacks) makes the sample JPEGs of the data stage.
# Idempotent; about 18 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELS:-.whl}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
# pure-Python wheels, and pydantic-core's compiled one for CPython 3.12 on manylinux x86-64
PINS="hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  scikit-image==0.26.0 imageio==2.38.2 tifffile==2026.3.3 lazy-loader==0.6"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" $PINS
if ! ls "$OUT"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
fi
ls -1 "$OUT"
du -sh "$OUT"
