#!/usr/bin/env bash
# One training step of the same model and objective: ours (`hcmoco-worker bench step`) against PyTorch
# eager running the project's Python reference (scripts/bench_step.py), same threads, same batch shapes,
# alternating runs; prints each run's median and, at the end, the median over rounds and the ratio
# ours / PyTorch (time; below 1 = we are faster).
#
#   bash scripts/bench-step.sh [rounds] -- [bench step arguments, e.g. --backbone hrnet_w18 --image 128]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
rounds="${1:-5}"
shift || true
[ "${1:-}" = "--" ] && shift
bin="${HCMOCO_WORKER_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/hcmoco-worker}"
[ -x "$bin" ] || { echo "build it first: cargo build --release -p hcmoco-worker (or set HCMOCO_WORKER_BIN)"; exit 2; }
py="$HCMOCO_VENV/bin/python"
ours=() theirs=()
median_of() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -n 's/.* median_ms=\([0-9.]*\).*/\1/p'; }
for r in $(seq 1 "$rounds"); do
  a="$("$bin" bench step "$@" | tail -n 1)"
  b="$("$py" "$here/bench_step.py" "$@" | tail -n 1)"
  echo "$a"
  echo "$b"
  ours+=("$(echo "$a" | field)")
  theirs+=("$(echo "$b" | field)")
done
mo="$(median_of "${ours[@]}")"
mt="$(median_of "${theirs[@]}")"
echo "median over $rounds rounds: hcmoco ${mo} ms, pytorch ${mt} ms, ratio hcmoco/pytorch $(awk -v a="$mo" -v b="$mt" 'BEGIN {printf "%.3f", a / b}')"
