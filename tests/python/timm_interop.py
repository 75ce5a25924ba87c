"""timm side of tests/tests/interop.rs: loads our HRNet-W18 exports into timm's hrnet_w18.

    python timm_interop.py --before BEFORE --export EXPORT --input INPUT --out OUT_DIR

BEFORE: the backbone's state before the training-mode forwards (official names), EXPORT: the
`hcmoco-worker export` file of the state after them, INPUT: `eval` (the evaluation input) and
`train_0`..`train_{n-1}` (the training-mode batches, in order). Both weight files are loaded with
`load_state_dict(strict=True)` into
`timm.create_model('hrnet_w18', pretrained=False, features_only=True, feature_location='',
out_indices=(1, 2, 3, 4))`: the names must match exactly, no renaming.

With --gn-export G (a GroupNorm export) and --gn-groups N, timm's BatchNorm2d layers are first replaced by
GroupNorm with the group count of docs/export.md (the largest divisor of C not above N), then G is loaded.

Writes OUT_DIR/timm_features.safetensors: `nearest.branch1..4` (timm as it is, eval mode, on `eval`),
`bilinear.branch1..4` (the fuse layers' nn.Upsample switched to bilinear, align_corners=False) and, with
--gn-export, `gn.branch1..4`;
OUT_DIR/timm_trained.safetensors: the state dict after timm ran the training batches from BEFORE with
BatchNorm momentum 0.01 (ours). Prints one JSON line (versions, parameter count).
Exit status 2: a package is missing; 1: the weights do not load.
"""

import argparse
import json
import sys

try:
    import timm
    import torch
    from safetensors.torch import load_file, save_file
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"missing python package: {e} (scripts/setup.sh installs timm)", file=sys.stderr)
    sys.exit(2)


def create():
    return timm.create_model(
        "hrnet_w18", pretrained=False, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
    )


def group_count(channels, max_groups):
    """The largest divisor of `channels` not above `max_groups` (docs/export.md)."""
    return max(g for g in range(1, min(channels, max(max_groups, 1)) + 1) if channels % g == 0)


def to_group_norm(module, max_groups):
    """Replaces every BatchNorm2d under `module` by GroupNorm (same `weight` / `bias` names)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            c = child.num_features
            setattr(module, name, torch.nn.GroupNorm(group_count(c, max_groups), c, eps=1e-5))
        else:
            to_group_norm(child, max_groups)
    return module


def load(model, path):
    state = load_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        ours, theirs = set(state), set(model.state_dict())
        print(f"{path} does not load into timm hrnet_w18: {e}", file=sys.stderr)
        print(f"  only in our file: {sorted(ours - theirs)[:20]}", file=sys.stderr)
        print(f"  only in timm: {sorted(theirs - ours)[:20]}", file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    for a in ("--before", "--export", "--input", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--gn-export")
    ap.add_argument("--gn-groups", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    inputs = load_file(args.input)
    x = inputs["eval"]

    model = create()
    load(model, args.export)
    model.eval()
    out = {}
    with torch.no_grad():
        for i, f in enumerate(model(x), start=1):
            out[f"nearest.branch{i}"] = f.contiguous()
        ups = [m for m in model.modules() if isinstance(m, torch.nn.Upsample)]
        assert ups, "timm's hrnet_w18 has no nn.Upsample modules any more"
        for m in ups:
            m.mode, m.align_corners = "bilinear", False
        for i, f in enumerate(model(x), start=1):
            out[f"bilinear.branch{i}"] = f.contiguous()
        if args.gn_export:
            gn = to_group_norm(create(), args.gn_groups)
            load(gn, args.gn_export)
            gn.eval()
            for i, f in enumerate(gn(x), start=1):
                out[f"gn.branch{i}"] = f.contiguous()
    save_file(out, f"{args.out}/timm_features.safetensors")

    trained = create()
    load(trained, args.before)
    for m in trained.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.01
    trained.train()
    n = sum(1 for k in inputs if k.startswith("train_"))
    with torch.no_grad():
        for i in range(n):
            trained(inputs[f"train_{i}"])
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, f"{args.out}/timm_trained.safetensors")

    print(json.dumps({
        "timm": timm.__version__,
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "upsample_modules": len(ups),
        "train_batches": n,
    }))


if __name__ == "__main__":
    main()
