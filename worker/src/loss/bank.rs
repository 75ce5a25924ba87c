//! The memory-bank variant of the sample-level terms (method page, Losses 1, "Memory-bank variant").
//!
//! One N x D bank per modality (N = dataset size), indexed by sample id. An anchor `z_a` of sample `y`
//! scores its own bank row `M_b[y]` against K negatives drawn from the rows of samples that have
//! modality b (never `y`); after the loss, banks move towards the new features. Banks are plain tensors,
//! not parameters: no gradient reaches them, and every rank applies the same updates in the same order,
//! so banks stay bit-identical across ranks.

use hcmoco_data::augment::mix;
use tch::{Device, Kind, Tensor};

use super::stream::Stream;
use super::{Modality, normalize};

/// Salt of the negative draws ("bankbank" in ASCII).
const NEGATIVES_SALT: u64 = 0x6261_6e6b_6261_6e6b;
/// Salt of the initial banks ("bankinit").
const INIT_SALT: u64 = 0x6261_6e6b_696e_6974;

/// The three banks, in [`Modality`] order.
#[derive(Debug)]
pub struct MemoryBank {
    /// N x D per modality: Rgb, Depth, Keypoints. Unit rows.
    pub banks: [Tensor; 3],
}

impl MemoryBank {
    /// Banks of `n` rows of `d` values: standard normal values (Box-Muller on splitmix64 seeded by
    /// `mix(seed ^ mix(INIT_SALT + m))` for modality `m`, row-major), each row normalised in f64, then
    /// converted to `kind` on `device`. The same arguments always give the same banks.
    pub fn new(n: i64, d: i64, seed: u64, kind: Kind, device: Device) -> MemoryBank {
        let banks = std::array::from_fn(|m| {
            let mut s = Stream::new(mix(seed ^ mix(INIT_SALT.wrapping_add(m as u64))));
            let len = (n.max(0) * d.max(0)) as usize;
            let mut values = Vec::with_capacity(len + 1);
            while values.len() < len {
                let (a, b) = s.normal_pair();
                values.push(a);
                values.push(b);
            }
            values.truncate(len);
            if d > 0 {
                for row in values.chunks_mut(d as usize) {
                    let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|x| *x /= norm);
                }
            }
            Tensor::from_slice(&values).view([n.max(0), d.max(0)]).to_kind(kind).to_device(device)
        });
        MemoryBank { banks }
    }

    /// K negatives of one anchor: sample ids drawn uniformly with replacement from `eligible` (the ids of
    /// the samples that have the candidate modality, sorted ascending) without `exclude` (the anchor's
    /// own sample). The
    /// draw: the list of `eligible` minus every occurrence of `exclude`, in the given order, `E` long;
    /// draw `i` takes index `(x_i * E) >> 64` with `x_i` the i-th output of splitmix64 started at
    /// `mix(seed ^ mix(epoch ^ mix(slot ^ NEGATIVES_SALT)))` (`NEGATIVES_SALT = 0x62616e6b62616e6b`),
    /// so it depends on `(seed, epoch, slot)` only: two terms drawn with the same seed share their
    /// negatives (the trainer mixes the term's index into `seed`, so each term draws its own). Nothing to draw from (E = 0) gives an empty vector: that
    /// happens only when `y` is the only sample with the candidate modality, so every anchor of the
    /// term is in the same case and the term's logits are the positive alone.
    pub fn negatives(seed: u64, epoch: u64, slot: u64, eligible: &[i64], exclude: i64, k: usize) -> Vec<i64> {
        let mut s = Stream::new(mix(seed ^ mix(epoch ^ mix(slot ^ NEGATIVES_SALT))));
        // `eligible` is sorted (the trainer's lists are checked once, in `Banks::new`): the occurrences
        // of `exclude` are one run, found by binary search (this runs per anchor and per term, over
        // lists as long as the dataset).
        let at = eligible.partition_point(|&e| e < exclude);
        let excluded = eligible[at..].partition_point(|&e| e == exclude);
        match excluded {
            0 => {
                if eligible.is_empty() {
                    return Vec::new();
                }
                (0..k).map(|_| eligible[s.below(eligible.len() as u64) as usize]).collect()
            }
            1 => {
                // Skip over `exclude` without copying the list (it may be the whole dataset).
                let len = eligible.len() - 1;
                if len == 0 {
                    return Vec::new();
                }
                (0..k)
                    .map(|_| {
                        let i = s.below(len as u64) as usize;
                        eligible[if i >= at { i + 1 } else { i }]
                    })
                    .collect()
            }
            _ => {
                let rest: Vec<i64> = eligible.iter().copied().filter(|&e| e != exclude).collect();
                if rest.is_empty() {
                    return Vec::new();
                }
                (0..k).map(|_| rest[s.below(rest.len() as u64) as usize]).collect()
            }
        }
    }

    /// This rank's share of the term `a_b` (anchor modality `a`, bank of modality `b`).
    ///
    /// `z_a_local`: n x D features of modality `a` (before normalisation) of this rank's valid anchors
    /// (samples that have both `a` and `b`), `ids[i]`: the sample id of row `i`, `negatives`: n x K int64
    /// sample ids (from [`MemoryBank::negatives`]). Logits `[z . M_b[y], z . M_b[n_1] .. z . M_b[n_K]] /
    /// tau` with z normalised, target 0; returns the sum of the cross-entropies over the n rows divided
    /// by `global_anchors` (valid anchors in the global batch). The bank is read in `z`'s kind and
    /// carries no gradient. Without anchors the share is exactly 0 with no graph.
    // The argument list is the training step's call contract (one term of one rank, in the order of the
    // method page's formula); a struct would only rename it.
    #[allow(clippy::too_many_arguments)]
    pub fn share(
        &self,
        a: Modality,
        b: Modality,
        z_a_local: &Tensor,
        ids: &[i64],
        negatives: &Tensor,
        tau: f64,
        global_anchors: usize,
    ) -> Tensor {
        debug_assert_ne!(a, b, "a term pairs two different modalities");
        let (kind, device) = (z_a_local.kind(), z_a_local.device());
        let n = ids.len() as i64;
        if global_anchors == 0 || n == 0 {
            return Tensor::zeros([], (kind, device));
        }
        debug_assert_eq!(z_a_local.size()[0], n, "one sample id per feature row");
        let bank = self.banks[b as usize].detach().to_kind(kind).to_device(device);
        let rows = bank.size()[0];
        let ids_t = Tensor::from_slice(ids).to_device(device).unsqueeze(1);
        let candidates = Tensor::cat(&[ids_t, negatives.to_device(device).view([n, -1])], 1); // n x (K+1)
        let k1 = candidates.size()[1];
        let z = normalize(z_a_local);
        // Either every bank row's score, then the candidates' (cheaper when the bank is small), or the
        // candidates' rows only (an n x (K+1) x D copy, cheaper when n (K+1) < N).
        let logits = if rows <= n * k1 {
            z.mm(&bank.transpose(0, 1)).gather(1, &candidates, false)
        } else {
            bank.index_select(0, &candidates.reshape([-1])).view([n, k1, -1]).bmm(&z.unsqueeze(2)).squeeze_dim(2)
        } / tau;
        -logits.log_softmax(1, kind).select(1, 0).sum(kind) / global_anchors as f64
    }

    /// Moves the bank of modality `m` towards new features, row by row in the given order:
    /// `M[y] <- normalize(0.5 M[y] + 0.5 normalize(z_i))` for `y = ids[i]`, computed in the bank's kind
    /// without autograd. A repeated id sees its earlier update. `z`: features (before normalisation) of
    /// the global batch's samples that HAVE modality `m` (rows of samples lacking it must not be passed:
    /// they are never written), in global slot order, the same on every rank.
    pub fn update(&mut self, m: Modality, ids: &[i64], z: &Tensor) {
        let bank = &mut self.banks[m as usize];
        let (kind, device) = (bank.kind(), bank.device());
        debug_assert_eq!(z.size().first().copied(), Some(ids.len() as i64), "one sample id per feature row");
        tch::no_grad(|| {
            let z = normalize(&z.detach().to_kind(kind).to_device(device));
            // Waves: wave w holds the w-th occurrence of every id, so the ids of a wave are distinct and
            // one gather-compute-scatter per wave equals the row-by-row order.
            let mut seen = std::collections::HashMap::<i64, usize>::new();
            let mut waves: Vec<(Vec<i64>, Vec<i64>)> = Vec::new(); // (bank rows, rows of z)
            for (i, &y) in ids.iter().enumerate() {
                let w = seen.entry(y).or_default();
                if waves.len() <= *w {
                    waves.push((Vec::new(), Vec::new()));
                }
                waves[*w].0.push(y);
                waves[*w].1.push(i as i64);
                *w += 1;
            }
            for (rows, from) in waves {
                let rows = Tensor::from_slice(&rows).to_device(device);
                let from = Tensor::from_slice(&from).to_device(device);
                let mixed = bank.index_select(0, &rows) * 0.5 + z.index_select(0, &from) * 0.5;
                let _ = bank.index_copy_(0, &rows, &normalize(&mixed));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::testing::{close, grads};
    use Modality::{Depth, Keypoints, Rgb};

    const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn new_banks_are_deterministic_unit_rows() {
        let a = MemoryBank::new(6, 4, 3, Kind::Double, Device::Cpu);
        let b = MemoryBank::new(6, 4, 3, Kind::Double, Device::Cpu);
        let c = MemoryBank::new(6, 4, 4, Kind::Double, Device::Cpu);
        for m in 0..3 {
            assert_eq!(a.banks[m].size(), [6, 4]);
            assert!(a.banks[m].equal(&b.banks[m]));
            assert!(!a.banks[m].equal(&c.banks[m]));
            let norms = a.banks[m].norm_scalaropt_dim(2, [1i64].as_slice(), false);
            assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-12);
        }
        assert!(!a.banks[0].equal(&a.banks[1]), "modalities get different banks");
    }

    #[test]
    fn negatives_are_deterministic_eligible_and_never_the_anchor() {
        let eligible = [0i64, 2, 3, 5, 8];
        let n = MemoryBank::negatives(1, 2, 3, &eligible, 3, 500);
        assert_eq!(n.len(), 500);
        assert_eq!(n, MemoryBank::negatives(1, 2, 3, &eligible, 3, 500));
        assert_ne!(n, MemoryBank::negatives(1, 2, 4, &eligible, 3, 500));
        assert!(n.iter().all(|x| *x != 3 && eligible.contains(x)));
        for e in [0, 2, 5, 8] {
            assert!(n.contains(&e), "{e} never drawn in 500 draws");
        }
        // An anchor outside the eligible list excludes nothing; a lone eligible anchor leaves nothing.
        let all = MemoryBank::negatives(1, 2, 3, &eligible, 4, 500);
        assert!(all.contains(&3));
        assert!(MemoryBank::negatives(1, 2, 3, &[7], 7, 10).is_empty());
        assert!(MemoryBank::negatives(1, 2, 3, &[], 7, 10).is_empty());
        let dup = MemoryBank::negatives(1, 2, 3, &[1, 7, 7], 7, 10);
        assert_eq!(dup, vec![1; 10]);
    }

    /// A bank whose depth bank holds chosen rows.
    fn bank_with_depth_rows(rows: &[f64], d: i64) -> MemoryBank {
        let mut bank = MemoryBank::new(rows.len() as i64 / d, d, 0, Kind::Double, Device::Cpu);
        bank.banks[Depth as usize] = Tensor::from_slice(rows).view([-1, d]);
        bank
    }

    #[test]
    fn share_matches_a_hand_computed_case_on_both_paths() {
        // Depth bank rows (1, 0), (0, 1), (-1, 0); anchor z = (2, 0) of sample 0, negatives [1, 2],
        // tau = 1: logits (1, 0, -1), target 0: loss = ln(e + 1 + 1/e) - 1.
        let e = std::f64::consts::E;
        let expected = (e + 1.0 + 1.0 / e).ln() - 1.0;
        let z = Tensor::from_slice(&[2.0, 0.0]).view([1, 2]);
        let negs = Tensor::from_slice(&[1i64, 2]).view([1, 2]);
        let small = bank_with_depth_rows(&[1.0, 0.0, 0.0, 1.0, -1.0, 0.0], 2);
        close(small.share(Rgb, Depth, &z, &[0], &negs, 1.0, 1).double_value(&[]), expected, 1e-12);
        // Five more rows make N > n (K + 1): the candidate-rows path.
        let mut rows = vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        rows.extend([0.6, 0.8].repeat(5));
        let big = bank_with_depth_rows(&rows, 2);
        close(big.share(Rgb, Depth, &z, &[0], &negs, 1.0, 1).double_value(&[]), expected, 1e-12);
    }

    #[test]
    fn shares_add_up_and_no_anchor_is_exactly_zero() {
        tch::manual_seed(31);
        let bank = MemoryBank::new(9, 5, 7, Kind::Double, Device::Cpu);
        let z = Tensor::randn([6, 5], F64).set_requires_grad(true);
        let ids = [4i64, 0, 8, 4, 2, 7];
        let negs: Vec<i64> =
            (0..6u64).flat_map(|i| MemoryBank::negatives(7, 0, i, &[0, 1, 2, 4, 7, 8], ids[i as usize], 4)).collect();
        let negs = Tensor::from_slice(&negs).view([6, 4]);
        let leaves = [z.shallow_clone()];
        let whole = bank.share(Keypoints, Rgb, &z, &ids, &negs, 0.07, 6);
        let g_whole = grads(&whole, &leaves);
        let mut sum = 0.0;
        let mut g_sum = z.zeros_like();
        for (lo, hi) in [(0, 2), (2, 6)] {
            let share = bank.share(
                Keypoints,
                Rgb,
                &z.narrow(0, lo, hi - lo),
                &ids[lo as usize..hi as usize],
                &negs.narrow(0, lo, hi - lo),
                0.07,
                6,
            );
            sum += share.double_value(&[]);
            g_sum += &grads(&share, &leaves)[0];
        }
        close(sum, whole.double_value(&[]), 1e-12);
        assert!((&g_sum - &g_whole[0]).abs().max().double_value(&[]) < 1e-12);
        let none = bank.share(Keypoints, Rgb, &z.narrow(0, 0, 0), &[], &negs.narrow(0, 0, 0), 0.07, 6);
        assert_eq!(none.double_value(&[]), 0.0);
        assert!(!none.requires_grad());
    }

    #[test]
    fn update_applies_rows_in_order_without_autograd() {
        let mut bank = bank_with_depth_rows(&[1.0, 0.0, 0.0, 1.0], 2);
        let z = Tensor::from_slice(&[0.0, 3.0, 5.0, 0.0, 0.0, -2.0]).view([3, 2]).set_requires_grad(true);
        bank.update(Depth, &[0, 1, 0], &z);
        // Row 0: (1, 0) -> normalize((0.5, 0.5)) = (s, s), then -> normalize(0.5 (s, s) + 0.5 (0, -1)).
        // Row 1: (0, 1) -> normalize(0.5 (0, 1) + 0.5 (1, 0)) = (s, s).
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let (x, y) = (0.5 * s, 0.5 * s - 0.5);
        let norm = (x * x + y * y).sqrt();
        let want = Tensor::from_slice(&[x / norm, y / norm, s, s]).view([2, 2]);
        let got = &bank.banks[Depth as usize];
        assert!((got - want).abs().max().double_value(&[]) < 1e-15);
        assert!(!got.requires_grad());
        // The other banks are untouched.
        let fresh = bank_with_depth_rows(&[1.0, 0.0, 0.0, 1.0], 2);
        assert!(bank.banks[Rgb as usize].equal(&fresh.banks[Rgb as usize]));
    }
}
