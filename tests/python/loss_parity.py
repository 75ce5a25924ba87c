#!/usr/bin/env python3
"""Runs the PyTorch reference of the objective (reference/losses.py) on a safetensors input file.

Usage:
  loss_parity.py eval IN.safetensors OUT.safetensors
      The inputs of `hcmoco-worker loss-eval`; writes the same outputs (docs/loss-eval.md).
  loss_parity.py bank IN.safetensors OUT.safetensors
      The memory-bank variant. Inputs: bank_rgb, bank_depth, bank_kp (N x D), z_rgb, z_depth, z_kp
      (B x D), has_depth, has_kp (uint8 B), ids (int64 B: sample ids, repeats allowed) and, per term
      loss_<a>_<b>, neg_<a>_<b> (int64 n x K: negatives of the term's valid anchors in sample order).
      Outputs: loss_<a>_<b>, loss_total, grad_z_rgb, grad_z_depth, grad_z_kp, and new_bank_<m>: bank m
      after the update with the samples that have m, in sample order.
Exit status 2: torch or safetensors is missing.
"""

import os
import sys

try:
    import torch
    from safetensors.torch import load_file, save_file
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"loss_parity.py: missing python package: {e}", file=sys.stderr)
    sys.exit(2)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import losses  # noqa: E402

MODALITIES = ["rgb", "depth", "kp"]


def bank(inputs):
    b = inputs["z_rgb"].shape[0]
    has = {
        "rgb": torch.ones(b, dtype=torch.bool),
        "depth": inputs["has_depth"].bool(),
        "kp": inputs["has_kp"].bool(),
    }
    z = {m: inputs[f"z_{m}"].detach().clone().requires_grad_(True) for m in MODALITIES}
    ids = inputs["ids"]
    out = {}
    for a, m in losses.PAIRS:
        anchors = has[a] & has[m]
        out[f"loss_{a}_{m}"] = losses.memory_bank_term(
            z[a][anchors], inputs[f"bank_{m}"], ids[anchors], inputs[f"neg_{a}_{m}"]
        )
    total = sum(out[f"loss_{a}_{m}"] for a, m in losses.PAIRS)
    grads = torch.autograd.grad(total, [z[m] for m in MODALITIES], allow_unused=True)
    out = {name: value.detach() for name, value in out.items()}
    out["loss_total"] = total.detach()
    for m, grad in zip(MODALITIES, grads):
        out[f"grad_z_{m}"] = torch.zeros_like(z[m]) if grad is None else grad
    for m in MODALITIES:
        out[f"new_bank_{m}"] = losses.bank_update(inputs[f"bank_{m}"], ids[has[m]], inputs[f"z_{m}"][has[m]])
    return out


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("eval", "bank"):
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    torch.set_num_threads(1)
    inputs = load_file(sys.argv[2])
    out = losses.loss_eval(inputs) if sys.argv[1] == "eval" else bank(inputs)
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])


if __name__ == "__main__":
    main()
