//! One training step across ranks, done right.
//!
//! 1. Forward this rank's slice through the encoders (depth only for samples that have it), under
//!    bfloat16 autocast when asked; stage 2 also computes the dense maps and each joint's cell
//!    features.
//! 2. All-gather, in one collective and in slot order, what the cross-sample terms need from every
//!    rank: the global embeddings, the joint cell features (stage 2), and per sample its modality
//!    masks, rank, anchor counts and global id.
//! 3. Compute this rank's share of the cross-sample terms (the six sample-level terms, in-batch or
//!    against the memory banks, and SSCL part 2) with the gathered rows as fresh leaves: the gradient
//!    of the share with respect to every gathered row comes out. The intra-sample terms (DICL, SSCL
//!    part 1) need nothing from other ranks but their global anchor counts, which the gather brought.
//! 4. All-reduce (sum) the gradients of the gathered rows: each rank now holds the single-process
//!    gradient of its own rows, and backpropagates it, together with its intra-sample shares, through
//!    its encoders in one backward pass.
//! 5. All-reduce (sum, not average) the parameter gradients, fused into fixed-size buckets in the
//!    same order on every rank (a parameter without a gradient this step is packed as zeros), and the
//!    term values.
//! 6. Broadcast of rank 0's normalisation statistics into a staging copy: the last collective.
//! 7. The commit, which cannot fail: the undo record of the step (parameters, momentum, the buffers
//!    as they were before the forward pass, which writes them, and the memory-bank rows about to be
//!    overwritten), then the SGD update (identical on every rank), the staged statistics, and, in the
//!    memory-bank variant, the bank update from the gathered features in global slot order (identical
//!    on every rank, so the banks stay bit-identical).
//!
//! Steps 2 to 4 are `objective::Assembly::run`, which `hcmoco-worker loss-eval` runs too (in a world of
//! one), so the objective checked against the PyTorch reference is the one that trains.
//!
//! A step that fails before its commit leaves the trainer as it was before the step (the buffers
//! are restored). A committed step can be undone until the next one commits ([`Trainer::undo_last`]):
//! a generation that breaks after some ranks applied a step its coordinator never committed trains
//! that step again from the state before it.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::buckets::BucketPlan;
use crate::comm::{CommError, Communicator};
use crate::flat::Flat;
use crate::loss::{self, MemoryBank, Modality, TERMS};
use crate::model::Model;
use crate::objective::{Assembled, Assembly, DenseForward, Forward, index};
use crate::optim::Sgd;

/// Names of the stage-2 terms, after the six sample-level ones.
pub const DENSE_TERMS: [&str; 5] = ["dicl_r2d", "dicl_d2r", "sscl_r2k", "sscl_d2k", "sscl_cross"];

/// The sample-level variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    InBatch,
    MemoryBank,
}

/// What the step optimises.
#[derive(Debug, Clone)]
pub struct Objective {
    /// 1: sample-level terms; 2: all terms.
    pub stage: u32,
    pub variant: Variant,
    pub temperature: f64,
    /// Memory bank: negatives per anchor.
    pub negatives: usize,
    /// The job's seed (negative draws).
    pub seed: u64,
}

impl Objective {
    /// The names of the terms this objective reports, in order.
    pub fn term_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = TERMS.iter().map(|t| t.0).collect();
        if self.stage == 2 {
            names.extend(DENSE_TERMS);
        }
        names
    }
}

/// The memory-bank state of a trainer: the banks and, per modality, the global ids of the samples
/// that have it (the rows negatives are drawn from), sorted ascending (checked by [`Banks::new`]).
pub struct Banks {
    pub bank: MemoryBank,
    pub(crate) eligible: [Vec<i64>; 3],
}

/// Names of the banks in checkpoints and state dumps, in [`Modality`] order.
pub const BANK_NAMES: [&str; 3] = ["bank.rgb", "bank.depth", "bank.kp"];

impl Banks {
    /// `eligible[m]`: the ids of the samples that have modality `m`, strictly ascending (the negative
    /// draw finds the anchor's own id by binary search), each below the banks' row count.
    pub fn new(bank: MemoryBank, eligible: [Vec<i64>; 3]) -> anyhow::Result<Banks> {
        let rows = bank.banks[0].size()[0];
        for (m, ids) in eligible.iter().enumerate() {
            anyhow::ensure!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "memory bank {}: eligible ids must be strictly ascending",
                BANK_NAMES[m]
            );
            if let Some(&last) = ids.last() {
                anyhow::ensure!(
                    ids[0] >= 0 && last < rows,
                    "memory bank {}: eligible ids {}..={last} outside its {rows} rows",
                    BANK_NAMES[m],
                    ids[0]
                );
            }
        }
        Ok(Banks { bank, eligible })
    }

    /// The banks named [`BANK_NAMES`] (shallow: they share the banks' storage).
    fn named(&self) -> Vec<(String, Tensor)> {
        BANK_NAMES.iter().zip(&self.bank.banks).map(|(n, t)| (n.to_string(), t.shallow_clone())).collect()
    }

    /// The banks, copied to the CPU, named [`BANK_NAMES`].
    pub fn state_on_cpu(&self) -> Vec<(String, Tensor)> {
        self.named().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect()
    }

    /// Replaces the banks with `state`'s (names [`BANK_NAMES`]); a missing, extra or mis-shaped bank is
    /// an error naming it.
    pub fn load(&mut self, state: &[(String, Tensor)], what: &str) -> anyhow::Result<()> {
        crate::weights::copy_into(what, &self.named(), state)
    }
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Global value of each term (same on every rank), in [`Objective::term_names`] order.
    pub terms: Vec<f64>,
    pub total: f64,
    pub compute: Duration,
    pub comm: Duration,
    /// Of `compute`: recording the step's undo (copies of parameters, momentum and bank rows).
    pub undo: Duration,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("gathered {got} rows but the step's global batch has {want} (ranks disagree on the plan)")]
    RowMismatch { got: i64, want: i64 },
    #[error("non-finite loss {0} (diverged)")]
    NonFinite(f64),
    #[error("{0}")]
    Tensor(String),
}

/// The model and its optimizer. The communicator is the session's (one per generation), passed to
/// every call that talks to other ranks.
pub struct Trainer {
    pub model: Model,
    pub opt: Sgd,
    pub objective: Objective,
    /// Present in the memory-bank variant.
    pub banks: Option<Banks>,
    /// Joints of the job's keypoint layout.
    pub joints: i64,
    /// bfloat16 autocast around the encoders' forward.
    pub autocast: bool,
    /// Gradient fusion plan over the parameters (name order).
    pub buckets: BucketPlan,
    /// The parameters' storage (the optimizer updates it in place).
    pub params: Flat,
    /// The parameters, in the flat order (listed once: the backward pass asks for their gradients
    /// every step).
    param_tensors: Vec<Tensor>,
    /// The buffers' storage, by kind: floating-point statistics, and the integer counters
    /// (`num_batches_tracked`), broadcast from rank 0 after every step.
    buffers_float: Flat,
    buffers_int: Flat,
    /// Steps applied to this state (the next step to train).
    pub applied_steps: u64,
    /// The state before the last applied step.
    undo: Option<Undo>,
}

/// What undoes the last applied step.
struct Undo {
    /// The step it undoes (the state holds `step` steps once undone).
    step: u64,
    params: Tensor,
    momentum: Tensor,
    buffers_float: Tensor,
    buffers_int: Tensor,
    /// Memory-bank rows the step overwrote, as they were: (modality, distinct ids, rows).
    bank_rows: Vec<(Modality, Tensor, Tensor)>,
}

/// A step's update, computed once every collective has completed.
struct Update {
    grad: Option<Tensor>,
    lr: f64,
    /// Rank 0's buffers after this step's forward pass.
    staged: Option<(Tensor, Tensor)>,
    /// (modality, sample ids, features) for the memory banks.
    banks: Vec<(Modality, Vec<i64>, Tensor)>,
}

struct Clock {
    comm: Duration,
}

impl Clock {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.comm += t.elapsed();
        r
    }
}

impl Trainer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Model,
        momentum: f64,
        weight_decay: f64,
        objective: Objective,
        banks: Option<Banks>,
        joints: i64,
        bucket_bytes: usize,
    ) -> Trainer {
        let (kind, device) = (model.kind, model.vs.device());
        let named_params = model.parameters();
        let params = Flat::adopt(&named_params, kind, device);
        let param_tensors = named_params.into_iter().map(|(_, t)| t).collect();
        let opt = Sgd::new(&params, momentum, weight_decay);
        let shapes: Vec<Vec<i64>> = params.layout.iter().map(|(_, s)| s.clone()).collect();
        let buckets = BucketPlan::new(&shapes, kind, device, bucket_bytes);
        let (float, int): (Vec<_>, Vec<_>) = model.buffers().into_iter().partition(|(_, t)| t.kind() == kind);
        let buffers_float = Flat::adopt(&float, kind, device);
        let int_kind = int.first().map_or(Kind::Int64, |(_, t)| t.kind());
        let buffers_int = Flat::adopt(&int, int_kind, device);
        Trainer {
            model,
            opt,
            objective,
            banks,
            joints,
            autocast: false,
            buckets,
            params,
            param_tensors,
            buffers_float,
            buffers_int,
            applied_steps: 0,
            undo: None,
        }
    }

    /// Drops the undo record (the state was replaced from elsewhere).
    pub fn forget_undo(&mut self) {
        self.undo = None;
    }

    /// Whether the last applied step can be undone.
    pub fn can_undo(&self) -> bool {
        self.undo.as_ref().is_some_and(|u| u.step + 1 == self.applied_steps)
    }

    /// Returns to the state before the last applied step; `None` when there is no record.
    pub fn undo_last(&mut self) -> Option<u64> {
        let u = self.undo.take()?;
        let _guard = tch::no_grad_guard();
        self.params.data.shallow_clone().copy_(&u.params);
        self.opt.momentum_buffer().copy_(&u.momentum);
        self.restore_buffers(&u.buffers_float, &u.buffers_int);
        if let Some(banks) = &mut self.banks {
            for (m, ids, rows) in u.bank_rows.into_iter().rev() {
                let _ = banks.bank.banks[m as usize].index_copy_(0, &ids, &rows);
            }
        }
        self.applied_steps = u.step;
        Some(u.step)
    }

    /// Copies of the buffers (what a step's forward pass is about to change).
    fn snapshot_buffers(&self) -> (Tensor, Tensor) {
        (self.buffers_float.data.copy(), self.buffers_int.data.copy())
    }

    fn restore_buffers(&mut self, float: &Tensor, int: &Tensor) {
        let _guard = tch::no_grad_guard();
        if !self.buffers_float.is_empty() {
            self.buffers_float.data.shallow_clone().copy_(float);
        }
        if !self.buffers_int.is_empty() {
            self.buffers_int.data.shallow_clone().copy_(int);
        }
    }

    /// Applies a step whose collectives have all completed: records the undo, then updates. Nothing
    /// here talks to other ranks or can fail on their account. Returns the time the undo record took.
    fn commit(&mut self, pre: (Tensor, Tensor), update: Update) -> Duration {
        let t = Instant::now();
        let _guard = tch::no_grad_guard();
        let dev = self.model.vs.device();
        let bank_rows = match &self.banks {
            Some(banks) => update
                .banks
                .iter()
                .map(|(m, ids, _)| {
                    let mut distinct = ids.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    let ids = index(&distinct, dev);
                    let rows = banks.bank.banks[*m as usize].index_select(0, &ids);
                    (*m, ids, rows)
                })
                .collect(),
            None => Vec::new(),
        };
        // The previous record is done with (its step is committed): its storage is reused, which
        // spares an allocation (and, on the CPU, fresh pages) of two model-sized tensors per step.
        let (params, momentum) = match self.undo.take() {
            Some(old) => {
                let (mut p, mut m) = (old.params, old.momentum);
                p.copy_(&self.params.data);
                m.copy_(&self.opt.momentum_buffer());
                (p, m)
            }
            None => (self.params.data.copy(), self.opt.momentum_buffer().copy()),
        };
        self.undo = Some(Undo {
            step: self.applied_steps,
            params,
            momentum,
            buffers_float: pre.0,
            buffers_int: pre.1,
            bank_rows,
        });
        if let Device::Cuda(i) = dev {
            // Timed as the device sees it (the copies are asynchronous there).
            tch::Cuda::synchronize(i as i64);
        }
        let undo = t.elapsed();
        if let Some(g) = &update.grad {
            self.opt.step(g, update.lr);
        }
        if let Some((float, int)) = &update.staged {
            self.restore_buffers(float, int);
        }
        if let Some(banks) = &mut self.banks {
            for (m, ids, z) in &update.banks {
                banks.bank.update(*m, ids, z);
            }
        }
        self.applied_steps += 1;
        undo
    }

    /// The source rank's whole training state everywhere: parameters, momentum, buffers and memory
    /// banks, so every member of a generation starts bit-identical. The source's undo record stays
    /// valid only on the source; the others drop theirs.
    pub fn broadcast_state(&mut self, comm: &mut dyn Communicator, root: usize) -> Result<(), CommError> {
        let mut params = self.params.data.shallow_clone();
        comm.broadcast(&mut params, root)?;
        let mut momentum = self.opt.momentum_buffer();
        comm.broadcast(&mut momentum, root)?;
        if let Some(banks) = &self.banks {
            for bank in &banks.bank.banks {
                let mut bank = bank.shallow_clone();
                comm.broadcast(&mut bank, root)?;
            }
        }
        let (float, int) = self.broadcast_buffers_from(comm, root)?;
        self.restore_buffers(&float, &int);
        let mut steps = Tensor::from_slice(&[self.applied_steps as f64]).to_device(self.model.vs.device());
        comm.broadcast(&mut steps, root)?;
        self.applied_steps = steps.double_value(&[0]) as u64;
        if comm.rank() != root {
            self.undo = None;
        }
        Ok(())
    }

    /// `root`'s normalisation statistics and counters, as staged copies: the flat floating-point
    /// buffers as they are, the integer counters carried as the model's float kind (exact below 2^24
    /// in f32).
    fn broadcast_buffers_from(&self, comm: &mut dyn Communicator, root: usize) -> Result<(Tensor, Tensor), CommError> {
        let mut float = self.buffers_float.data.copy();
        if !self.buffers_float.is_empty() {
            comm.broadcast(&mut float, root)?;
        }
        let mut int = self.buffers_int.data.copy();
        if !self.buffers_int.is_empty() {
            let mut carried = self.buffers_int.data.to_kind(self.model.kind);
            comm.broadcast(&mut carried, root)?;
            int = carried.to_kind(self.buffers_int.data.kind());
        }
        Ok((float, int))
    }

    fn forward(&self, batch: &Batch) -> Forward {
        let kind = self.model.kind;
        let dev = self.model.vs.device();
        let (b, dim) = (batch.len() as i64, self.model.embed_dim);
        let stage2 = self.objective.stage == 2;
        let empty = |shape: &[i64]| Tensor::zeros(shape, (kind, dev));
        if b == 0 {
            // A rank whose slice is empty (a small last batch) runs no forward but joins every collective.
            return Forward {
                z_rgb: empty(&[0, dim]),
                z_depth: None,
                z_kp: empty(&[0, dim]),
                dense: stage2.then(|| DenseForward {
                    f_rgb: empty(&[0, dim, 1, 1]),
                    f_depth: None,
                    g: empty(&[0, self.joints, dim]),
                    cell_rgb: empty(&[0, self.joints, dim]),
                    cell_depth: None,
                }),
            };
        }
        crate::autocast::bf16(self.autocast, dev, || {
            let maps = self.model.rgb.branches(&batch.rgb, true);
            let z_rgb = self.model.rgb.global(&maps).to_kind(kind);
            let f_rgb = stage2.then(|| self.model.rgb.dense(&maps).to_kind(kind));
            drop(maps);
            let (z_depth, f_depth) = if batch.depth_rows.is_empty() {
                (None, None)
            } else {
                let maps = self.model.depth.branches(&batch.depth, true);
                let z = self.model.depth.global(&maps).to_kind(kind);
                (Some(z), stage2.then(|| self.model.depth.dense(&maps).to_kind(kind)))
            };
            let (z_kp, g) = self.model.kp.forward_t(&batch.keypoints, true);
            let (z_kp, g) = (z_kp.to_kind(kind), g.to_kind(kind));
            let dense = f_rgb.map(|f_rgb| {
                let cell_rgb = loss::cell_features(&f_rgb, &batch.joint_cells);
                let cell_depth = f_depth.as_ref().map(|f| {
                    loss::cell_features(f, &batch.joint_cells.index_select(0, &index(&batch.depth_rows, dev)))
                });
                DenseForward { f_rgb, f_depth, g, cell_rgb, cell_depth }
            });
            Forward { z_rgb, z_depth, z_kp, dense }
        })
    }

    /// Trains one step on this rank's `batch`. Where this rank's rows sit in the global batch comes
    /// from the gather itself (every row carries its rank), so ranks may bring fewer rows than the
    /// plan gave them (samples skipped under `data.on_error = "skip"`). `expected`, when given, is the
    /// plan's `(offset, global rows)`, and any difference is an error (ranks disagree on the plan).
    pub fn step(
        &mut self,
        comm: &mut dyn Communicator,
        batch: &Batch,
        expected: Option<(usize, usize)>,
        lr: f64,
    ) -> Result<StepOutcome, StepError> {
        let pre = self.snapshot_buffers();
        match self.prepare(comm, batch, expected, lr) {
            Ok((mut outcome, update)) => {
                let t = Instant::now();
                outcome.undo = self.commit(pre, update);
                // The commit is compute (the update) plus the undo record.
                outcome.compute += t.elapsed();
                Ok(outcome)
            }
            Err(e) => {
                // The forward pass wrote the buffers; the step never happened.
                self.restore_buffers(&pre.0, &pre.1);
                Err(e)
            }
        }
    }

    /// Everything of a step up to its commit: the forward and backward passes and every collective.
    fn prepare(
        &mut self,
        comm: &mut dyn Communicator,
        batch: &Batch,
        expected: Option<(usize, usize)>,
        lr: f64,
    ) -> Result<(StepOutcome, Update), StepError> {
        let started = Instant::now();
        let mut clock = Clock { comm: Duration::ZERO };
        let dev = self.model.vs.device();

        // 1. Local forward; 2-4. the objective across ranks (`objective.rs`).
        let fwd = self.forward(batch);
        let assembly = Assembly { objective: &self.objective, banks: self.banks.as_ref(), joints: self.joints };
        let assembled = assembly.run(comm, &fwd, batch, expected, &mut clock.comm)?;
        let Some(Assembled { surrogate, values, rows, has, ids: g_ids, z }) = assembled else {
            // Every sample of the step was skipped (data.on_error = "skip") on every rank: all ranks see
            // the same empty gather and leave the step together, without an update.
            let terms = vec![0.0; self.objective.term_names().len()];
            let elapsed = started.elapsed();
            let outcome = StepOutcome {
                terms,
                total: 0.0,
                compute: elapsed.saturating_sub(clock.comm),
                comm: clock.comm,
                undo: Duration::ZERO,
            };
            return Ok((outcome, Update { grad: None, lr, staged: None, banks: Vec::new() }));
        };
        let grads: Vec<Option<Tensor>> = if surrogate.requires_grad() {
            Tensor::run_backward(&[&surrogate], &self.param_tensors, false, false)
                .into_iter()
                .map(|g| g.defined().then_some(g))
                .collect()
        } else {
            self.param_tensors.iter().map(|_| None).collect()
        };

        // 5. Parameter gradients summed over ranks in fused buckets (a missing gradient packs as
        //    zeros); the term shares summed in f64.
        let reduced = clock.time(|| self.buckets.all_reduce_flat(comm, &grads))?;
        // One vector on the device, summed over ranks in f64, read once.
        let mut terms_t = Tensor::cat(&values, 0).to_kind(Kind::Double);
        clock.time(|| comm.all_reduce_sum(&mut terms_t))?;
        let terms = Vec::<f64>::try_from(&terms_t.to_device(Device::Cpu))
            .map_err(|e| StepError::Tensor(format!("reading the summed loss terms: {e}")))?;
        let total: f64 = terms.iter().sum();
        if !total.is_finite() {
            return Err(StepError::NonFinite(total));
        }

        // 6. Rank 0's normalisation statistics, staged: the last collective of the step.
        let t = Instant::now();
        let staged = self.broadcast_buffers_from(comm, 0)?;
        clock.comm += t.elapsed();
        let mut bank_updates = Vec::new();
        if self.banks.is_some() {
            for m in [Modality::Rgb, Modality::Depth, Modality::Keypoints] {
                let sel: Vec<i64> = (0..rows).filter(|&i| has[m as usize][i as usize]).collect();
                if sel.is_empty() {
                    continue;
                }
                let ids: Vec<i64> = sel.iter().map(|&i| g_ids[i as usize]).collect();
                let z = z[m as usize].index_select(0, &index(&sel, dev));
                bank_updates.push((m, ids, z));
            }
        }
        let elapsed = started.elapsed();
        let outcome = StepOutcome {
            terms,
            total,
            compute: elapsed.saturating_sub(clock.comm),
            comm: clock.comm,
            undo: Duration::ZERO,
        };
        Ok((outcome, Update { grad: Some(reduced), lr, staged: Some(staged), banks: bank_updates }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_step::{StepBenchSpec, synthetic_batch};
    use crate::comm::{AbortHandle, CpuOptions, ReduceOp, connect_cpu_alone};
    use hcmoco_proto::config::{Dtype, ModelConfig, Norm};

    /// A world of one whose `fail_at`-th broadcast (counted from 1) fails, as a peer dying during the
    /// step's last collective would make it.
    struct FailingBroadcast {
        inner: Box<dyn Communicator>,
        broadcasts: usize,
        fail_at: Option<usize>,
    }

    impl Communicator for FailingBroadcast {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn generation(&self) -> u64 {
            self.inner.generation()
        }
        fn abort_handle(&self) -> AbortHandle {
            self.inner.abort_handle()
        }
        fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
            self.inner.all_reduce(t, op)
        }
        fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor, CommError> {
            self.inner.reduce_scatter(t, op)
        }
        fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor, CommError> {
            self.inner.all_gather_cat(t)
        }
        fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
            self.broadcasts += 1;
            if self.fail_at == Some(self.broadcasts) {
                return Err(CommError::Aborted { op: "broadcast", reason: "injected: peer gone".into() });
            }
            self.inner.broadcast(t, root)
        }
        fn barrier(&mut self) -> Result<(), CommError> {
            self.inner.barrier()
        }
    }

    fn world_of_one() -> Box<dyn Communicator> {
        let opts = CpuOptions { timeout: Duration::from_secs(30), ..CpuOptions::default() };
        Box::new(connect_cpu_alone(&opts).expect("world of one"))
    }

    /// Every tensor of the training state, copied: parameters, momentum, buffers, banks.
    fn snapshot(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = t.model.state().into_iter().map(|(n, x)| (n, x.detach().copy())).collect();
        v.extend(t.opt.state().into_iter().map(|(n, x)| (n, x.copy())));
        if let Some(b) = &t.banks {
            v.extend(b.state_on_cpu());
        }
        v
    }

    fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{what}: {na} differs");
        }
    }

    /// A failure in the step's last collective (after the forward pass wrote the BatchNorm buffers,
    /// before the update) leaves the state exactly as before the step; a committed step is undone
    /// bit for bit, memory-bank rows included.
    #[test]
    fn a_failed_step_changes_nothing_and_a_committed_one_undoes_exactly() {
        tch::set_num_threads(1);
        let spec = StepBenchSpec {
            backbone: "hrnet_small".into(),
            batch: 4,
            image: 32,
            stage: 1,
            dicl_points: 0,
            threads: 1,
            warmup: 0,
            iters: 1,
            device: Device::Cpu,
            autocast: false,
            norm: Norm::Batch,
            memory_bank: Some((8, 3)),
        };
        let cfg = ModelConfig {
            backbone: "hrnet_small".into(),
            norm: Norm::Batch,
            dtype: Dtype::F32,
            embed_dim: 16,
            keypoint_hidden: 16,
            keypoint_blocks: 1,
            ..Default::default()
        };
        let layout = hcmoco_data::KeypointLayout::Mpii16;
        let model = Model::new(&cfg, layout, 0, Device::Cpu).expect("model");
        let bank = MemoryBank::new(8, 16, 0, model.kind, Device::Cpu);
        let banks = Banks::new(bank, std::array::from_fn(|_| (0..8).collect())).expect("banks");
        let objective = Objective { stage: 1, variant: Variant::MemoryBank, temperature: 0.07, negatives: 3, seed: 0 };
        let joints = layout.num_joints() as i64;
        let mut t = Trainer::new(model, 0.9, 1e-4, objective, Some(banks), joints, 1 << 20);
        let batch = synthetic_batch(&spec, joints, Kind::Float);
        let mut comm = FailingBroadcast { inner: world_of_one(), broadcasts: 0, fail_at: None };
        let s0 = snapshot(&t);
        t.step(&mut comm, &batch, None, 0.1).expect("step 0");
        assert_eq!((t.applied_steps, t.can_undo()), (1, true));
        let s1 = snapshot(&t);
        // Step 1 fails in its last collective: the int counters' broadcast (the 2nd broadcast).
        comm.broadcasts = 0;
        comm.fail_at = Some(2);
        let err = t.step(&mut comm, &batch, None, 0.1).expect_err("injected failure");
        assert!(matches!(err, StepError::Comm(_)), "{err}");
        assert_same(&snapshot(&t), &s1, "after a failed step");
        assert_eq!(t.applied_steps, 1);
        // Undo the committed step 0: back to the initial state, bit for bit.
        assert_eq!(t.undo_last(), Some(0));
        assert_same(&snapshot(&t), &s0, "after undoing step 0");
        assert_eq!((t.applied_steps, t.can_undo()), (0, false));
        assert!(t.undo_last().is_none(), "one step back at most");
        // And training again from there reproduces step 0 exactly.
        comm.fail_at = None;
        t.step(&mut comm, &batch, None, 0.1).expect("step 0 again");
        assert_same(&snapshot(&t), &s1, "step 0 retrained");
        // A later step's record reuses the previous one's storage, and still undoes exactly.
        t.step(&mut comm, &batch, None, 0.1).expect("step 1");
        assert!(!snapshot(&t).iter().zip(&s1).all(|((_, a), (_, b))| a.equal(b)), "step 1 moved the state");
        assert_eq!(t.undo_last(), Some(1));
        assert_same(&snapshot(&t), &s1, "after undoing step 1");
    }

    #[test]
    fn banks_refuse_unsorted_or_out_of_range_eligible_ids() {
        let bank = || MemoryBank::new(5, 4, 0, Kind::Float, Device::Cpu);
        let ok = [vec![0, 1, 2, 3, 4], vec![1, 3], vec![]];
        assert!(Banks::new(bank(), ok).is_ok());
        let err = Banks::new(bank(), [vec![0, 2, 1], vec![], vec![]]).err().expect("unsorted");
        assert!(err.to_string().contains("bank.rgb") && err.to_string().contains("ascending"), "{err}");
        let err = Banks::new(bank(), [vec![], vec![0, 0], vec![]]).err().expect("repeated");
        assert!(err.to_string().contains("bank.depth"), "{err}");
        let err = Banks::new(bank(), [vec![], vec![], vec![3, 5]]).err().expect("past the rows");
        assert!(err.to_string().contains("bank.kp") && err.to_string().contains("5 rows"), "{err}");
    }
}
