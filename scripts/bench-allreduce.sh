#!/usr/bin/env bash
# Our CPU all-reduce against torch.distributed's gloo, same machine, same sizes, alternating runs.
# Prints every run and, per size, the median bus bandwidth of each and the ratio (ours / gloo).
#   bash scripts/bench-allreduce.sh [--world 2] [--sizes 16777216,67108864] [--rounds 3] [--dtype f32]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
world=2; sizes=16777216,67108864; rounds=3; iters=20; dtype=f32; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --world) world=$2; shift 2;; --sizes) sizes=$2; shift 2;; --rounds) rounds=$2; shift 2;;
    --iters) iters=$2; shift 2;; --dtype) dtype=$2; shift 2;;
    *) extra+=("$1"); shift;;
  esac
done
bin="${CARGO_TARGET_DIR:-$here/../target}/debug/hcmoco-worker"
[ -x "$bin" ] || { echo "build first: bash scripts/setup.sh" >&2; exit 1; }
py="$HCMOCO_VENV/bin/python"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for r in $(seq 1 "$rounds"); do
  "$bin" bench allreduce --world "$world" --sizes "$sizes" --iters "$iters" --dtype "$dtype" "${extra[@]}" 2>/dev/null | sed 's/^/ours /' | tee -a "$tmp/all"
  OMP_NUM_THREADS=1 "$py" "$here/bench_gloo.py" --world "$world" --sizes "$sizes" --iters "$iters" --dtype "$dtype" 2>/dev/null | sed 's/^/gloo /' | tee -a "$tmp/all"
done
echo "--- medians over $rounds rounds, world $world, $dtype (ratio = ours busbw / gloo busbw) ---"
"$py" - "$tmp/all" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    who, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    runs.setdefault((int(d["bytes"]), who), []).append((float(d["busbw_GBps"]), float(d["time_ms"])))
for nbytes in sorted({b for b, _ in runs}):
    ours = statistics.median(b for b, _ in runs.get((nbytes, "ours"), [(float("nan"), 0)]))
    gloo = statistics.median(b for b, _ in runs.get((nbytes, "gloo"), [(float("nan"), 0)]))
    t_o = statistics.median(t for _, t in runs.get((nbytes, "ours"), [(0, float("nan"))]))
    t_g = statistics.median(t for _, t in runs.get((nbytes, "gloo"), [(0, float("nan"))]))
    # Same bytes and world: the busbw ratio is the inverse time ratio (exact, unlike rounded GB/s).
    print(f"bytes={nbytes} ours_busbw_GBps={ours:.3f} gloo_busbw_GBps={gloo:.3f} ratio={t_g / t_o:.2f} ours_ms={t_o:.4f} gloo_ms={t_g:.4f}")
PY
