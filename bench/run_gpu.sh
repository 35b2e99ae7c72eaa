#!/usr/bin/env bash
# The longer GPU benchmark, once bench/device_check.py is green: SD 1.5 architecture (random
# weights, no download) at 512x512, fp16, batch 1 and 4, every backend in $BACKENDS against
# diffusers. On a lent device machine use bench/README.md's "device call" (same wheel, same
# install line) with `bash bench/run_gpu.sh` in place of the device check (~3 min for torch).
#   bash bench/run_gpu.sh                      # torch only
#   BACKENDS=torch,onnxruntime bash bench/run_gpu.sh
# Writes $OUT/sd15-512-gpu.json (OUT defaults to bench/results) and prints the table.
set -euo pipefail
out="${OUT:-bench/results}"
py="${PYTHON:-python3}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv || true
PYTHONUNBUFFERED=1 "$py" -m sdfast.cli bench --model random-sd15 --device cuda --backends "${BACKENDS:-torch}" \
    --dtype fp16 --steps 30 --height 512 --width 512 --batch 1,4 --repeat 10 --warmup 3 \
    --json "$out/sd15-512-gpu.json"
