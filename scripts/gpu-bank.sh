#!/usr/bin/env bash
# The memory-bank variant on CUDA with NCCL (one GPU): stage 1 with banks, then stage 2 started from it
# (weights and banks), from scripts/gpu-check-job.toml. Run from the repository root with the carried
# binaries in .carry/ (hcmoco-worker, hcmoco); output under $OUT (or /tmp).
set -uo pipefail
# shellcheck source=scripts/device-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
device_env || { echo "python3 cannot import torch"; exit 2; }
out="${OUT:-/tmp}"
job="$out/bank-job.toml"
sed -e 's/^stage = 2/stage = 1\nvariant = "memory_bank"\nnegatives = 4096/' scripts/gpu-check-job.toml > "$job"
rm -rf /tmp/hcmoco-gpu-check
echo "== stage 1, memory bank, CUDA + NCCL"
timeout 200 .carry/hcmoco launch --local --workers 1 --steps 20 --job-file "$job" --worker-bin .carry/hcmoco-worker \
  --out "$out/bank1" 2>&1 | grep -v "Memory.cpp" | tail -n 9
echo "== stage 1 exit status ${PIPESTATUS[0]}"
ls /tmp/hcmoco-gpu-check/checkpoints/step-00000020
echo "== stage 2 from stage 1 (weights and banks)"
timeout 200 .carry/hcmoco launch --local --workers 1 --steps 20 --job-file "$job" --worker-bin .carry/hcmoco-worker \
  --out "$out/bank2" --stage 2 --init-checkpoint /tmp/hcmoco-gpu-check/checkpoints 2>&1 | grep -v "Memory.cpp" | tail -n 9
echo "== stage 2 exit status ${PIPESTATUS[0]}"
grep -h "initialised from" "$out"/bank2/logs/*.log
