#!/usr/bin/env bash
# Launch a short ZeRO-3 pretraining N times in a row under the deepspeed launcher (2 CPU ranks) and
# count the exits that were not clean: the check for the gloo exit abort DeepSpeed is known for.
#   bash scripts/stress_launches.sh [N=50] [ENGINE=ds_configs/zero3.json]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
ENGINE=${2:-ds_configs/zero3.json}
export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
OUT=$(mktemp -d)
failed=0
start=$(date +%s)
for i in $(seq 1 "$N"); do
  port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  if ! deepspeed --num_gpus 2 --master_port "$port" --module moco_scale pretrain \
      -a vit_tiny --patch-size 8 --embed-dim 64 --depth 2 --num-heads 4 --moco-dim 32 --moco-mlp-dim 64 \
      -b 16 --epochs 1 --warmup-epochs 0 --optimizer adamw --lr 1e-3 -j 0 --max-steps 2 --device cpu \
      --engine-config "$ENGINE" --output-dir "$OUT/run" --overwrite >"$OUT/log" 2>&1; then
    failed=$((failed + 1))
    echo "launch $i failed:"; grep -E "terminate|Abort|exit|Error" "$OUT/log" | tail -5
  fi
done
echo "stress_launches: $N launches of $ENGINE, $failed not clean, $(( $(date +%s) - start )) s"
rm -rf "$OUT"
[ "$failed" -eq 0 ]
