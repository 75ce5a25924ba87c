"""PyTorch reference of the HCMoCo model, for parity tests and benchmarks against the Rust worker.

Modules (plain PyTorch, written independently of the Rust code; the state-dict names are the contract):
- `semgcn`: the SemGCN keypoint encoder (`worker/src/semgcn.rs`).
- `hrnet`: HRNetV2 with the official layout's names (timm's `hrnet_w18`), presets `hrnet_w18` and
  `hrnet_small` (`worker/src/hrnet.rs`).
- `model`: the whole model: RGB and depth HRNets with global and dense heads, SemGCN with the skeleton
  global head (`worker/src/model.rs`). Its `state_dict()` has the names of the Rust `VarStore`, so a
  safetensors file of our variables loads with `strict=True` (see `load_safetensors`).
- `losses`: the objective's terms (`tests/python/loss_parity.py`).

Import with `tests/python` on `sys.path` (`import reference.model`).
"""

import torch
from safetensors.torch import load_file


def load_safetensors(module: torch.nn.Module, path: str) -> None:
    """Loads a safetensors file written by the Rust `VarStore` into `module`, strictly (every name, no
    extra one). Values are cast to the module's dtypes (an f64 module stays f64; `num_batches_tracked`
    stays int64 whatever the file holds)."""
    state = load_file(path)
    module.load_state_dict(state, strict=True)
