#!/usr/bin/env bash
# A pretrained ViT for DeiT fine-tuning: {'model': backbone} with timm names (prints the head count to use).
# Usage: scripts/recipes/convert_deit.sh CHECKPOINT OUTPUT.pth
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ -x "$ROOT/.venv/bin/moco-scale" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
if [ $# -ne 2 ]; then echo "usage: $0 CHECKPOINT OUTPUT.pth" >&2; exit 2; fi
exec moco-scale convert --to deit "$1" "$2"
