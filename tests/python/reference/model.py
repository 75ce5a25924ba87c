"""The whole HCMoCo model in plain PyTorch (method page, "Encoders"), with the `state_dict()` names of the
Rust model's `VarStore` (`worker/src/model.rs`):

- `rgb.backbone.*` (HRNet, 3 input channels), `rgb.global_head.{weight,bias}` (Linear(sum of branch widths
  -> embed_dim) on the concatenated global-average-pooled branches), `rgb.dense_head.{weight,bias}` (1x1
  conv with bias, sum of branch widths -> embed_dim, on branch 1 concatenated with branches 2-4 upsampled
  bilinearly to its size, align_corners=False);
- the same under `depth.*` (1 input channel);
- `kp.gcn.*` (SemGCN), `kp.global_head.{weight,bias}` (Linear(embed_dim -> embed_dim) on the mean over
  joints).

Every output is before L2 normalisation (the losses normalise).
"""

import torch
from torch import nn
from torch.nn import functional as F

from .hrnet import HRNet, branch_channels
from .semgcn import SemGCN


class ImageEncoder(nn.Module):
    def __init__(self, preset, in_channels, embed_dim, norm, groups, upsample):
        super().__init__()
        self.backbone = HRNet(preset, in_channels, norm, groups, upsample)
        c = sum(branch_channels(preset))
        self.global_head = nn.Linear(c, embed_dim)
        self.dense_head = nn.Conv2d(c, embed_dim, 1, bias=True)

    def global_embedding(self, maps):
        """N x embed_dim."""
        return self.global_head(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))

    def dense(self, maps):
        """N x embed_dim x h x w (stride 4)."""
        size = maps[0].shape[2:]
        up = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return self.dense_head(torch.cat([maps[0], *up], dim=1))

    def forward(self, x, dense=True):
        """-> (branch maps, global embedding, dense map, or None without `dense`)."""
        maps = self.backbone(x)
        return maps, self.global_embedding(maps), self.dense(maps) if dense else None


class KeypointEncoder(nn.Module):
    def __init__(self, layout, embed_dim, hidden, blocks, norm, groups):
        super().__init__()
        self.gcn = SemGCN(layout, hidden, embed_dim, blocks, norm, groups)
        self.global_head = nn.Linear(embed_dim, embed_dim)

    def forward(self, kp):
        """N x J x 2 -> (global embedding N x embed_dim, per-joint outputs N x J x embed_dim)."""
        g = self.gcn(kp)
        return self.global_head(g.mean(dim=1)), g


class HCMoCoModel(nn.Module):
    """Arguments mirror the job file's `[model]` table: `backbone` ("hrnet_w18" / "hrnet_small"),
    `embed_dim`, `keypoint_hidden`, `keypoint_blocks`, `norm` ("batch" / "group" / "none"), `groups`,
    `upsample` ("bilinear" / "nearest"); `layout` is the job's keypoint layout ("mpii16" / "coco13")."""

    def __init__(
        self,
        backbone="hrnet_w18",
        layout="mpii16",
        embed_dim=128,
        keypoint_hidden=128,
        keypoint_blocks=4,
        norm="batch",
        groups=32,
        upsample="bilinear",
    ):
        super().__init__()
        self.rgb = ImageEncoder(backbone, 3, embed_dim, norm, groups, upsample)
        self.depth = ImageEncoder(backbone, 1, embed_dim, norm, groups, upsample)
        self.kp = KeypointEncoder(layout, embed_dim, keypoint_hidden, keypoint_blocks, norm, groups)

    def forward(self, rgb, depth, keypoints, dense=True):
        """-> dict of `z_rgb`, `dense_rgb`, `z_depth`, `dense_depth`, `z_kp`, `g_kp` (before normalisation).
        `depth` may be None (no depth in the batch). Without `dense` (stage 1, whose terms do not read
        them) the dense maps are not computed and are left out of the dict."""
        _, z_rgb, dense_rgb = self.rgb(rgb, dense)
        out = {"z_rgb": z_rgb}
        if dense:
            out["dense_rgb"] = dense_rgb
        if depth is not None:
            _, out["z_depth"], dense_depth = self.depth(depth, dense)
            if dense:
                out["dense_depth"] = dense_depth
        out["z_kp"], out["g_kp"] = self.kp(keypoints)
        return out
