"""HRNetV2 backbone in plain PyTorch, with the official HRNet layout's state-dict names (the same as timm's
`hrnet_w18` with `features_only=True, feature_location=''`).

Written independently of `worker/src/hrnet.rs`, as the PyTorch side of the parity tests and the eager
baseline of the benchmarks. Presets (`PRESETS`): `hrnet_w18` (HRNetV2-W18) and `hrnet_small` (the CPU
preset: stem 16, one Bottleneck 16 -> 64, widths 8/16/32/64, one module per stage, one block per branch).

Names: `conv1`, `bn1`, `conv2`, `bn2` (stem, two stride-2 3x3 convs); `layer1.N.*` (Bottlenecks);
`transitionT.I.{0,1}` (a branch that changes width) or `transitionT.I.K.{0,1}` (a new branch: stride-2
links); `stageS.M.branches.B.K.*` (BasicBlocks); `stageS.M.fuse_layers.I.J.*` (J > I: `.0` 1x1 conv, `.1`
norm, then upsampling; J < I: `.K.0`/`.K.1` stride-2 3x3 conv + norm links, ReLU between links).

Options: `norm` "batch" (BatchNorm2d, momentum 0.01, eps 1e-5) / "group" (GroupNorm, the largest divisor
of the width not above `groups`) / "none"; `upsample` "bilinear" (to the target branch's size,
align_corners=False, the authors' default) or "nearest" (timm's `nn.Upsample(scale_factor=2**(j-i))`).
"""

from torch import nn
from torch.nn import functional as F

from .semgcn import group_count

BN_MOMENTUM = 0.01
NORM_EPS = 1e-5

PRESETS = {
    # (modules, blocks per branch, branch widths) of stages 2, 3, 4.
    "hrnet_w18": {
        "stem": 64,
        "layer1_planes": 64,
        "layer1_blocks": 4,
        "stages": [(1, 4, [18, 36]), (4, 4, [18, 36, 72]), (3, 4, [18, 36, 72, 144])],
    },
    "hrnet_small": {
        "stem": 16,
        "layer1_planes": 16,
        "layer1_blocks": 1,
        "stages": [(1, 1, [8, 16]), (1, 1, [8, 16, 32]), (1, 1, [8, 16, 32, 64])],
    },
}


def branch_channels(preset):
    return list(PRESETS[preset]["stages"][-1][2])


def make_norm(norm, channels, groups):
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=NORM_EPS, momentum=BN_MOMENTUM)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups), channels, eps=NORM_EPS)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r}: expected 'batch', 'group' or 'none'")


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, norm, groups):
        super().__init__()
        self.conv1 = conv(cin, planes, 3)
        self.bn1 = make_norm(norm, planes, groups)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = make_norm(norm, planes, groups)
        self.downsample = None
        if cin != planes:
            self.downsample = nn.Sequential(conv(cin, planes, 1), make_norm(norm, planes, groups))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, norm, groups):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv(cin, planes, 1)
        self.bn1 = make_norm(norm, planes, groups)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = make_norm(norm, planes, groups)
        self.conv3 = conv(planes, cout, 1)
        self.bn3 = make_norm(norm, cout, groups)
        self.downsample = None
        if cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1), make_norm(norm, cout, groups))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every branch gets the sum of all branches brought to its
    resolution and width (summed in branch order), followed by ReLU."""

    def __init__(self, widths, blocks, norm, groups, upsample):
        super().__init__()
        self.upsample = upsample
        n = len(widths)
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(w, w, norm, groups) for _ in range(blocks)]) for w in widths
        )
        fuse = []
        for i in range(n):
            row = []
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(conv(widths[j], widths[i], 1), make_norm(norm, widths[i], groups)))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    links = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = widths[i] if last else widths[j]
                        layers = [conv(widths[j], cout, 3, 2), make_norm(norm, cout, groups)]
                        if not last:
                            layers.append(nn.ReLU())
                        links.append(nn.Sequential(*layers))
                    row.append(nn.Sequential(*links))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)

    def _up(self, t, size, factor):
        if self.upsample == "bilinear":
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        if self.upsample == "nearest":
            if (t.shape[2] * factor, t.shape[3] * factor) == tuple(size):
                return F.interpolate(t, scale_factor=float(factor), mode="nearest")
            return F.interpolate(t, size=size, mode="nearest")
        raise ValueError(f"upsample {self.upsample!r}")

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[2:]
            y = None
            for j, f in enumerate(row):
                t = f(xs[j])
                if j > i:
                    t = self._up(t, size, 2 ** (j - i))
                y = t if y is None else y + t
            out.append(F.relu(y))
        return out


class HRNet(nn.Module):
    """N x in_channels x H x W -> the four branch maps (strides 4, 8, 16, 32)."""

    def __init__(self, preset="hrnet_w18", in_channels=3, norm="batch", groups=32, upsample="bilinear"):
        super().__init__()
        spec = PRESETS[preset]
        stem = spec["stem"]
        self.conv1 = conv(in_channels, stem, 3, 2)
        self.bn1 = make_norm(norm, stem, groups)
        self.conv2 = conv(stem, stem, 3, 2)
        self.bn2 = make_norm(norm, stem, groups)
        blocks = []
        cin = stem
        for _ in range(spec["layer1_blocks"]):
            blocks.append(Bottleneck(cin, spec["layer1_planes"], norm, groups))
            cin = spec["layer1_planes"] * Bottleneck.expansion
        self.layer1 = nn.Sequential(*blocks)
        pre = [cin]
        for k, (modules, nblocks, widths) in enumerate(spec["stages"]):
            trans = []
            for i, w in enumerate(widths):
                if i < len(pre):
                    if w == pre[i]:
                        trans.append(nn.Identity())
                    else:
                        trans.append(nn.Sequential(conv(pre[i], w, 3), make_norm(norm, w, groups), nn.ReLU()))
                else:
                    links = []
                    n = i + 1 - len(pre)
                    for t in range(n):
                        cout = w if t == n - 1 else pre[-1]
                        links.append(nn.Sequential(conv(pre[-1], cout, 3, 2), make_norm(norm, cout, groups), nn.ReLU()))
                    trans.append(nn.Sequential(*links))
            setattr(self, f"transition{k + 1}", nn.ModuleList(trans))
            stage = [HighResolutionModule(widths, nblocks, norm, groups, upsample) for _ in range(modules)]
            setattr(self, f"stage{k + 2}", nn.Sequential(*stage))
            pre = list(widths)
        self._init(norm)

    def _init(self, norm):
        """Official HRNet: conv weights normal(0, 0.001), norm weight 1, bias 0. Without normalisation,
        Kaiming-normal (fan out, ReLU), as timm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if norm == "none":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for k in range(3):
            trans = getattr(self, f"transition{k + 1}")
            xs = []
            for i, t in enumerate(trans):
                if i < len(ys):
                    xs.append(t(ys[i]))
                else:
                    xs.append(t(ys[-1]))
            ys = getattr(self, f"stage{k + 2}")(xs)
        return ys
