#!/usr/bin/env bash
# The memory-bank variant on CUDA with NCCL (one GPU): stage 1 with banks, then stage 2 started from it
# (weights and banks), from scripts/gpu-check-job.toml. Run from the repository root with the carried
# binaries in .carry/ (hcmoco-worker, hcmoco); output under $OUT (or /tmp), each stage's checkpoints in
# its own folder ($OUT/bank1/checkpoints, $OUT/bank2/checkpoints), so stage 2 can only have started from
# what stage 1 wrote in this run. Exit status 0 only when both stages completed, stage 1's checkpoint
# holds the banks, stage 2 says it started from it, and both report a finite last loss. Keep the output
# ($OUT/gpu-bank.txt) in docs/gpu-logs/DATE/ beside docs/gpu-checks.md.
set -uo pipefail
# shellcheck source=scripts/device-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"

fail() {
  echo "FAILED: $*"
  exit 1
}

# One stage: the job file for its checkpoint folder, then `launch`; checks the exit status and the loss.
stage() {
  local name="$1" ckpt="$2" log="$3"
  shift 3
  sed -e 's/^stage = 2/stage = 1\nvariant = "memory_bank"\nnegatives = 4096/' \
    -e "s|^dir = .*|dir = \"$ckpt\"|" scripts/gpu-check-job.toml > "$out/$name-job.toml"
  rm -rf "$ckpt" "$out/$name"
  timeout 200 .carry/hcmoco launch --local --workers 1 --steps 20 --job-file "$out/$name-job.toml" \
    --worker-bin .carry/hcmoco-worker --out "$out/$name" "$@" > "$log" 2>&1
  local rc=$?
  grep -v "Memory.cpp" "$log" | tail -n 9
  echo "== $name exit status $rc"
  [ "$rc" -eq 0 ] || fail "$name exited with $rc"
  grep -Eq '^loss [0-9.]+ \(step 1\) -> [0-9.]+ \(step 20\)' "$log" || fail "$name: no finite loss from step 1 to 20"
}

main() {
  device_env || { echo "python3 cannot import torch"; exit 2; }
  echo "== stage 1, memory bank, CUDA + NCCL"
  stage bank1 "$out/bank1-checkpoints" "$out/bank1.log"
  ls "$out/bank1-checkpoints/step-00000020"
  [ -s "$out/bank1-checkpoints/step-00000020/banks.safetensors" ] || fail "stage 1's checkpoint holds no banks"
  echo "== stage 2 from stage 1 (weights and banks)"
  stage bank2 "$out/bank2-checkpoints" "$out/bank2.log" --stage 2 --init-checkpoint "$out/bank1-checkpoints"
  grep -h "initialised from $out/bank1-checkpoints" "$out"/bank2/logs/*.log || fail "stage 2 did not start from stage 1"
  echo "== gpu-bank passed"
}

out="${OUT:-/tmp/hcmoco-gpu-bank}"
mkdir -p "$out"
main 2>&1 | tee "$out/gpu-bank.txt"
exit "${PIPESTATUS[0]}"
