//! The data plan: which sample every rank trains at every step.
//!
//! An epoch is a seeded, deterministic sequence of slots: slot `i` of epoch `e` holds one sample of one
//! of the job's datasets. Step `s` of an epoch trains the global batch of slots `[s*G, min((s+1)*G, N))`,
//! and rank `r` of `W` takes the fixed contiguous slice `[floor(r*b/W), floor((r+1)*b/W))` of that batch
//! (`b` its size). So the global batch of a step depends only on the seed, never on the world size,
//! and every slot of an epoch is trained exactly once. The last step of an epoch may be smaller.
//!
//! Mixing: an epoch has `N` = total samples slots. Without weights, dataset `d` gets `n_d` slots (every
//! sample once). With weights, it gets `c_d` = its weighted share of `N` (largest remainder, so the
//! counts are exact, not just expected); a dataset with more slots than samples repeats its samples as
//! evenly as possible (each `floor` or `ceil` of `c_d / n_d` times), one with fewer is subsampled without
//! repeats. Which slot gets which dataset, and which sample, is a keyed permutation per epoch.
//!
//! The permutations are keyed Feistel networks with cycle walking: O(1) time and no memory per lookup,
//! so planning a step costs the same for a thousand samples or a billion.

use std::ops::Range;

use hcmoco_data::augment::mix;

/// A sample of the job: dataset index in the job's list, sample index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    pub dataset: u32,
    pub index: u64,
}

/// Where a global step falls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// The step's global batch: slots of `epoch`.
    pub slots: Range<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlan {
    seed: u64,
    global_batch: u64,
    /// Sample counts of the job's datasets, in job order.
    sizes: Vec<u64>,
    /// Slots per epoch of each dataset (sum = `total`).
    counts: Vec<u64>,
    total: u64,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the job's datasets hold no samples")]
    Empty,
    #[error("global batch must be at least 1")]
    ZeroBatch,
    #[error("dataset {0} has a mixing weight but no samples")]
    WeightedEmpty(usize),
    #[error("{weights} weights for {datasets} datasets")]
    WeightCount { weights: usize, datasets: usize },
    #[error("dataset {0}: weight must be a positive number")]
    BadWeight(usize),
}

/// Splits `total` slots by `weights` exactly (largest remainder; ties to the lower index).
pub fn weighted_counts(total: u64, weights: &[f64]) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut counts: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut left = total.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    for &d in order.iter().cycle().take(weights.len() * 2) {
        if left == 0 {
            break;
        }
        counts[d] += 1;
        left -= 1;
    }
    counts
}

impl DataPlan {
    /// A plan over datasets of `sizes` samples; `weights` (one per dataset) mix them by share.
    pub fn new(seed: u64, global_batch: u64, sizes: Vec<u64>, weights: Option<&[f64]>) -> Result<DataPlan, PlanError> {
        let total: u64 = sizes.iter().sum();
        if total == 0 {
            return Err(PlanError::Empty);
        }
        if global_batch == 0 {
            return Err(PlanError::ZeroBatch);
        }
        let counts = match weights {
            None => sizes.clone(),
            Some(w) => {
                if w.len() != sizes.len() {
                    return Err(PlanError::WeightCount { weights: w.len(), datasets: sizes.len() });
                }
                if let Some(d) = w.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
                    return Err(PlanError::BadWeight(d));
                }
                if let Some(d) = sizes.iter().position(|&n| n == 0) {
                    return Err(PlanError::WeightedEmpty(d));
                }
                weighted_counts(total, w)
            }
        };
        Ok(DataPlan { seed, global_batch, sizes, counts, total })
    }

    /// Sample counts of the job's datasets (the plan's input).
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Slots per epoch of each dataset.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Slots per epoch (every sample once).
    pub fn epoch_len(&self) -> u64 {
        self.total
    }

    /// Slots of one epoch (every dataset's share).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.total.div_ceil(self.global_batch)
    }

    /// Epochs touched by a job of `steps` steps (the learning-rate schedule's horizon).
    pub fn epochs_for(&self, steps: u64) -> u64 {
        steps.div_ceil(self.steps_per_epoch()).max(1)
    }

    pub fn step(&self, step: u64) -> StepPlan {
        let spe = self.steps_per_epoch();
        let (epoch, step_in_epoch) = (step / spe, step % spe);
        let begin = step_in_epoch * self.global_batch;
        let end = (begin + self.global_batch).min(self.total);
        StepPlan { step, epoch, step_in_epoch, slots: begin..end }
    }

    /// Rank `rank`'s fixed slice of a global batch, for a world of `world` ranks.
    pub fn rank_slice(batch: &Range<u64>, rank: u32, world: u32) -> Range<u64> {
        let b = batch.end - batch.start;
        let (r, w) = (u64::from(rank), u64::from(world.max(1)));
        batch.start + r * b / w..batch.start + (r + 1) * b / w
    }

    /// The sample in `slot` of `epoch`.
    pub fn sample_at(&self, epoch: u64, slot: u64) -> SampleRef {
        // Which dataset's j-th slot this is: a permutation of the datasets' slot ranges laid end to end.
        let mut j = permute(slot, self.total, self.seed, epoch);
        let mut d = 0;
        while j >= self.counts[d] {
            j -= self.counts[d];
            d += 1;
        }
        // The j-th slot of dataset d: pass k = j / n over the dataset, position j % n of that pass's
        // permutation. Without weights there is one pass.
        let n = self.sizes[d];
        let (pass, r) = (j / n, j % n);
        let key = self.seed ^ mix(0x0da7_a5e7 + d as u64);
        SampleRef { dataset: d as u32, index: permute(r, n, key, mix(epoch) ^ pass) }
    }
}

/// A bijection of `[0, n)` keyed by `(seed, epoch)`: a balanced Feistel network over the smallest
/// power-of-four domain holding `n`, walking the cycle until the value lands inside `[0, n)`.
fn permute(x: u64, n: u64, seed: u64, epoch: u64) -> u64 {
    debug_assert!(x < n);
    if n <= 1 {
        return x;
    }
    let bits = 64 - (n - 1).leading_zeros();
    let half = bits.div_ceil(2).max(1);
    let mask = (1u64 << half) - 1;
    let key = mix(seed ^ mix(epoch.wrapping_add(0x5151)));
    let mut v = x;
    loop {
        let (mut l, mut r) = (v >> half, v & mask);
        for round in 0..4u64 {
            let f = mix(key ^ mix(r ^ (round << 56))) & mask;
            (l, r) = (r, l ^ f);
        }
        v = (l << half) | r;
        if v < n {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn permutation_is_a_bijection_and_depends_on_seed_and_epoch() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000] {
            let p: BTreeSet<u64> = (0..n).map(|i| permute(i, n, 9, 2)).collect();
            assert_eq!(p.len() as u64, n);
            assert!(p.iter().all(|&v| v < n));
        }
        let a: Vec<u64> = (0..100).map(|i| permute(i, 100, 1, 0)).collect();
        let b: Vec<u64> = (0..100).map(|i| permute(i, 100, 1, 1)).collect();
        let c: Vec<u64> = (0..100).map(|i| permute(i, 100, 2, 0)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn a_fifty_fifty_mix_of_unequal_datasets() {
        // The reference's mix: RGB-D and RGB-only samples in equal expected shares, whatever the sizes.
        let plan = DataPlan::new(3, 8, vec![100, 300], Some(&[1.0, 1.0])).expect("plan");
        assert_eq!(plan.counts(), &[200, 200]);
        let from_small = (0..400).filter(|&s| plan.sample_at(0, s).dataset == 0).count();
        assert_eq!(from_small, 200);
        assert_eq!(weighted_counts(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert!(matches!(DataPlan::new(0, 4, vec![0, 5], Some(&[1.0, 1.0])), Err(PlanError::WeightedEmpty(0))));
    }

    #[test]
    fn last_step_of_an_epoch_may_be_smaller() {
        let plan = DataPlan::new(0, 4, vec![10], None).expect("plan");
        assert_eq!(plan.steps_per_epoch(), 3);
        assert_eq!(plan.step(2).slots, 8..10);
        assert_eq!(plan.step(3), StepPlan { step: 3, epoch: 1, step_in_epoch: 0, slots: 0..4 });
        assert_eq!(plan.epochs_for(7), 3);
    }

    proptest! {
        /// For 1..8 workers and random dataset sizes: every slot of an epoch is assigned to exactly one
        /// (step, rank), every sample is trained exactly once, and a step's global batch is the same
        /// whatever the world size.
        #[test]
        fn every_slot_once_and_batches_independent_of_world(
            sizes in prop::collection::vec(0u64..60, 1..4),
            batch in 1u64..17,
            seed in any::<u64>(),
            epoch in 0u64..3,
        ) {
            prop_assume!(sizes.iter().sum::<u64>() > 0);
            let plan = DataPlan::new(seed, batch, sizes.clone(), None).expect("plan");
            let spe = plan.steps_per_epoch();
            let mut reference: Option<Vec<Vec<SampleRef>>> = None;
            for world in 1u32..=8 {
                let mut slots_seen = vec![0u32; plan.epoch_len() as usize];
                let mut samples_seen = BTreeSet::new();
                let mut batches = Vec::new();
                for s in 0..spe {
                    let sp = plan.step(epoch * spe + s);
                    prop_assert_eq!(sp.epoch, epoch);
                    let mut global = Vec::new();
                    for rank in 0..world {
                        let slice = DataPlan::rank_slice(&sp.slots, rank, world);
                        prop_assert!(slice.start >= sp.slots.start && slice.end <= sp.slots.end);
                        for slot in slice {
                            slots_seen[slot as usize] += 1;
                            let sample = plan.sample_at(epoch, slot);
                            prop_assert!(sample.index < sizes[sample.dataset as usize]);
                            prop_assert!(samples_seen.insert(sample), "sample {:?} twice", sample);
                            global.push(sample);
                        }
                    }
                    batches.push(global);
                }
                prop_assert!(slots_seen.iter().all(|&c| c == 1), "world {}: {:?}", world, slots_seen);
                prop_assert_eq!(samples_seen.len() as u64, plan.epoch_len());
                match &reference {
                    None => reference = Some(batches),
                    Some(r) => prop_assert_eq!(r, &batches, "world {} changes the global batches", world),
                }
            }
        }

        /// With weights, every epoch gives each dataset exactly its share of slots (largest remainder),
        /// and a dataset's samples repeat as evenly as possible (none twice before all were used).
        #[test]
        fn weights_hold_exactly_and_repeats_are_even(
            sizes in prop::collection::vec(1u64..50, 1..4),
            weights in prop::collection::vec(0.05f64..5.0, 4),
            seed in any::<u64>(),
            epoch in 0u64..3,
        ) {
            let w = &weights[..sizes.len()];
            let plan = DataPlan::new(seed, 7, sizes.clone(), Some(w)).expect("plan");
            let total: u64 = sizes.iter().sum();
            prop_assert_eq!(plan.counts().iter().sum::<u64>(), total);
            let wsum: f64 = w.iter().sum();
            for (d, &c) in plan.counts().iter().enumerate() {
                let exact = total as f64 * w[d] / wsum;
                prop_assert!((c as f64 - exact).abs() < 1.0 + 1e-9, "dataset {} gets {} slots, share {}", d, c, exact);
            }
            let mut seen: std::collections::BTreeMap<SampleRef, u64> = Default::default();
            for slot in 0..total {
                *seen.entry(plan.sample_at(epoch, slot)).or_default() += 1;
            }
            for (d, (&n, &c)) in sizes.iter().zip(plan.counts()).enumerate() {
                let uses: Vec<u64> = (0..n).map(|i| seen.get(&SampleRef { dataset: d as u32, index: i }).copied().unwrap_or(0)).collect();
                prop_assert_eq!(uses.iter().sum::<u64>(), c);
                let (lo, hi) = (c / n, c.div_ceil(n));
                prop_assert!(uses.iter().all(|&u| u == lo || u == hi), "dataset {}: uses {:?}", d, uses);
            }
        }

        #[test]
        fn rank_slices_are_balanced(b in 0u64..100, world in 1u32..9) {
            let sizes: Vec<u64> = (0..world).map(|r| {
                let s = DataPlan::rank_slice(&(5..5 + b), r, world);
                s.end - s.start
            }).collect();
            let (min, max) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
            prop_assert!(max - min <= 1);
            prop_assert_eq!(sizes.iter().sum::<u64>(), b);
        }
    }
}
