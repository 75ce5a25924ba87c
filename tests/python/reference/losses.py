"""A plain PyTorch reference of every term of the HCMoCo objective.

Written from the method page (../shared/docs/hcmoco-method.md, "Losses"), independently of the Rust
implementation, in the way one would write it in PyTorch: one process holding the whole batch, masks by
boolean indexing, full similarity matrices. tau = 0.07; the losses L2-normalise every feature
(F.normalize, eps 1e-12). A term without valid anchors is 0.

Conventions shared with `hcmoco-worker loss-eval` (docs/loss-eval.md):
- dense maps are B x C x h x w; a cell's flat index is row * w + col;
- `pixel_idx[s]` are the P cells drawn for sample s (read only when s has depth);
- `joint_cells[s, j]` is (row, col) of joint j's cell (read only when the joint is visible).
"""

import torch
import torch.nn.functional as F

TAU = 0.07

# The six sample-level terms, anchor modality first, in the order their outputs are summed.
PAIRS = [("rgb", "depth"), ("depth", "rgb"), ("depth", "kp"), ("kp", "depth"), ("rgb", "kp"), ("kp", "rgb")]

TERM_OUTPUTS = [f"loss_{a}_{b}" for a, b in PAIRS] + [
    "loss_dicl_r2d",
    "loss_dicl_d2r",
    "loss_sscl_r2k",
    "loss_sscl_d2k",
    "loss_sscl_cross",
]
GRAD_INPUTS = ["z_rgb", "z_depth", "z_kp", "dense_rgb", "dense_depth", "g_kp"]


def sample_level_in_batch(z_a, z_b, has_a, has_b, tau=TAU):
    """CMC-style term with in-batch candidates.

    Anchors: samples with both modalities; candidates: every sample with modality b (the anchor's own
    sample included); the target of an anchor is its own sample. Mean cross-entropy over the anchors.
    """
    anchors = has_a & has_b
    if not anchors.any():
        return z_a.new_zeros(())
    za = F.normalize(z_a[anchors], dim=1)
    zb = F.normalize(z_b[has_b], dim=1)
    logits = za @ zb.T / tau
    position_among_candidates = torch.cumsum(has_b.long(), 0) - 1
    return F.cross_entropy(logits, position_among_candidates[anchors])


def dicl(f_r, f_d, pixel_idx, has_depth, tau=TAU):
    """Dense intra-sample term: (L_r2d, L_d2r), each the mean over the P anchors of every sample with depth."""
    _, c, h, w = f_r.shape
    per_anchor_r2d, per_anchor_d2r = [], []
    for s in has_depth.nonzero().flatten().tolist():
        idx = pixel_idx[s]
        u = F.normalize(f_r[s].reshape(c, h * w)[:, idx].T, dim=1)  # P x C, RGB
        v = F.normalize(f_d[s].reshape(c, h * w)[:, idx].T, dim=1)  # P x C, depth
        coords = torch.stack([idx // w, idx % w], dim=1).to(f_r.dtype)
        dist = torch.cdist(coords, coords, compute_mode="donot_use_mm_for_euclid_dist")  # D[k, l]
        weight = torch.softmax(-dist, dim=0)  # W[k, l] = exp(-D_kl) / sum_k' exp(-D_k'l)
        # r2d: anchor l is u_l, candidates k are v_k: logits[k, l] = v_k . u_l / tau, softmax over k.
        log_p = torch.log_softmax(v @ u.T / tau, dim=0)
        per_anchor_r2d.append(-(weight * log_p).sum(dim=0))
        # d2r: anchor l is v_l, candidates u_k.
        log_p = torch.log_softmax(u @ v.T / tau, dim=0)
        per_anchor_d2r.append(-(weight * log_p).sum(dim=0))
    if not per_anchor_r2d:
        zero = f_r.new_zeros(())
        return zero, zero
    return torch.cat(per_anchor_r2d).mean(), torch.cat(per_anchor_d2r).mean()


def joint_features(dense, cells):
    """B x C x h x w maps, B x J x 2 (row, col) cells -> B x J x C features at the cells."""
    b = torch.arange(dense.shape[0], device=dense.device)[:, None].expand(cells.shape[:2])
    return dense[b, :, cells[..., 0], cells[..., 1]]


def sscl_part1(feat, g, vis, tau=TAU):
    """Image joint <-> skeleton joint: every visible (sample, joint j) is an anchor, classifying its own
    skeleton's J joints (all candidates), target j. Mean over the visible anchors."""
    if not vis.any():
        return feat.new_zeros(())
    n, j, _ = feat.shape
    logits = torch.einsum("bjc,bic->bji", F.normalize(feat, dim=-1), F.normalize(g, dim=-1)) / tau
    target = torch.arange(j, device=feat.device).expand(n, j)
    return F.cross_entropy(logits[vis], target[vis])


def sscl_part2(rows, joint, tau=TAU):
    """SupCon over all rows: positives of row u are the other rows of the same joint; the denominator
    runs over every row but u. Mean over the rows that have at least one positive."""
    r = rows.shape[0]
    e = F.normalize(rows, dim=1)
    sim = e @ e.T / tau
    eye = torch.eye(r, dtype=torch.bool, device=rows.device)
    positive = (joint[:, None] == joint[None, :]) & ~eye
    count = positive.sum(dim=1)
    has_positive = count > 0
    if not has_positive.any():
        return rows.new_zeros(())
    log_p = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    per_row = -(log_p * positive).sum(dim=1)[has_positive] / count[has_positive]
    return per_row.mean()


def dense_terms(dense_rgb, dense_depth, pixel_idx, has_depth, joint_cells, joint_vis, g_kp, tau=TAU):
    """The five stage-2 terms (DICL both ways, SSCL part 1 for RGB and depth, SSCL part 2), in
    TERM_OUTPUTS order, from B x C x h x w dense maps (`dense_depth`'s rows of samples without depth are
    never read), the P drawn cells per sample, each joint's (row, col) cell and visibility, and the
    keypoint encoder's B x J x C joint outputs."""
    r2d, d2r = dicl(dense_rgb, dense_depth, pixel_idx, has_depth, tau)
    # Cells of invisible joints are never read: point them at (0, 0).
    cells = torch.where(joint_vis[..., None], joint_cells, torch.zeros_like(joint_cells))
    feat_r = joint_features(dense_rgb, cells)
    feat_d = joint_features(dense_depth[has_depth], cells[has_depth])
    r2k = sscl_part1(feat_r, g_kp, joint_vis, tau)
    d2k = sscl_part1(feat_d, g_kp[has_depth], joint_vis[has_depth], tau)
    joint_index = torch.arange(joint_vis.shape[1], device=joint_vis.device).expand(joint_vis.shape)
    rows = torch.cat([feat_r[joint_vis], feat_d[joint_vis[has_depth]]])
    joints = torch.cat([joint_index[joint_vis], joint_index[has_depth][joint_vis[has_depth]]])
    return r2d, d2r, r2k, d2k, sscl_part2(rows, joints, tau)


def loss_eval(inputs, tau=TAU):
    """Everything `hcmoco-worker loss-eval` writes, from the same named inputs (a dict of tensors)."""
    leaves = {name: inputs[name].detach().clone().requires_grad_(True) for name in GRAD_INPUTS}
    b = leaves["z_rgb"].shape[0]
    has_depth = inputs["has_depth"].bool()
    vis = inputs["joint_vis"].bool()
    ones = torch.ones(b, dtype=torch.bool, device=has_depth.device)
    has_kp = inputs["has_kp"].bool() if "has_kp" in inputs else ones
    has = {"rgb": ones, "depth": has_depth, "kp": has_kp}
    z = {"rgb": leaves["z_rgb"], "depth": leaves["z_depth"], "kp": leaves["z_kp"]}

    terms = {}
    for a, m in PAIRS:
        terms[f"loss_{a}_{m}"] = sample_level_in_batch(z[a], z[m], has[a], has[m], tau)
    dense = dense_terms(
        leaves["dense_rgb"],
        leaves["dense_depth"],
        inputs["pixel_idx"],
        has_depth,
        inputs["joint_cells"],
        vis,
        leaves["g_kp"],
        tau,
    )
    terms.update(zip(TERM_OUTPUTS[len(PAIRS) :], dense))

    total = sum(terms[name] for name in TERM_OUTPUTS)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    out = {name: value.detach() for name, value in terms.items()}
    out["loss_total"] = total.detach()
    for name, grad in zip(leaves, grads):
        out[f"grad_{name}"] = torch.zeros_like(leaves[name]) if grad is None else grad
    return out


def memory_bank_term(z_a, bank_b, ids, negatives, tau=TAU):
    """Memory-bank variant of one sample-level term over its valid anchors (n x D features before
    normalisation, their sample ids, n x K negative ids): logits [z . M_b[y], z . M_b[n_1..K]] / tau,
    target 0, mean over the anchors."""
    if z_a.shape[0] == 0:
        return z_a.new_zeros(())
    z = F.normalize(z_a, dim=1)
    candidates = bank_b[torch.cat([ids[:, None], negatives], dim=1)]  # n x (K + 1) x D
    logits = torch.einsum("nd,nkd->nk", z, candidates) / tau
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


def bank_update(bank, ids, z):
    """M[y] <- normalize(0.5 M[y] + 0.5 normalize(z_i)), one row at a time in the given order."""
    bank = bank.detach().clone()
    with torch.no_grad():
        for y, zi in zip(ids.tolist(), z):
            bank[y] = F.normalize(0.5 * bank[y] + 0.5 * F.normalize(zi, dim=0), dim=0)
    return bank
