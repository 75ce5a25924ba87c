"""The Python ecosystem's loader on our shards: webdataset + PIL + torch DataLoader.

Does the work `hcmoco-worker bench loader` does, per sample: decode rgb.png (and depth.png 16-bit
when present) and kp2d.json, draw a similarity crop around the person (a square crop of 8-120% of the
image area for samples with depth, an affine crop with scale and rotation jitter otherwise), resample
RGB bilinearly and depth nearest to size x size with PIL, transform the keypoints, and recompute
visibility. Prints `samples=... secs=... samples_per_s=...`.

Usage: python bench_loader.py --shards 'DIR/shard-{00000..00007}.tar' --workers 2 --samples 2048 --batch 32 --size 64
"""
import argparse
import io
import json
import math
import random
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image


def person_box(joints, w, h):
    vis = [(x, y) for x, y, v in joints if v]
    if len(vis) >= 2:
        xs, ys = [p[0] for p in vis], [p[1] for p in vis]
        return min(xs), min(ys), max(xs), max(ys)
    return 0.0, 0.0, float(w), float(h)


def augment(sample, size, rng):
    rgb = Image.open(io.BytesIO(sample["rgb.png"])).convert("RGB")
    depth = Image.open(io.BytesIO(sample["depth.png"])) if "depth.png" in sample else None
    joints = json.loads(sample["kp2d.json"])["joints"]
    w, h = rgb.size
    x0, y0, x1, y1 = person_box(joints, w, h)
    pcx, pcy = (x0 + x1) / 2, (y0 + y1) / 2
    if depth is not None:
        side = math.sqrt(rng.uniform(0.08, 1.2) * w * h)
        cx, cy, theta = pcx + rng.uniform(-0.1, 0.1) * side, pcy + rng.uniform(-0.1, 0.1) * side, 0.0
    else:
        edge = max(x1 - x0, y1 - y0, 1.0)
        side = edge * 1.25 * (1 + rng.uniform(-0.25, 0.25))
        cx, cy, theta = pcx, pcy, math.radians(rng.uniform(-30, 30))
    s = side / size
    c, sn = math.cos(theta), math.sin(theta)
    # Output (u, v) -> source (x, y): x = cx + s(c(u - size/2) - sn(v - size/2)), y likewise.
    a, b, d, e = s * c, -s * sn, s * sn, s * c
    coeffs = (a, b, cx - (a + b) * size / 2, d, e, cy - (d + e) * size / 2)
    out_rgb = np.asarray(rgb.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR))
    out_depth = None
    if depth is not None:
        out_depth = np.asarray(depth.convert("I").transform((size, size), Image.AFFINE, coeffs, resample=Image.NEAREST))
    kp = []
    for x, y, v in joints:
        dx, dy = x - cx, y - cy
        u, vv = (c * dx + sn * dy) / s + size / 2, (-sn * dx + c * dy) / s + size / 2
        kp.append((u, vv, bool(v) and 0 <= u < size and 0 <= vv < size))
    return torch.from_numpy(out_rgb.copy()), (torch.from_numpy(out_depth.astype(np.int32)) if out_depth is not None else None), kp


class Aug:
    def __init__(self, size):
        self.size = size

    def __call__(self, sample):
        rng = random.Random(hash(sample["__key__"]))
        rgb, depth, kp = augment(sample, self.size, rng)
        return {"rgb": rgb, "has_depth": depth is not None, "kp": kp}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = wds.WebDataset(a.shards, shardshuffle=False, empty_check=False).repeat().map(Aug(a.size))
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=a.workers, collate_fn=lambda b: b, prefetch_factor=2)
    n = 0
    start = None
    for i, batch in enumerate(dl):
        if i == 1:
            start, n = time.perf_counter(), 0  # the first batch includes worker start-up
        n += len(batch)
        if start is not None and n >= a.samples:
            break
    secs = time.perf_counter() - start
    print(f"samples={n} secs={secs:.3f} samples_per_s={n / secs:.1f}", flush=True)


if __name__ == "__main__":
    main()
