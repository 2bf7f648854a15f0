#!/usr/bin/env bash
# MoCo v3 linear evaluation: 90 epochs, batch 1024, base lr 3 (ViT) / 0.1 (ResNet) by the checkpoint's arch.
# Usage: PRETRAINED=runs/X/checkpoints scripts/recipes/lincls.sh DATA HOSTFILE [flags]
source "$(dirname "$0")/common.sh"
: "${PRETRAINED:?set PRETRAINED to a checkpoint (folder, run folder or .pth.tar)}"
recipe 1 ds_configs/ddp.json lincls --pretrained "$PRETRAINED" -b 1024 --epochs 90 \
  --output-dir "${OUT:-runs/lincls}" --resume auto -- "$@"
