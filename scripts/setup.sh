#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, a cached libtorch venv, and the build.
#
#   bash scripts/setup.sh            # install what is missing, then `cargo build`
#   source scripts/env.sh            # (done by setup) exports LIBTORCH for cargo
#
# Everything heavy lives outside the repository, keyed by version, so a clean clone (CI) reuses it:
#   $HCMOCO_CACHE (default ~/.cache/hcmoco)/venv-torch-<version>
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
source "$here/env.sh"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

# 1. System packages: protoc (tonic/prost build) and etcd (coordinator failover, later issues).
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v etcd >/dev/null || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. libtorch from PyPI, in a venv keyed by the torch version (tch 0.24.0 pairs with torch 2.11.0).
if [ ! -f "$HCMOCO_VENV/.complete" ]; then
  log "creating $HCMOCO_VENV with torch==$HCMOCO_TORCH_VERSION (about 2 minutes, 4.6 GB)"
  rm -rf "$HCMOCO_VENV"
  mkdir -p "$(dirname "$HCMOCO_VENV")"
  python3 -m venv "$HCMOCO_VENV"
  "$HCMOCO_VENV/bin/pip" install -q --upgrade pip
  "$HCMOCO_VENV/bin/pip" install -q "torch==$HCMOCO_TORCH_VERSION" numpy safetensors webdataset==1.0.2 pillow==11.3.0
  touch "$HCMOCO_VENV/.complete"
fi
# webdataset + pillow (tests/tests/webdataset.rs) for venvs built before they were added; torch stays pinned
"$HCMOCO_VENV/bin/python" -c 'import webdataset, PIL' 2>/dev/null || "$HCMOCO_VENV/bin/pip" install -q "torch==$HCMOCO_TORCH_VERSION" webdataset==1.0.2 pillow==11.3.0
# timm (tests/tests/interop.rs loads our HRNet-W18 exports into it); torch and its torchvision (0.26.0
# pairs with torch 2.11.0) pinned in the same command so pip cannot upgrade them
"$HCMOCO_VENV/bin/python" -c 'import timm' 2>/dev/null || "$HCMOCO_VENV/bin/pip" install -q "torch==$HCMOCO_TORCH_VERSION" torchvision==0.26.0 timm==1.0.31
source "$here/env.sh"   # the venv's python directory is known now
[ -d "$LIBTORCH/lib" ] || { log "libtorch not found at $LIBTORCH"; exit 1; }

# 3. Build (debug profile; binaries land in $CARGO_TARGET_DIR or ./target).
if [ "${HCMOCO_SKIP_BUILD:-0}" != 1 ]; then
  log "building the workspace"
  (cd "$here/.." && cargo build --workspace --bins)
fi
log "ready"
