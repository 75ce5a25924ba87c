# Sourced by the accelerator-machine scripts (gpu-check.sh, gpu-step.sh, gpu-bank.sh). The carried
# binaries' run path names the build machine's venv, so `device_env` points the loader at this
# machine's own libtorch (`torch/lib` of its python3) and the CUDA/NCCL libraries PyPI ships beside it
# (`site-packages/nvidia/*/lib`), and exports LIBTORCH. Returns 1 when python3 cannot import torch.
device_env() {
  local torch_dir libs dir
  torch_dir="$(timeout 120 python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')" || return 1
  libs="$torch_dir/lib"
  for dir in "$(dirname "$torch_dir")"/nvidia/*/lib; do
    if [ -d "$dir" ]; then libs="$libs:$dir"; fi
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LIBTORCH="$torch_dir"
}
