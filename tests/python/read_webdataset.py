#!/usr/bin/env python3
"""Reads hcmoco shards with Python's `webdataset` package, as a user of the Python ecosystem would.

Usage: read_webdataset.py SHARD.tar [SHARD.tar ...]

Prints one JSON object per sample, in shard order, on stdout:
  {"url", "key", "members": [extensions, sorted], "sizes": {ext: bytes},
   "rgb": {"ext", "width", "height", "data": [H*W*3 uint8]},
   "depth": {"width", "height", "data": [H*W uint16]} or null,
   "parts": {"width", "height", "data": [H*W uint8]} or null,
   "kp2d": the parsed kp2d.json, "meta": the parsed meta.json}
Images are decoded with PIL from the raw member bytes. A second pass through webdataset's own
decoders (`.decode("rgb8")`) must agree with the first (checked here; exit status 1 otherwise).
Exit status 2: webdataset, PIL or numpy is missing (scripts/setup.sh installs them).
"""

import io
import json
import sys

try:
    import numpy as np
    import webdataset as wds
    from PIL import Image
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"read_webdataset.py: missing python package: {e} (run scripts/setup.sh)", file=sys.stderr)
    sys.exit(2)


def image(data, mode):
    img = Image.open(io.BytesIO(data))
    img.load()
    if mode == "rgb":
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    elif mode == "depth":
        if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"depth.png has PIL mode {img.mode}, expected 16-bit")
        arr = np.asarray(img).astype(np.uint16)
    else:
        if img.mode != "L":
            raise ValueError(f"parts.png has PIL mode {img.mode}, expected L")
        arr = np.asarray(img, dtype=np.uint8)
    return {"width": img.width, "height": img.height, "data": arr.reshape(-1).tolist()}, arr


def main(urls):
    raw = wds.WebDataset(urls, shardshuffle=False)
    rgb_arrays = []
    for s in raw:
        members = sorted(k for k in s if not k.startswith("__"))
        rgb_ext = "rgb.jpg" if "rgb.jpg" in s else "rgb.png"
        rgb, rgb_arr = image(s[rgb_ext], "rgb")
        rgb["ext"] = rgb_ext
        rgb_arrays.append(rgb_arr)
        out = {
            "url": s["__url__"],
            "key": s["__key__"],
            "members": members,
            "sizes": {k: len(s[k]) for k in members},
            "rgb": rgb,
            "depth": image(s["depth.png"], "depth")[0] if "depth.png" in s else None,
            "parts": image(s["parts.png"], "parts")[0] if "parts.png" in s else None,
            "kp2d": json.loads(s["kp2d.json"]),
            "meta": json.loads(s["meta.json"]),
        }
        print(json.dumps(out, separators=(",", ":")))

    # webdataset's own decoders: rgb8 arrays for the images, parsed json
    decoded = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    n = 0
    for i, s in enumerate(decoded):
        arr = s["rgb.jpg"] if "rgb.jpg" in s else s["rgb.png"]
        if arr.dtype != np.uint8 or not np.array_equal(arr, rgb_arrays[i]):
            print(f"sample {s['__key__']}: webdataset rgb8 decode disagrees with PIL", file=sys.stderr)
            return 1
        if not isinstance(s["kp2d.json"], dict) or "joints" not in s["kp2d.json"]:
            print(f"sample {s['__key__']}: kp2d.json not decoded to a dict", file=sys.stderr)
            return 1
        n += 1
    if n != len(rgb_arrays):
        print(f"decoded pass saw {n} samples, raw pass {len(rgb_arrays)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(64)
    sys.exit(main(sys.argv[1:]))
