"""SemGCN keypoint encoder (Zhao et al., CVPR 2019), as on the method page ("Encoders"), in plain PyTorch.

Same architecture and state-dict names as `worker/src/semgcn.rs`:
- `gconv_input.gconv.{W,e,bias}`, `gconv_input.bn.*`
- `gconv_layers.K.gconv{1,2}.gconv.{W,e,bias}`, `gconv_layers.K.gconv{1,2}.bn.*`
- `gconv_output.{W,e,bias}`

`W`: 2 x in x out (`W[0]` self, `W[1]` neighbours); `e`: 1 x nnz, one logit per nonzero entry of the
adjacency (symmetric skeleton edges plus self-loops) in row-major order; non-edges get -9e15 before the
row softmax. The norm layer is called `bn` whatever its kind (BatchNorm1d momentum 0.01 / GroupNorm with
`group_count(width, groups)` groups / none). Initialisation as the original SemGCN code.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

#: Parents of each joint (-1 for the root), method page "Inputs".
LAYOUT_PARENTS = {
    "mpii16": [1, 2, 6, 6, 3, 4, -1, 6, 7, 8, 11, 12, 8, 8, 13, 14],
    "coco13": [1, 2, 9, 10, 3, 4, -1, 8, 9, 6, 6, 10, 11],
}

BN_MOMENTUM = 0.01
NORM_EPS = 1e-5
NON_EDGE_LOGIT = -9e15


def adjacency_mask(parents):
    """J x J bool: skeleton edges (both directions) and self-loops."""
    j = len(parents)
    m = torch.eye(j, dtype=torch.bool)
    for child, parent in enumerate(parents):
        if parent >= 0:
            m[child, parent] = True
            m[parent, child] = True
    return m


def group_count(channels, groups):
    """Largest divisor of `channels` not above `groups` (at least 1): the GroupNorm group count."""
    cap = max(1, min(max(groups, 1), channels))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)


def make_norm(norm, channels, groups):
    """`norm`: "batch", "group" or "none"."""
    if norm == "batch":
        return nn.BatchNorm1d(channels, eps=NORM_EPS, momentum=BN_MOMENTUM)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups), channels, eps=NORM_EPS)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r}: expected 'batch', 'group' or 'none'")


class SemGraphConv(nn.Module):
    """out = (A * I)(X W0) + (A * (1 - I))(X W1) + b, A = row softmax of the masked edge logits."""

    def __init__(self, in_features, out_features, mask):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(2, in_features, out_features))
        nn.init.xavier_uniform_(self.W.data, gain=1.414)
        # Not part of the state dict: derived from the layout.
        self.register_buffer("mask", mask.clone(), persistent=False)
        self.e = nn.Parameter(torch.ones(1, int(mask.sum())))
        self.bias = nn.Parameter(torch.zeros(out_features))
        stdv = 1.0 / math.sqrt(out_features)
        self.bias.data.uniform_(-stdv, stdv)

    def adjacency(self):
        adj = torch.full(self.mask.shape, NON_EDGE_LOGIT, dtype=self.e.dtype, device=self.e.device)
        adj[self.mask] = self.e.view(-1)
        return F.softmax(adj, dim=1)

    def forward(self, x):
        h0 = torch.matmul(x, self.W[0])
        h1 = torch.matmul(x, self.W[1])
        adj = self.adjacency()
        eye = torch.eye(adj.size(0), dtype=adj.dtype, device=adj.device)
        return torch.matmul(adj * eye, h0) + torch.matmul(adj * (1 - eye), h1) + self.bias.view(1, 1, -1)


class GraphConvBlock(nn.Module):
    """Graph conv -> norm (over channels, statistics over batch and joints) -> ReLU."""

    def __init__(self, mask, in_dim, out_dim, norm, groups):
        super().__init__()
        self.gconv = SemGraphConv(in_dim, out_dim, mask)
        self.bn = make_norm(norm, out_dim, groups)

    def forward(self, x):
        x = self.gconv(x).transpose(1, 2)
        x = self.bn(x).transpose(1, 2)
        return F.relu(x)


class ResGraphConv(nn.Module):
    def __init__(self, mask, hidden, norm, groups):
        super().__init__()
        self.gconv1 = GraphConvBlock(mask, hidden, hidden, norm, groups)
        self.gconv2 = GraphConvBlock(mask, hidden, hidden, norm, groups)

    def forward(self, x):
        return x + self.gconv2(self.gconv1(x))


class SemGCN(nn.Module):
    """B x J x 2 -> B x J x out. `layout`: "mpii16" / "coco13" or a parents list."""

    def __init__(self, layout, hidden=128, out=128, blocks=4, norm="batch", groups=4):
        super().__init__()
        parents = LAYOUT_PARENTS[layout] if isinstance(layout, str) else list(layout)
        mask = adjacency_mask(parents)
        self.gconv_input = GraphConvBlock(mask, 2, hidden, norm, groups)
        self.gconv_layers = nn.Sequential(*[ResGraphConv(mask, hidden, norm, groups) for _ in range(blocks)])
        self.gconv_output = SemGraphConv(hidden, out, mask)

    def forward(self, x):
        return self.gconv_output(self.gconv_layers(self.gconv_input(x)))
