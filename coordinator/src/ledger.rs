//! The data ledger: which rank of which generation trained every slot of every committed step.
//!
//! It stores only what cannot be recomputed: one record per generation (its number, world size,
//! members, and the steps it committed) and the slots skipped under `data.on_error = "skip"`. With the
//! data plan (fixed by the job's seed and dataset sizes) and the slicing rule, this names the trainer
//! of every slot, so the ledger grows with generations and bad samples, never with the dataset.

use std::collections::BTreeSet;
use std::ops::Range;

use hcmoco_proto::pb;

use crate::plan::DataPlan;

/// One generation's share of the job's committed steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRecord {
    pub generation: u64,
    pub world: u32,
    pub members: Vec<String>,
    pub first_step: u64,
    /// One past the last step it committed (`first_step` while it has committed none).
    pub end_step: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Ordered by `first_step`; the committed steps of consecutive records do not overlap.
    pub generations: Vec<GenerationRecord>,
    /// (step, slot) pairs skipped by the rank that held them.
    pub skipped: BTreeSet<(u64, u64)>,
}

impl Ledger {
    /// A new generation starts at `first_step` (earlier records end there at the latest).
    pub fn open(&mut self, generation: u64, members: Vec<String>, first_step: u64) {
        for r in &mut self.generations {
            r.end_step = r.end_step.min(first_step);
        }
        self.generations.retain(|r| r.end_step > r.first_step || r.generation == generation);
        self.generations.push(GenerationRecord {
            generation,
            world: members.len() as u32,
            members,
            first_step,
            end_step: first_step,
        });
    }

    /// `step` was committed by the latest generation, with these skipped slots.
    pub fn commit(&mut self, step: u64, skipped: impl IntoIterator<Item = u64>) {
        if let Some(r) = self.generations.last_mut() {
            r.end_step = r.end_step.max(step + 1);
        }
        self.skipped.extend(skipped.into_iter().map(|slot| (step, slot)));
    }

    /// Forgets every step from `step` on (a rollback to a checkpoint).
    pub fn truncate(&mut self, step: u64) {
        for r in &mut self.generations {
            r.end_step = r.end_step.min(step);
            r.first_step = r.first_step.min(step);
        }
        self.generations.retain(|r| r.end_step > r.first_step);
        self.skipped.retain(|&(s, _)| s < step);
    }

    /// The generation record that committed `step`.
    pub fn record_of(&self, step: u64) -> Option<&GenerationRecord> {
        let i = self.generations.partition_point(|r| r.first_step <= step);
        self.generations[..i].iter().rev().find(|r| (r.first_step..r.end_step).contains(&step))
    }

    /// Every slot of the committed steps of `epoch`, in step then slot order.
    pub fn entries(&self, plan: &DataPlan, epoch: u64, committed: u64) -> Vec<pb::LedgerEntry> {
        let spe = plan.steps_per_epoch();
        let steps: Range<u64> =
            (epoch.saturating_mul(spe)).min(committed)..((epoch + 1).saturating_mul(spe)).min(committed);
        let mut out = Vec::new();
        for step in steps {
            let Some(rec) = self.record_of(step) else { continue };
            let sp = plan.step(step);
            for rank in 0..rec.world {
                for slot in DataPlan::rank_slice(&sp.slots, rank, rec.world) {
                    let s = plan.sample_at(sp.epoch, slot);
                    out.push(pb::LedgerEntry {
                        epoch: sp.epoch,
                        slot,
                        dataset: s.dataset,
                        index: s.index,
                        step,
                        generation: rec.generation,
                        rank,
                        skipped: self.skipped.contains(&(step, slot)),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// Any history of generations (each of 1..8 ranks, starting where the previous one's last
        /// commit left off, or earlier after a break that redoes a step) and rollbacks: every committed
        /// step's batch appears exactly once, each slot with the rank and generation of the world
        /// that committed it.
        #[test]
        fn any_history_names_every_committed_slot_once(
            history in prop::collection::vec((1u32..8, 0u64..6, prop::bool::ANY, 0u64..3), 1..12),
            samples in 1u64..40,
            batch in 1u64..9,
        ) {
            let plan = DataPlan::new(7, batch, vec![samples], None).expect("plan");
            let mut l = Ledger::default();
            let mut committed = 0u64;
            let mut worlds: BTreeMap<u64, (u64, u32)> = BTreeMap::new(); // step -> (generation, world)
            for (g, (world, steps, rollback, back)) in history.into_iter().enumerate() {
                let generation = g as u64 + 1;
                if rollback {
                    committed = committed.saturating_sub(back);
                    l.truncate(committed);
                    worlds.retain(|&s, _| s < committed);
                }
                l.open(generation, (0..world).map(|r| format!("w-{r}")).collect(), committed);
                for _ in 0..steps {
                    l.commit(committed, []);
                    worlds.insert(committed, (generation, world));
                    committed += 1;
                }
            }
            let spe = plan.steps_per_epoch();
            for epoch in 0..committed.div_ceil(spe) + 1 {
                let entries = l.entries(&plan, epoch, committed);
                let mut per_step: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                for e in &entries {
                    let (generation, world) = worlds[&e.step];
                    prop_assert_eq!(e.generation, generation);
                    prop_assert!(e.rank < world);
                    per_step.entry(e.step).or_default().push(e.slot);
                }
                let first = epoch * spe;
                let want: Vec<u64> = (first..(first + spe).min(committed)).collect();
                prop_assert_eq!(per_step.keys().copied().collect::<Vec<_>>(), want);
                for (step, slots) in per_step {
                    let batch_slots: Vec<u64> = plan.step(step).slots.collect();
                    prop_assert_eq!(slots, batch_slots);
                }
            }
        }
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w-{i}")).collect()
    }

    /// Every slot of every committed step appears once, with the rank and generation that trained it,
    /// across a resize, a break that redoes a step, and a rollback.
    #[test]
    fn every_slot_once_across_generations_and_a_rollback() {
        let plan = DataPlan::new(1, 5, vec![12], None).expect("plan"); // steps of 5, 5, 2 per epoch
        let mut l = Ledger::default();
        l.open(1, members(2), 0);
        l.commit(0, []);
        l.commit(1, [7]);
        // A break at step 2: generation 2 (3 workers) starts at 2.
        l.open(2, members(3), 2);
        l.commit(2, []);
        l.commit(3, []);
        let e0 = l.entries(&plan, 0, 3);
        assert_eq!(e0.len(), 12);
        let slots: BTreeSet<u64> = e0.iter().map(|e| e.slot).collect();
        assert_eq!(slots, (0..12).collect());
        assert_eq!(e0.iter().filter(|e| e.skipped).map(|e| e.slot).collect::<Vec<_>>(), [7]);
        assert!(e0.iter().filter(|e| e.step < 2).all(|e| e.generation == 1 && e.rank < 2));
        assert!(e0.iter().filter(|e| e.step == 2).all(|e| e.generation == 2));
        assert_eq!(l.entries(&plan, 1, 4).len(), 5);
        assert!(l.entries(&plan, 5, 4).is_empty(), "an epoch with no committed step is empty");
        // Rollback to step 1: steps 1.. are forgotten, and a new generation trains them again.
        l.truncate(1);
        l.open(3, members(1), 1);
        assert_eq!(l.entries(&plan, 0, 1).len(), 5);
        assert!(l.skipped.is_empty());
        l.commit(1, []);
        let again = l.entries(&plan, 0, 2);
        assert!(again.iter().filter(|e| e.step == 1).all(|e| e.generation == 3 && e.rank == 0));
        assert_eq!(l.generations.iter().map(|r| r.generation).collect::<Vec<_>>(), [1, 3]);
    }
}
