#!/usr/bin/env python3
"""The PyTorch side of `tests/tests/model_parity.rs`: runs a reference module (tests/python/reference) on
the weights and inputs the Rust test wrote, and compares with the Rust results.

Usage: model_parity.py CASE.json, where CASE.json holds
  {"module": "semgcn" | "hrnet" | "model", "args": {constructor keyword arguments},
   "weights": W.safetensors (the variables before the forward passes, as `VarStore::save` wrote them),
   "io": IO.safetensors, "after": AFTER.safetensors (the variables after the Rust passes), "tol": 1e-9}
IO.safetensors holds `in.NAME` (inputs), `train.OUT` and `eval.OUT` (the Rust outputs in training and in
evaluation mode), `r.OUT` (cotangents) and `grad.PARAM` (the Rust gradients of sum over OUT of
sum(train.OUT * r.OUT)).

Steps, all in f64: load W strictly; forward in training mode, compare every output; backward, compare every
parameter gradient; compare every variable with AFTER (BatchNorm running statistics and
num_batches_tracked); forward in evaluation mode (with the updated statistics), compare. A value passes
when |ours - rust| <= tol * max |rust| over the tensor (a tensor of zeros must match exactly).

Prints one JSON object: {"ok", "checked", "worst": [[name, error, scale], ...], "failures": [...]}.
Exit status 0 when everything passes, 1 on a mismatch, 2 on a setup error (missing package or tensor).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import torch
    from safetensors.torch import load_file

    from reference import hrnet, load_safetensors, model, semgcn
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"model_parity.py: missing python package: {e} (run scripts/setup.sh)", file=sys.stderr)
    sys.exit(2)


def build(case):
    kind, args = case["module"], case["args"]
    if kind == "semgcn":
        m = semgcn.SemGCN(**args)
        return m, lambda ins: {"y": m(ins["x"])}
    if kind == "hrnet":
        m = hrnet.HRNet(**args)
        return m, lambda ins: {f"b{i}": t for i, t in enumerate(m(ins["x"]))}
    if kind == "model":
        m = model.HCMoCoModel(**args)
        return m, lambda ins: m(ins["rgb"], ins["depth"], ins["keypoints"])
    raise ValueError(f"unknown module {kind!r}")


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    tol = float(case["tol"])
    torch.set_default_dtype(torch.float64)
    m, forward = build(case)
    m = m.double()
    load_safetensors(m, case["weights"])
    io = load_file(case["io"])
    after = load_file(case["after"])
    ins = {k[3:]: v for k, v in io.items() if k.startswith("in.")}
    results = []

    def compare(name, ours, rust):
        ours = ours.detach().to(torch.float64)
        rust = rust.to(torch.float64)
        if ours.shape != rust.shape:
            results.append((name, float("inf"), f"shape {list(ours.shape)} vs rust {list(rust.shape)}"))
            return
        # Relative to the tensor's largest value; a tensor of zeros must match exactly.
        scale = max(rust.abs().max().item(), sys.float_info.min) if rust.numel() else 1.0
        err = (ours - rust).abs().max().item() if rust.numel() else 0.0
        results.append((name, err / scale, scale))

    m.train()
    outs = forward(ins)
    for k, v in outs.items():
        compare(f"train.{k}", v, io[f"train.{k}"])
    loss = sum((v * io[f"r.{k}"]).sum() for k, v in outs.items())
    loss.backward()
    for name, p in m.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        compare(f"grad.{name}", grad, io[f"grad.{name}"])
    state = m.state_dict()
    if set(state) != set(after):
        raise KeyError(f"variables differ: {sorted(set(state) ^ set(after))}")
    for name, t in state.items():
        compare(f"after.{name}", t, after[name])
    m.eval()
    with torch.no_grad():
        outs = forward(ins)
    for k, v in outs.items():
        compare(f"eval.{k}", v, io[f"eval.{k}"])

    failures = [r for r in results if not r[1] <= tol]
    worst = sorted(results, key=lambda r: -r[1] if isinstance(r[1], float) else 0)[:5]
    print(json.dumps({"ok": not failures, "checked": len(results), "worst": worst, "failures": failures[:20]}))
    return 0 if not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyError, RuntimeError, ValueError) as e:
        print(f"model_parity.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
