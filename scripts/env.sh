# Shared environment for the scripts and for interactive shells: `source scripts/env.sh`.
# Points the tch build at the cached libtorch venv made by scripts/setup.sh.
export HCMOCO_TORCH_VERSION="${HCMOCO_TORCH_VERSION:-2.11.0}"
export HCMOCO_CACHE="${HCMOCO_CACHE:-$HOME/.cache/hcmoco}"
export HCMOCO_VENV="${HCMOCO_VENV:-$HCMOCO_CACHE/venv-torch-$HCMOCO_TORCH_VERSION}"
_hcmoco_pyver="$(ls "$HCMOCO_VENV/lib" 2>/dev/null | grep -m1 '^python3' || echo python3)"
export LIBTORCH="$HCMOCO_VENV/lib/$_hcmoco_pyver/site-packages/torch"
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
unset _hcmoco_pyver
