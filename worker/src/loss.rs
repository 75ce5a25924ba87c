//! The objective of the method page, every term computed as one rank's share of the global-batch loss.
//!
//! A term's value is the mean over its valid anchors in the global batch; a rank computes
//! `(sum over its own anchors) / (global anchor count)`, so the shares of all ranks add up to the
//! global loss, and the gradient of a share with respect to every input row is exactly that rank's part
//! of the single-process gradient (the "Cross-rank negatives" rule). Invalid rows (a missing modality,
//! an invisible joint, a cell that was not drawn) are selected out before anything is computed on them,
//! never multiplied by zero, so nothing they hold can produce a NaN. A term without anchors is exactly 0
//! and carries no graph (its gradient is zero).
//!
//! Layout:
//! - this file: [`Modality`], [`TERMS`], [`normalize`] and the six sample-level terms in the in-batch
//!   variant ([`sample_level_share`]: inputs are the GLOBAL batch's embeddings, all ranks' rows,
//!   all-gathered in slot order, and the per-row modality masks);
//! - [`bank`]: the memory-bank variant of the sample-level terms ([`MemoryBank`]);
//! - [`dense`]: the dense intra-sample term (DICL), the cell and joint-cell rules and the seeded draw of
//!   the DICL cells;
//! - [`sscl`]: the sparse structure-aware terms, SSCL part 1 (image joint <-> skeleton joint) and part 2
//!   (cross-sample, over the global batch).

use std::ops::Range;

use tch::{Kind, Tensor};

pub mod bank;
pub mod dense;
pub mod sscl;
mod stream;

pub use bank::MemoryBank;
pub use dense::{cell_features, dicl_seed, dicl_share, draw_cells, joint_cell, nearest_mask};
pub use sscl::{sscl_part1_share, sscl_part2_share};

/// Modalities, in the order of the gathered embedding blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Rgb = 0,
    Depth = 1,
    Keypoints = 2,
}

use Modality::{Depth, Keypoints, Rgb};

/// The six ordered pairs (anchor first) and their names.
pub const TERMS: [(&str, Modality, Modality); 6] = [
    ("rgb_depth", Rgb, Depth),
    ("depth_rgb", Depth, Rgb),
    ("depth_kp", Depth, Keypoints),
    ("kp_depth", Keypoints, Depth),
    ("rgb_kp", Rgb, Keypoints),
    ("kp_rgb", Keypoints, Rgb),
];

/// L2 normalisation along the last dimension (the rows of a matrix), as
/// `torch.nn.functional.normalize(x, dim=-1)` (eps 1e-12).
pub fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12)
}

/// This rank's share of the six terms.
#[derive(Debug)]
pub struct Share {
    /// Sum of the six shares: a scalar whose graph reaches the gathered embeddings.
    pub total: Tensor,
    /// Each term's share, in [`TERMS`] order: a detached 6-vector on the embeddings' device (reading
    /// it waits for the device: the trainer sums it over ranks first and reads it once).
    pub values: Tensor,
    /// Global valid-anchor count of each term.
    pub anchors: [usize; 6],
}

impl Share {
    /// The six shares as numbers.
    pub fn terms(&self) -> [f64; 6] {
        let v =
            Vec::<f64>::try_from(&self.values.to_kind(Kind::Double).to_device(tch::Device::Cpu)).unwrap_or_default();
        std::array::from_fn(|i| v.get(i).copied().unwrap_or(f64::NAN))
    }
}

/// Computes this rank's share of the sample-level objective.
///
/// `z[m]`: G x D embeddings of modality `m` for the whole global batch (rows of samples lacking `m`
/// are ignored, whatever they hold). `has[m][i]`: sample `i` has modality `m`. `local`: this rank's
/// rows. `tau`: temperature.
pub fn sample_level_share(z: &[Tensor; 3], has: &[Vec<bool>; 3], local: Range<usize>, tau: f64) -> Share {
    let kind = z[0].kind();
    let device = z[0].device();
    let mut total = Tensor::zeros([], (kind, device));
    let mut values: Vec<Tensor> = (0..6).map(|_| Tensor::zeros([], (kind, device))).collect();
    let mut anchors = [0usize; 6];
    for (t, &(_, a, b)) in TERMS.iter().enumerate() {
        let (ha, hb) = (&has[a as usize], &has[b as usize]);
        let global_anchors = ha.iter().zip(hb).filter(|(x, y)| **x && **y).count();
        anchors[t] = global_anchors;
        if global_anchors == 0 {
            continue; // exactly zero, no gradient
        }
        let mut cand_pos = vec![-1i64; hb.len()];
        let mut cands = Vec::new();
        for (i, &h) in hb.iter().enumerate() {
            if h {
                cand_pos[i] = cands.len() as i64;
                cands.push(i as i64);
            }
        }
        let mine: Vec<i64> = local.clone().filter(|&i| ha[i] && hb[i]).map(|i| i as i64).collect();
        if mine.is_empty() {
            continue;
        }
        let targets: Vec<i64> = mine.iter().map(|&i| cand_pos[i as usize]).collect();
        let za = normalize(&z[a as usize].index_select(0, &Tensor::from_slice(&mine).to_device(device)));
        let zb = normalize(&z[b as usize].index_select(0, &Tensor::from_slice(&cands).to_device(device)));
        let logits = za.mm(&zb.transpose(0, 1)) / tau;
        let target = Tensor::from_slice(&targets).to_device(device).unsqueeze(1);
        let ce_sum = -logits.log_softmax(1, None::<Kind>).gather(1, &target, false).sum(None::<Kind>);
        let share = ce_sum / global_anchors as f64;
        values[t] = share.detach();
        total += share;
    }
    Share { total, values: Tensor::stack(&values, 0), anchors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn leaves(g: i64, d: i64, seed: i64) -> [Tensor; 3] {
        tch::manual_seed(seed);
        std::array::from_fn(|_| Tensor::randn([g, d], (Kind::Double, Device::Cpu)).set_requires_grad(true))
    }

    fn grads(total: &Tensor, z: &[Tensor; 3]) -> Vec<Tensor> {
        if !total.requires_grad() {
            return z.iter().map(Tensor::zeros_like).collect();
        }
        Tensor::run_backward(&[total], z, false, false)
            .into_iter()
            .zip(z)
            .map(|(g, zi)| if g.defined() { g } else { zi.zeros_like() })
            .collect()
    }

    fn masks() -> [Vec<bool>; 3] {
        // 7 samples: depth missing on some, keypoints missing on one.
        [
            vec![true; 7],
            vec![true, false, true, true, false, false, true],
            vec![true, true, true, false, true, true, true],
        ]
    }

    #[test]
    fn shares_over_ranks_add_up_to_the_single_process_loss_and_gradient() {
        let has = masks();
        let z = leaves(7, 5, 1);
        let whole = sample_level_share(&z, &has, 0..7, 0.07);
        let g_whole = grads(&whole.total, &z);
        for split in [vec![0..3, 3..7], vec![0..1, 1..2, 2..7], vec![0..0, 0..7]] {
            let mut sum_loss = 0.0;
            let mut sum_grads: Vec<Tensor> = z.iter().map(Tensor::zeros_like).collect();
            for part in split {
                let s = sample_level_share(&z, &has, part, 0.07);
                sum_loss += s.total.double_value(&[]);
                for (acc, g) in sum_grads.iter_mut().zip(grads(&s.total, &z)) {
                    *acc = &*acc + g;
                }
            }
            assert!((sum_loss - whole.total.double_value(&[])).abs() < 1e-12);
            for (a, b) in sum_grads.iter().zip(&g_whole) {
                assert!((a - b).abs().max().double_value(&[]) < 1e-12);
            }
        }
    }

    #[test]
    fn matches_a_direct_cross_entropy_when_every_modality_is_present() {
        let has = [vec![true; 4], vec![true; 4], vec![true; 4]];
        let z = leaves(4, 3, 2);
        let s = sample_level_share(&z, &has, 0..4, 0.5);
        let logits = normalize(&z[0]).mm(&normalize(&z[1]).transpose(0, 1)) / 0.5;
        // CE with target i for row i, in f64: mean of (logsumexp of the row - the diagonal logit).
        let expected = (logits.logsumexp([1i64].as_slice(), false) - logits.diagonal(0, 0, 1))
            .mean(None::<Kind>)
            .double_value(&[]);
        assert!((s.terms()[0] - expected).abs() < 1e-12, "{} vs {expected}", s.terms()[0]);
        assert_eq!(s.anchors, [4; 6]);
    }

    #[test]
    fn matches_a_hand_computed_case_with_a_missing_candidate() {
        // RGB (1, 0), (0, 2), (5, 5); depth (3, 0), (0, 1) and none for the third sample (NaN: never
        // read). tau = 1. rgb_depth: anchors 0 and 1, candidates the two depth rows: logits (1, 0), own
        // sample first: ln(1 + e) - 1. depth_rgb: anchors 0 and 1, candidates all three RGB rows
        // (the third has RGB): logits (1, 0, 1/sqrt 2) up to order: ln(e + 1 + e^(1/sqrt 2)) - 1.
        let rgb = Tensor::from_slice(&[1.0, 0.0, 0.0, 2.0, 5.0, 5.0]).view([3, 2]);
        let depth = Tensor::from_slice(&[3.0, 0.0, 0.0, 1.0, f64::NAN, f64::NAN]).view([3, 2]);
        let kp = Tensor::from_slice(&[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]).view([3, 2]);
        let has = [vec![true; 3], vec![true, true, false], vec![true; 3]];
        let s = sample_level_share(&[rgb, depth, kp], &has, 0..3, 1.0);
        let e = std::f64::consts::E;
        let want = [(1.0 + e).ln() - 1.0, (e + 1.0 + std::f64::consts::FRAC_1_SQRT_2.exp()).ln() - 1.0];
        for (t, (got, want)) in s.terms().iter().zip(want).enumerate() {
            assert!((got - want).abs() < 1e-12, "term {t}: {got} vs {want}");
        }
        assert_eq!(s.anchors, [2, 2, 2, 2, 3, 3]);
        assert!(s.total.double_value(&[]).is_finite());
    }

    #[test]
    fn a_term_without_anchors_is_exactly_zero_without_nan() {
        let has = [vec![true; 3], vec![false; 3], vec![true; 3]];
        let mut z = leaves(3, 4, 3);
        // Rows of missing depth hold zeros: selected out, so no NaN can leak from normalising them.
        z[1] = Tensor::zeros([3, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let s = sample_level_share(&z, &has, 0..3, 0.07);
        let terms = s.terms();
        assert_eq!(&terms[..4], &[0.0; 4]);
        assert!(terms[4] > 0.0 && terms[5] > 0.0);
        let g = grads(&s.total, &z);
        assert_eq!(g[1].abs().sum(None::<Kind>).double_value(&[]), 0.0);
        for gi in &g {
            assert!(gi.isnan().any().int64_value(&[]) == 0);
        }
    }
}

/// Helpers shared by the loss modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use tch::Tensor;

    /// Gradients of `total` with respect to each leaf (zeros where it does not reach a leaf or carries
    /// no graph at all).
    pub(crate) fn grads(total: &Tensor, leaves: &[Tensor]) -> Vec<Tensor> {
        if !total.requires_grad() {
            return leaves.iter().map(Tensor::zeros_like).collect();
        }
        Tensor::run_backward(&[total], leaves, true, false)
            .into_iter()
            .zip(leaves)
            .map(|(g, l)| if g.defined() { g } else { l.zeros_like() })
            .collect()
    }

    /// Asserts `|got - want| <= tol`.
    pub(crate) fn close(got: f64, want: f64, tol: f64) {
        assert!((got - want).abs() <= tol, "got {got}, expected {want} (tolerance {tol})");
    }
}
