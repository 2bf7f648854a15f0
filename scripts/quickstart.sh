#!/usr/bin/env bash
# The main job: set up .venv, pretrain a tiny ViT on the built-in digits under the DeepSpeed
# launcher with ZeRO-3 (model states sharded over 2 CPU processes, or over the GPUs of this
# machine), then compare frozen features of the pretrained and the randomly initialised encoder
# with kNN and linear probes on the held-out split, run the linear evaluation protocol, and fine-tune end to end
# (DeiT's recipe, shortened for 32-px digits) from the pretrained checkpoint. A kNN curve of both encoders is drawn
# while it trains (--knn-every 15: report/knn.png).
# Re-running starts a fresh run.
# ENGINE=ds_configs/fsdp.json (or any file in ds_configs/) switches the engine; nothing else changes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"  # DeepSpeed's ops: this .venv's own
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -eq 0 ]; then export DS_ACCELERATOR=cpu; fi
OUT=${OUT:-runs/quickstart}
ENGINE=${ENGINE:-ds_configs/zero3.json}
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
PORT=${PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module moco_scale pretrain \
  -a vit_tiny --patch-size 4 --embed-dim 128 --depth 4 --num-heads 4 \
  --moco-dim 128 --moco-mlp-dim 512 --moco-t 0.2 --moco-m 0.99 --moco-m-cos \
  --optimizer adamw --lr 1e-3 --wd 0.1 --epochs 30 --warmup-epochs 5 --crop-min 0.2 \
  -b 128 -j 0 -p 10 --knn-every 15 --engine-config "$ENGINE" --output-dir "$OUT" --overwrite "$@"
moco-scale probe --pretrained "$OUT/checkpoint.pth.tar"
moco-scale knn --pretrained "$OUT" -j 0   # DINO's weighted kNN (k=20, 200); the same under torchrun at any world size
# the MoCo v3 linear evaluation protocol, short: 10 epochs, parameter-free BN before the classifier
moco-scale lincls --pretrained "$OUT/checkpoints" --epochs 10 -b 256 --bn -j 0 --output-dir "$OUT/lincls"
# end-to-end fine-tuning: the deit recipe for 8 epochs at batch 32, without RandAugment, Mixup/CutMix and random
# erasing (made for 224-px ImageNet), crops of at least half the image (add --from-scratch for the baseline)
moco-scale finetune --pretrained "$OUT/checkpoints" --recipe deit --epochs 8 --warmup-epochs 0 --lr 8e-3 --aa none \
  --mixup 0 --cutmix 0 --reprob 0 --crop-min 0.5 -b 32 -j 0 -p 100 --overwrite --output-dir "$OUT/finetune"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
probe, lincls = json.load(open(f"{out}/probe.json")), json.load(open(f"{out}/lincls/lincls.json"))
tuned = json.load(open(f"{out}/finetune/finetune.json"))
print(f"held-out digits, top-1: kNN {probe['pretrained']['knn_top1']:.1f}% / linear probe "
      f"{probe['pretrained']['linear_top1']:.1f}% (random init: {probe['random_init']['knn_top1']:.1f}% / "
      f"{probe['random_init']['linear_top1']:.1f}%), lincls {lincls['top1']:.1f}%, fine-tuned {tuned['top1']:.1f}%")
PY
moco-scale report "$OUT"   # loss, lr, m, throughput, memory and gradient-norm plots, report.md
echo "run folder: $OUT (config.json, metrics.jsonl, tensorboard/, checkpoints/, checkpoint.pth.tar, probe.json, knn.json, lincls/, finetune/, report/)"
