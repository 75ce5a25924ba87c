//! The sparse structure-aware terms (SSCL, method page, Losses 3 and 4).
//!
//! Part 1 pairs each visible image joint feature (read at the joint's cell of a dense map, see
//! [`super::cell_features`]) with the sample's own skeleton joints; part 2 is a supervised-contrastive
//! term over every visible joint row of the global batch, positives being rows of the same joint.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::normalize;

/// SSCL part 1, as this rank's share.
///
/// `feat`: n x J x C image joint features (before normalisation), `g`: n x J x C keypoint-encoder joint
/// outputs (before normalisation), `vis`: n x J bool. Each visible `(sample, joint j)` is an anchor:
/// cross-entropy over the sample's J skeleton joints (all J are candidates) with logits
/// `normalize(feat_j) . normalize(g_i) / tau` and target `i = j`. Returns the sum over this rank's
/// anchors divided by `global_anchors` (visible anchors in the global batch). Features of invisible
/// joints and skeletons of samples without a visible joint are selected out before normalisation.
/// Without anchors the share is exactly 0 with no graph.
pub fn sscl_part1_share(feat: &Tensor, g: &Tensor, vis: &Tensor, tau: f64, global_anchors: usize) -> Tensor {
    let (kind, device) = (feat.kind(), feat.device());
    let size = feat.size();
    debug_assert_eq!(size.len(), 3, "joint features are n x J x C");
    debug_assert_eq!(g.size(), size, "skeleton joint outputs must match the image joint features");
    let (n, j, c) = (size[0], size[1], size[2]);
    if global_anchors == 0 || n * j == 0 {
        return Tensor::zeros([], (kind, device));
    }
    let anchors = vis.reshape([n * j]).to_device(device).nonzero().squeeze_dim(1); // flat (sample, joint)
    if anchors.size()[0] == 0 {
        return Tensor::zeros([], (kind, device));
    }
    let sample = anchors.floor_divide_scalar(j);
    let joint = anchors.remainder(j);
    let q = normalize(&feat.reshape([n * j, c]).index_select(0, &anchors)); // A x C
    let keys = normalize(&g.index_select(0, &sample)); // A x J x C: the anchor's own skeleton
    let logits = keys.bmm(&q.unsqueeze(2)).squeeze_dim(2) / tau; // A x J
    let ce = -logits.log_softmax(1, kind).gather(1, &joint.unsqueeze(1), false).sum(kind);
    ce / global_anchors as f64
}

/// SSCL part 2 over the global batch, as this rank's share.
///
/// `rows`: R x C, every rank's rows (before normalisation): `r_j` of every visible joint of every
/// sample and `d_j` of every visible joint of every sample with depth; `joint[u]`: the joint index of
/// row `u`; `anchor[u]`: row `u` is this rank's. With `S = E E^T / tau` over the normalised rows, the loss
/// of row `u` is `-mean over v in P(u) of (S_uv - logsumexp over w != u of S_uw)`, `P(u)` the rows
/// `v != u` of the same joint. Returns `(sum over this rank's rows that have a positive / N, N)`, `N` the
/// number of rows of the global batch with at least one positive. Without such rows (globally or on
/// this rank) the share is exactly 0 with no graph.
pub fn sscl_part2_share(rows: &Tensor, joint: &[i64], anchor: &[bool], tau: f64) -> (Tensor, usize) {
    let (kind, device) = (rows.kind(), rows.device());
    let r = joint.len();
    debug_assert_eq!(rows.size().first().copied(), Some(r as i64), "one joint index per row");
    debug_assert_eq!(anchor.len(), r, "one anchor flag per row");
    let mut per_joint: HashMap<i64, usize> = HashMap::new();
    for &j in joint {
        *per_joint.entry(j).or_default() += 1;
    }
    let positives = |u: usize| per_joint[&joint[u]] - 1;
    let global = (0..r).filter(|&u| positives(u) > 0).count();
    let mine: Vec<i64> = (0..r).filter(|&u| anchor[u] && positives(u) > 0).map(|u| u as i64).collect();
    if global == 0 || mine.is_empty() {
        return (Tensor::zeros([], (kind, device)), global);
    }
    let npos: Vec<f64> = mine.iter().map(|&u| positives(u as usize) as f64).collect();
    let mine_t = Tensor::from_slice(&mine).to_device(device);
    let joint_t = Tensor::from_slice(joint).to_device(device);
    let e = normalize(rows); // R x C
    let s = e.index_select(0, &mine_t).mm(&e.transpose(0, 1)) / tau; // A x R
    let cols = Tensor::arange(r as i64, (Kind::Int64, device)).unsqueeze(0);
    let is_self = cols.eq_tensor(&mine_t.unsqueeze(1)); // A x R
    let same_joint = joint_t.unsqueeze(0).eq_tensor(&joint_t.index_select(0, &mine_t).unsqueeze(1));
    let is_pos = same_joint.logical_and(&is_self.logical_not());
    // The denominator leaves u itself out: its entry is replaced by -inf (a selection: no gradient
    // reaches it), and every anchor has at least one other row, so the logsumexp is finite.
    let lse = s.masked_fill(&is_self, f64::NEG_INFINITY).logsumexp([1i64].as_slice(), true);
    let log_p = &s - lse; // finite everywhere
    let pos_sum =
        log_p.where_self(&is_pos, &Tensor::zeros([], (kind, device))).sum_dim_intlist([1i64].as_slice(), false, kind);
    let npos_t = Tensor::from_slice(&npos).to_kind(kind).to_device(device);
    let share = -(pos_sum / npos_t).sum(kind) / global as f64;
    (share, global)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::testing::{close, grads};
    use tch::Device;

    const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn bools(v: &[bool], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn part1_matches_a_hand_computed_case() {
        // One sample, J = 2, C = 2: feat_0 = (2, 0) -> (1, 0); g_0 = (1, 0), g_1 = (0, 1); joint 1 invisible.
        // tau = 1: logits of anchor 0 are (1, 0), target 0: loss = ln(1 + e) - 1.
        let feat = Tensor::from_slice(&[2.0, 0.0, 0.0, 5.0]).view([1, 2, 2]);
        let g = Tensor::from_slice(&[1.0, 0.0, 0.0, 1.0]).view([1, 2, 2]);
        let vis = bools(&[true, false], &[1, 2]);
        let got = sscl_part1_share(&feat, &g, &vis, 1.0, 1).double_value(&[]);
        close(got, (1.0 + std::f64::consts::E).ln() - 1.0, 1e-12);
    }

    #[test]
    fn part1_shares_add_up_and_invalid_rows_never_leak() {
        tch::manual_seed(21);
        let (n, j, c) = (4, 5, 3);
        #[rustfmt::skip]
        let vis_v = [
            true, false, true, true, false,
            false, false, false, false, false, // no visible joint: its skeleton is never read
            true, true, true, true, true,
            false, false, true, false, false,
        ];
        let vis = bools(&vis_v, &[n, j]);
        // Garbage where nothing may be read: features of invisible joints, the skeleton of sample 1.
        let feat = Tensor::randn([n, j, c], F64)
            .masked_fill(&vis.logical_not().unsqueeze(2), f64::NAN)
            .set_requires_grad(true);
        let g = Tensor::randn([n, j, c], F64);
        let _ = g.get(1).fill_(f64::NAN);
        let g = g.set_requires_grad(true);
        let global = vis_v.iter().filter(|&&v| v).count();
        let leaves = [feat.shallow_clone(), g.shallow_clone()];
        let whole = sscl_part1_share(&feat, &g, &vis, 0.07, global);
        let g_whole = grads(&whole, &leaves);
        assert!(whole.double_value(&[]).is_finite() && whole.double_value(&[]) > 0.0);
        for gr in &g_whole {
            assert_eq!(gr.isnan().any().int64_value(&[]), 0);
        }
        assert_eq!(g_whole[1].get(1).abs().sum(Kind::Double).double_value(&[]), 0.0);
        let mut sum = 0.0;
        let mut g_sum = [feat.zeros_like(), g.zeros_like()];
        for part in [vec![0i64, 1], vec![2, 3]] {
            let idx = Tensor::from_slice(&part);
            let share = sscl_part1_share(
                &feat.index_select(0, &idx),
                &g.index_select(0, &idx),
                &vis.index_select(0, &idx),
                0.07,
                global,
            );
            sum += share.double_value(&[]);
            for (acc, gr) in g_sum.iter_mut().zip(grads(&share, &leaves)) {
                *acc = &*acc + gr;
            }
        }
        close(sum, whole.double_value(&[]), 1e-12);
        for (a, b) in g_sum.iter().zip(&g_whole) {
            assert!((a - b).abs().max().double_value(&[]) < 1e-12);
        }
        // Every joint invisible: exactly 0, no graph, even over NaN features.
        let none = sscl_part1_share(&feat, &g, &vis.zeros_like(), 0.07, 0);
        assert_eq!(none.double_value(&[]), 0.0);
        assert!(!none.requires_grad());
        let idx = Tensor::from_slice(&[1i64]);
        let mine_none = sscl_part1_share(&feat.index_select(0, &idx), &g.index_select(0, &idx), &vis.get(1), 0.07, 9);
        assert_eq!(mine_none.double_value(&[]), 0.0);
    }

    #[test]
    fn part2_matches_a_hand_computed_case() {
        // Rows (tau = 1): e0 = (1, 0) joint 0, e1 = (3, 0) -> (1, 0) joint 0, e2 = (0, 1) joint 1,
        // e3 = (0.6, 0.8) joint 0. Row 2 has no positive. Rows 0 and 1: logits over the others
        // (1, 0, 0.6), positives at 1 and 0.6: loss = lse(1, 0, 0.6) - 0.8. Row 3: logits (0.6, 0.6,
        // 0.8), positives 0.6 and 0.6: loss = lse(0.6, 0.6, 0.8) - 0.6. Term: the mean over rows 0, 1, 3.
        let rows = Tensor::from_slice(&[1.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.6, 0.8]).view([4, 2]);
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let expected = (2.0 * (lse(&[1.0, 0.0, 0.6]) - 0.8) + lse(&[0.6, 0.6, 0.8]) - 0.6) / 3.0;
        let (share, count) = sscl_part2_share(&rows, &[0, 0, 1, 0], &[true; 4], 1.0);
        assert_eq!(count, 3);
        close(share.double_value(&[]), expected, 1e-12);
    }

    #[test]
    fn part2_shares_over_any_split_add_up() {
        tch::manual_seed(22);
        let joint: Vec<i64> = vec![0, 1, 2, 0, 1, 3, 0, 2, 4, 1, 0];
        let r = joint.len();
        let rows = Tensor::randn([r as i64, 5], F64).set_requires_grad(true);
        let leaves = [rows.shallow_clone()];
        let (whole, count) = sscl_part2_share(&rows, &joint, &vec![true; r], 0.07);
        assert_eq!(count, 9); // joints 3 and 4 appear once
        let g_whole = grads(&whole, &leaves);
        for split in [vec![0..4, 4..11], vec![0..1, 1..6, 6..11], vec![0..0, 0..11]] {
            let mut sum = 0.0;
            let mut g_sum = rows.zeros_like();
            for part in split {
                let anchor: Vec<bool> = (0..r).map(|u| part.contains(&u)).collect();
                let (share, c) = sscl_part2_share(&rows, &joint, &anchor, 0.07);
                assert_eq!(c, count);
                sum += share.double_value(&[]);
                g_sum += &grads(&share, &leaves)[0];
            }
            close(sum, whole.double_value(&[]), 1e-12);
            assert!((&g_sum - &g_whole[0]).abs().max().double_value(&[]) < 1e-12);
        }
        // No row has a positive: exactly 0, no graph.
        let (none, c) = sscl_part2_share(&rows.narrow(0, 0, 3), &[0, 1, 2], &[true; 3], 0.07);
        assert_eq!((none.double_value(&[]), c), (0.0, 0));
        assert!(!none.requires_grad());
        let (empty, c) = sscl_part2_share(&Tensor::zeros([0, 5], F64), &[], &[], 0.07);
        assert_eq!((empty.double_value(&[]), c), (0.0, 0));
    }
}
