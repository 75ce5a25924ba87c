#!/usr/bin/env bash
# The accelerator machine's part of issue 4 (and the NCCL re-check of issue 5), as one script: run from
# the repository root with the carried binaries in .carry/ (hcmoco-worker, hcmoco):
#
#   bash scripts/gpu-step.sh
#
# 1. scripts/gpu-check.sh: NCCL collectives on CUDA tensors and a few training steps with NCCL.
# 2. One HRNet-W18 stage-2 training step at 320 x 320, batch 56 (the reference's per-GPU batch), on
#    CUDA: ours (`hcmoco-worker bench step`, fp32 and bf16 autocast) against PyTorch eager running the
#    project's Python reference (scripts/bench_step.py) on the same GPU, alternating, samples/s each.
# Output goes to stdout and $OUT/gpu-step.txt when $OUT is set. SKIP_CHECK=1 skips part 1.
set -uo pipefail
# shellcheck source=scripts/device-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
bin=.carry/hcmoco-worker
run() {
  [ "${SKIP_CHECK:-0}" = 1 ] || HCMOCO_BIN=.carry/hcmoco bash scripts/gpu-check.sh "$bin"
  device_env || { echo "python3 cannot import torch"; return 2; }
  local common=(--backbone hrnet_w18 --batch 56 --image 320 --stage 2 --threads 8 --warmup 3 --iters 10)
  for round in 1 2; do
    echo "== round $round: ours fp32"
    timeout 240 "$bin" bench step "${common[@]}" --device cuda:0 | tail -n 1
    echo "== round $round: ours bf16 autocast"
    timeout 240 "$bin" bench step "${common[@]}" --device cuda:0 --bf16 | tail -n 1
    echo "== round $round: PyTorch eager fp32"
    timeout 240 python3 scripts/bench_step.py "${common[@]}" --device cuda:0 | tail -n 1
    echo "== round $round: PyTorch eager bf16 autocast"
    timeout 240 python3 scripts/bench_step.py "${common[@]}" --device cuda:0 --bf16 | tail -n 1
  done
}
if [ -n "${OUT:-}" ]; then
  run 2>&1 | tee "$OUT/gpu-step.txt"
else
  run
fi
