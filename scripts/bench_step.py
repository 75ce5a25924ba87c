"""PyTorch eager side of `hcmoco-worker bench step`: one training step of the same model and objective.

The model is the project's PyTorch reference (tests/python/reference/model.py: HRNet + SemGCN + heads,
the same architecture and state-dict names as the Rust worker), the objective its reference losses
(tests/python/reference/losses.py), SGD with momentum 0.9 and weight decay 1e-4. The batch has the
shapes of the Rust benchmark's synthetic batch: every other sample with depth (foreground in a central
box), every sample with keypoints, 80% of joints visible, P DICL cells per sample with depth.

    python scripts/bench_step.py --backbone hrnet_small --batch 16 --image 64 --stage 2 --threads 1

Prints one line per timed step and `impl=pytorch ... median_ms=... samples_per_s=...`.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from reference import losses  # noqa: E402
from reference.model import HCMoCoModel  # noqa: E402

JOINTS = 16


def map_side(pixels):
    return ((pixels + 1) // 2 + 1) // 2


def synthetic_batch(args, device):
    g = torch.Generator().manual_seed(1234)
    b, s = args.batch, args.image
    has_depth = torch.arange(b) % 2 == 0
    bd = int(has_depth.sum())
    depth = torch.zeros(bd, 1, s, s)
    lo, hi = s // 4, s - s // 4
    depth[:, :, lo:hi, lo:hi] = torch.rand(bd, 1, hi - lo, hi - lo, generator=g) - 0.5
    m = map_side(s)
    mlo, mhi = m // 4, max(m - m // 4, m // 4 + 1)
    rows = torch.randint(mlo, mhi, (b, args.dicl_points), generator=g)
    cols = torch.randint(mlo, mhi, (b, args.dicl_points), generator=g)
    batch = {
        "rgb": torch.randn(b, 3, s, s, generator=g),
        "depth": depth,
        "keypoints": torch.rand(b, JOINTS, 2, generator=g) * 2 - 1,
        "has_depth": has_depth,
        "pixel_idx": rows * m + cols,
        "joint_cells": torch.randint(0, m, (b, JOINTS, 2), generator=g),
        "joint_vis": torch.rand(b, JOINTS, generator=g) < 0.8,
    }
    return {k: v.to(device) for k, v in batch.items()}


def objective(out, batch, stage, banks=None, negatives=0):
    """The stage's terms at world size 1 (the whole batch in this process), summed. With `banks` (one
    N x D bank per modality), the sample-level terms use the memory-bank variant with `negatives` drawn
    per anchor, and the banks are updated after."""
    b = batch["rgb"].shape[0]
    has_depth = batch["has_depth"]
    ones = torch.ones(b, dtype=torch.bool, device=has_depth.device)
    z_depth = out["z_rgb"].new_zeros(out["z_rgb"].shape).index_copy(0, has_depth.nonzero().flatten(), out["z_depth"])
    z = {"rgb": out["z_rgb"], "depth": z_depth, "kp": out["z_kp"]}
    has = {"rgb": ones, "depth": has_depth, "kp": ones}
    if banks is None:
        total = sum(losses.sample_level_in_batch(z[a], z[m], has[a], has[m]) for a, m in losses.PAIRS)
    else:
        ids = torch.arange(b, device=has_depth.device)
        n = banks["rgb"].shape[0]
        total = 0
        for a, m in losses.PAIRS:
            anchors = has[a] & has[m]
            k = anchors.nonzero().flatten()
            # Uniform over the other N - 1 samples: draw from N - 1 and skip the anchor's own id.
            neg = torch.randint(0, n - 1, (k.numel(), negatives), device=has_depth.device)
            neg = neg + (neg >= ids[k][:, None]).long()
            total = total + losses.memory_bank_term(z[a][k], banks[m], ids[k], neg)
        with torch.no_grad():
            for mod in ("rgb", "depth", "kp"):
                rows = has[mod].nonzero().flatten()
                banks[mod] = losses.bank_update(banks[mod], ids[rows], z[mod][rows].detach())
    if stage == 2:
        dense_d = out["dense_rgb"].new_zeros(out["dense_rgb"].shape)
        dense_d = dense_d.index_copy(0, has_depth.nonzero().flatten(), out["dense_depth"])
        dense = losses.dense_terms(
            out["dense_rgb"], dense_d, batch["pixel_idx"], has_depth, batch["joint_cells"], batch["joint_vis"], out["g_kp"]
        )
        total = total + sum(dense)
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="hrnet_small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dicl-points", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--norm", default="batch")
    p.add_argument("--bank-samples", type=int, default=0)
    p.add_argument("--negatives", type=int, default=16384)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = HCMoCoModel(args.backbone, "mpii16", norm=args.norm).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batch = synthetic_batch(args, device)
    banks = None
    if args.bank_samples > 0:
        if args.bank_samples <= args.batch:
            p.error(f"--bank-samples {args.bank_samples}: the batch holds ids 0..{args.batch}: more are needed")
        banks = {
            m: torch.nn.functional.normalize(torch.randn(args.bank_samples, 128, device=device), dim=1)
            for m in ("rgb", "depth", "kp")
        }
    depth_in = batch["depth"] if batch["depth"].shape[0] > 0 else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(args.warmup + args.iters):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            # Stage 1 reads no dense map: neither side computes one (ours skips the dense heads too).
            out = model(batch["rgb"], depth_in, batch["keypoints"], dense=args.stage == 2)
        out = {k: v.float() for k, v in out.items()}
        loss = objective(out, batch, args.stage, banks, args.negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        sync()
        ms = (time.perf_counter() - t) * 1e3
        if i >= args.warmup:
            print(f"step={i - args.warmup} ms={ms:.2f} loss={value:.4f}")
            times.append(ms)
    times.sort()
    median = times[len(times) // 2]
    print(
        f"impl=pytorch backbone={args.backbone} batch={args.batch} image={args.image} stage={args.stage} "
        f"variant={'memory_bank' if banks is not None else 'in_batch'} "
        f"threads={args.threads} device={args.device} autocast={args.bf16} median_ms={median:.2f} "
        f"samples_per_s={args.batch / (median / 1e3):.1f}"
    )


if __name__ == "__main__":
    main()
