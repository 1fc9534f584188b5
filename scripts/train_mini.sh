#!/usr/bin/env bash
# Reproduce models/mini on this machine (about 100 minutes on 2 CPU cores), in three runs:
#   1. every component from scratch: VAE, encoded clips, denoiser + text encoder (TrainMiniConfig's
#      defaults, about 45 minutes);
#   2. and 3. the denoiser continued on fresh clips with the product's latents weighted x4, then x8
#      (train/mini_run2.json, train/mini_run3.json; about 25 minutes each), the VAE kept from run 1.
# Usage: bash scripts/train_mini.sh [OUTPUT_DIR]   (default: mini-checkpoint; runs 1 and 2 go to
# OUTPUT_DIR.run1 and OUTPUT_DIR.run2)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-mini-checkpoint}
.venv/bin/shopreel train-mini -o "$out.run1"
.venv/bin/shopreel train-mini --config train/mini_run2.json --init-from "$out.run1" -o "$out.run2"
.venv/bin/shopreel train-mini --config train/mini_run3.json --init-from "$out.run2" -o "$out"
echo "train_mini: wrote $out; measure it with benchmarks/prompt_following.py before replacing models/mini" >&2
