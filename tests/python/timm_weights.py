"""timm side of the import test in tests/tests/interop.rs: weights made by timm, loaded by us.

    python timm_weights.py OUT_DIR

Creates timm's `hrnet_w18` (features_only=True, feature_location='', out_indices=(1, 2, 3, 4)) with
seeded random weights, runs two training-mode batches (so the BatchNorm statistics and counters are
not the initial ones), and writes
- OUT_DIR/timm_state.safetensors: its state dict, as a PyTorch user would save it;
- OUT_DIR/timm_io.safetensors: `input` (1 x 3 x 64 x 64) and `branch1`..`branch4`, timm's four
  branch maps for it in eval mode.
Exit status 2: a package is missing.
"""

import sys

try:
    import timm
    import torch
    from safetensors.torch import save_file
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"missing python package: {e} (scripts/setup.sh installs timm)", file=sys.stderr)
    sys.exit(2)


def main():
    out = sys.argv[1]
    torch.manual_seed(7)
    model = timm.create_model(
        "hrnet_w18", pretrained=False, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/timm_state.safetensors")
    io = {"input": x}
    io.update({f"branch{i + 1}": m.contiguous() for i, m in enumerate(maps)})
    save_file(io, f"{out}/timm_io.safetensors")


if __name__ == "__main__":
    main()
