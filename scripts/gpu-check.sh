#!/usr/bin/env bash
# GPU check of the NCCL backend, for the accelerator machine (one GPU, python3 with PyPI torch, no Rust
# toolchain). Run from the repository root with the worker binary built elsewhere and carried:
#
#   scripts/gpu-check.sh [path/to/hcmoco-worker]
#
# The binary defaults to $HCMOCO_WORKER_BIN, then target/release/ and target/debug/. Its run path names
# the build machine's venv, so the loader is pointed at this machine's torch/lib and
# site-packages/nvidia/*/lib. Runs `hcmoco-worker nccl-check` (world size 1: NCCL refuses two ranks on
# one GPU, so multi-rank failure cannot be exercised here) and, if $HCMOCO_WORKER_TESTS names a carried
# test binary of hcmoco-worker, its comm::nccl tests; if $HCMOCO_BIN names a carried `hcmoco`, a few
# training steps on CUDA with the NCCL backend (scripts/gpu-check-job.toml). Output goes to stdout and, when $OUT is set, to
# $OUT/gpu-check.txt. Exit status: 0 only when every part that ran passed; otherwise the first failing
# part's status (124 when it timed out). Keep the output: copy $OUT/gpu-check.txt into
# docs/gpu-logs/DATE/ beside docs/gpu-checks.md.
set -uo pipefail
# shellcheck source=scripts/device-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"

check() {
  local bin="${1:-${HCMOCO_WORKER_BIN:-}}" candidate rc
  if [ -z "$bin" ]; then
    for candidate in target/release/hcmoco-worker target/debug/hcmoco-worker; do
      if [ -x "$candidate" ]; then bin="$candidate"; break; fi
    done
  fi
  echo "== gpu-check $(date -u +%FT%TZ) on $(hostname)"
  if [ ! -x "$bin" ]; then
    echo "no hcmoco-worker binary: pass its path or set HCMOCO_WORKER_BIN"
    return 2
  fi
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "(no nvidia-smi)"
  if ! device_env; then
    echo "python3 cannot import torch"
    return 2
  fi
  timeout 120 python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "nccl", ".".join(map(str, torch.cuda.nccl.version())), "gpus", torch.cuda.device_count())' || true
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}" RUST_LOG="${RUST_LOG:-info}"
  echo "binary: $bin"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$bin" | grep "not found" || echo "all shared libraries of the binary resolve"

  rc=0
  # Records a part's status; the first failure is the script's.
  part_done() {
    echo "== $1 exit status $2"
    if [ "$2" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$2; fi
  }
  echo "== hcmoco-worker nccl-check"
  timeout -k 10 300 "$bin" nccl-check
  part_done nccl-check $?
  if [ -x "${HCMOCO_BIN:-}" ]; then
    echo "== training on CUDA with the NCCL backend: hcmoco launch --local --workers 1 (scripts/gpu-check-job.toml)"
    local out="${OUT:-/tmp}/gpu-train"
    rm -rf "$out"
    HCMOCO_LOG=info timeout -k 10 240 "$HCMOCO_BIN" launch --local --workers 1 \
      --job-file scripts/gpu-check-job.toml --worker-bin "$bin" --out "$out"
    part_done training $?
    tail -n 40 "$out"/logs/*.log 2>/dev/null || ls -R "$out" | head -40
  fi
  if [ -n "${HCMOCO_WORKER_TESTS:-}" ]; then
    echo "== $HCMOCO_WORKER_TESTS comm::nccl"
    timeout -k 10 120 "$HCMOCO_WORKER_TESTS" comm::nccl
    part_done "comm::nccl tests" $?
  fi
  echo "== gpu-check exit status $rc"
  return "$rc"
}

if [ -n "${OUT:-}" ]; then
  check "$@" 2>&1 | tee "$OUT/gpu-check.txt"
  exit "${PIPESTATUS[0]}"
fi
check "$@"
