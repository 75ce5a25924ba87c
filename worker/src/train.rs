//! One training step across ranks, done right.
//!
//! 1. Forward this rank's slice through the encoders (depth only for samples that have it).
//! 2. All-gather the embeddings and modality masks of every rank (one collective), in slot order.
//! 3. Compute this rank's share of the loss with the gathered embeddings as fresh leaves; the gradient
//!    of the share with respect to every gathered row comes out.
//! 4. All-reduce (sum) those embedding gradients: each rank now holds the single-process gradient of
//!    its own rows, and backpropagates it through its encoders.
//! 5. All-reduce (sum, not average) the parameter gradients, fused into fixed-size buckets in the
//!    same order on every rank (a parameter without a gradient this step is packed as zeros), and the
//!    six term values.
//! 6. SGD step (identical on every rank), then broadcast BatchNorm running statistics from rank 0.

use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use crate::batch::Batch;
use crate::buckets::BucketPlan;
use crate::comm::{CommError, Communicator};
use crate::loss::{self, TERMS};
use crate::model::{Model, flatten, unflatten_into};
use crate::optim::Sgd;

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Global value of each term (same on every rank), in [`TERMS`] order.
    pub terms: [f64; 6],
    pub total: f64,
    pub compute: Duration,
    pub comm: Duration,
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

/// The model, its optimizer and this rank's communicator.
pub struct Trainer {
    pub model: Model,
    pub opt: Sgd,
    pub comm: Box<dyn Communicator>,
    pub temperature: f64,
    /// Gradient fusion plan over the parameters (name order).
    pub buckets: BucketPlan,
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
    pub fn new(
        model: Model,
        comm: Box<dyn Communicator>,
        momentum: f64,
        weight_decay: f64,
        temperature: f64,
        bucket_bytes: usize,
    ) -> Trainer {
        let params = model.parameters();
        let opt = Sgd::new(&params, momentum, weight_decay);
        let shapes: Vec<Vec<i64>> = params.iter().map(|(_, p)| p.size()).collect();
        let buckets = BucketPlan::new(&shapes, model.kind, model.vs.device(), bucket_bytes);
        Trainer { model, opt, comm, temperature, buckets }
    }

    /// Makes every rank start from rank 0's parameters and buffers.
    pub fn broadcast_initial_state(&mut self) -> Result<(), CommError> {
        let state: Vec<Tensor> = self.model.state().into_iter().map(|(_, t)| t).collect();
        let mut flat = flatten(&state, self.model.kind);
        self.comm.broadcast(&mut flat, 0)?;
        unflatten_into(&flat, &state);
        Ok(())
    }

    /// Trains one step on this rank's `batch`. Where this rank's rows sit in the global batch comes
    /// from the gather itself (every row carries its rank), so ranks may bring fewer rows than the
    /// plan gave them (samples skipped under `data.on_error = "skip"`). `expected`, when given, is the
    /// plan's `(offset, global rows)`, and any difference is an error (ranks disagree on the plan).
    pub fn step(&mut self, batch: &Batch, expected: Option<(usize, usize)>, lr: f64) -> Result<StepOutcome, StepError> {
        let started = Instant::now();
        let mut clock = Clock { comm: Duration::ZERO };
        let kind = self.model.kind;
        let b = batch.len() as i64;
        let dim = self.model.embed_dim;
        let dev = self.model.vs.device();

        // 1. Local forward.
        // A rank whose slice is empty (a small last batch) runs no forward but joins every collective.
        let empty = || Tensor::zeros([0, dim], (kind, dev));
        let z_rgb = if b > 0 { self.model.rgb.forward(&batch.rgb, true) } else { empty() };
        let depth_rows = Tensor::from_slice(&batch.depth_rows).to_device(dev);
        let z_depth_c =
            if batch.depth_rows.is_empty() { None } else { Some(self.model.depth.forward(&batch.depth, true)) };
        let z_depth = match &z_depth_c {
            Some(zc) => Tensor::zeros([b, dim], (kind, dev)).index_copy(0, &depth_rows, zc),
            None => Tensor::zeros([b, dim], (kind, dev)),
        };
        let z_kp = if b > 0 { self.model.kp.forward(&batch.keypoints) } else { empty() };

        // 2. Gather embeddings and masks of the global batch.
        let mask = |v: &[bool]| {
            Tensor::from_slice(&v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect::<Vec<f64>>())
                .to_kind(kind)
                .to_device(dev)
                .view([b, 1])
        };
        let rank_col = Tensor::full([b, 1], self.comm.rank() as f64, (kind, dev));
        let local = Tensor::cat(
            &[
                z_rgb.detach(),
                z_depth.detach(),
                z_kp.detach(),
                mask(&batch.has_depth),
                mask(&batch.has_keypoints),
                rank_col,
            ],
            1,
        );
        let gathered = clock.time(|| self.comm.all_gather_cat(&local))?;
        let rows = gathered.size()[0];
        // The trailing columns (has depth, has keypoints, rank) in one copy to the host.
        let meta = Vec::<f64>::try_from(
            &gathered.narrow(1, 3 * dim, 3).reshape([-1]).to_kind(Kind::Double).to_device(tch::Device::Cpu),
        )
        .map_err(|e| StepError::Tensor(format!("reading the gathered masks and ranks: {e}")))?;
        let column = |c: usize| meta.iter().skip(c).step_by(3).copied();
        let ranks: Vec<f64> = column(2).collect();
        let offset = ranks.iter().filter(|&&r| (r as usize) < self.comm.rank()).count();
        if let Some((want_offset, want_rows)) = expected
            && (rows != want_rows as i64 || offset != want_offset)
        {
            return Err(StepError::RowMismatch { got: rows, want: want_rows as i64 });
        }
        let leaves: [Tensor; 3] =
            std::array::from_fn(|m| gathered.narrow(1, m as i64 * dim, dim).detach().set_requires_grad(true));
        let has =
            [vec![true; rows as usize], column(0).map(|x| x > 0.5).collect(), column(1).map(|x| x > 0.5).collect()];

        // 3. This rank's share; gradient with respect to every gathered row.
        let share = loss::sample_level_share(&leaves, &has, offset..offset + batch.len(), self.temperature);
        let emb_grads: Vec<Tensor> = if share.total.requires_grad() {
            Tensor::run_backward(&[&share.total], &leaves, false, false)
                .into_iter()
                .zip(&leaves)
                .map(|(g, l)| if g.defined() { g } else { l.zeros_like() })
                .collect()
        } else {
            leaves.iter().map(|l| l.zeros_like()).collect()
        };

        // 4. Sum embedding gradients over ranks; backpropagate our rows through the encoders.
        let mut g = Tensor::cat(&emb_grads, 1);
        clock.time(|| self.comm.all_reduce_sum(&mut g))?;
        let mine = g.narrow(0, offset as i64, b);
        let params: Vec<(String, Tensor)> = self.model.parameters();
        let param_tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut surrogate = (&z_rgb * mine.narrow(1, 0, dim)).sum(None::<Kind>)
            + (&z_kp * mine.narrow(1, 2 * dim, dim)).sum(None::<Kind>);
        if let Some(zc) = &z_depth_c {
            surrogate += (zc * mine.narrow(1, dim, dim).index_select(0, &depth_rows)).sum(None::<Kind>);
        }
        let grads: Vec<Option<Tensor>> = if b > 0 && surrogate.requires_grad() {
            Tensor::run_backward(&[&surrogate], &param_tensors, false, false)
                .into_iter()
                .map(|g| g.defined().then_some(g))
                .collect()
        } else {
            param_tensors.iter().map(|_| None).collect()
        };

        // 5. Parameter gradients summed over ranks in fused buckets (a missing gradient packs as
        //    zeros); the six term shares summed in f64.
        let comm = self.comm.as_mut();
        let reduced = clock.time(|| self.buckets.all_reduce(comm, &grads))?;
        let mut terms_t = Tensor::from_slice(&share.terms).to_device(dev);
        clock.time(|| self.comm.all_reduce_sum(&mut terms_t))?;
        let terms_v = Vec::<f64>::try_from(&terms_t.to_device(tch::Device::Cpu))
            .map_err(|e| StepError::Tensor(format!("reading the summed loss terms: {e}")))?;
        let mut terms = [0.0; 6];
        terms.copy_from_slice(&terms_v);
        let total: f64 = terms.iter().sum();
        if !total.is_finite() {
            return Err(StepError::NonFinite(total));
        }

        // 6. Update, then keep batch statistics identical across ranks.
        self.opt.step(&param_tensors, &reduced, lr);
        let buffers: Vec<Tensor> = self.model.buffers().into_iter().map(|(_, t)| t).collect();
        if !buffers.is_empty() {
            let mut flat = flatten(&buffers, kind);
            clock.time(|| self.comm.broadcast(&mut flat, 0))?;
            unflatten_into(&flat, &buffers);
        }
        let elapsed = started.elapsed();
        Ok(StepOutcome { terms, total, compute: elapsed.saturating_sub(clock.comm), comm: clock.comm })
    }
}

/// Term names in [`TERMS`] order.
pub fn term_names() -> [&'static str; 6] {
    std::array::from_fn(|i| TERMS[i].0)
}
