//! The objective of one step, assembled across ranks from each rank's features: steps 2 to 4 of
//! `train.rs` (the gather, the cross-sample and intra-sample shares, the summed row gradients).
//! `Trainer::step` runs it on the encoders' outputs; `loss-eval` runs it on given features in a world
//! of one, so the tool that checks the objective against other implementations checks this code.
//!
//! The result is a *surrogate*: a scalar whose gradient, through this rank's forward graph, is this
//! rank's share of the gradient of the global objective (the gathered rows' gradients summed over
//! ranks, dotted with this rank's rows, plus its intra-sample shares).

use std::ops::Range;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::comm::Communicator;
use crate::loss::{self, MemoryBank, TERMS};
use crate::train::{Banks, Objective, StepError, Variant};

/// Columns of per-sample metadata in the gathered rows, after the three embeddings (stage 2 follows
/// them with the J joint-visibility flags, then the RGB and the depth joint cell features).
const META: i64 = 7;
const META_HAS_DEPTH: usize = 0;
const META_HAS_KP: usize = 1;
const META_RANK: usize = 2;
const META_DICL: usize = 3;
const META_VIS_KP: usize = 4;
const META_ID_HI: usize = 5;
const META_ID_LO: usize = 6;
/// Global ids travel as two columns below 2^20 each, exact in float32.
const ID_SPLIT: i64 = 1 << 20;

/// The features of one rank's slice: what the objective is computed on.
pub(crate) struct Forward {
    /// b x D
    pub z_rgb: Tensor,
    /// b_d x D: the samples with depth only.
    pub z_depth: Option<Tensor>,
    /// b x D
    pub z_kp: Tensor,
    /// Stage 2: dense maps and per-joint outputs.
    pub dense: Option<DenseForward>,
}

pub(crate) struct DenseForward {
    /// b x D x h x w and b_d x D x h x w
    pub f_rgb: Tensor,
    pub f_depth: Option<Tensor>,
    /// b x J x D keypoint-encoder joint outputs.
    pub g: Tensor,
    /// b x J x D and b_d x J x D: the dense features at each joint's cell.
    pub cell_rgb: Tensor,
    pub cell_depth: Option<Tensor>,
}

/// This rank's part of the step's objective.
pub(crate) struct Assembled {
    /// Backpropagated through this rank's forward graph: this rank's share of every gradient.
    pub surrogate: Tensor,
    /// This rank's share of each term, in `Objective::term_names` order (summed over ranks, they are
    /// the terms), as vectors to concatenate.
    pub values: Vec<Tensor>,
    /// Rows of the global batch (every rank's samples).
    pub rows: i64,
    /// Per modality (RGB, depth, keypoints), which global rows have it.
    pub has: [Vec<bool>; 3],
    /// The global rows' sample ids and their gathered embeddings, per modality (the memory banks'
    /// update).
    pub ids: Vec<i64>,
    pub z: [Tensor; 3],
}

pub(crate) fn index(v: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(v).to_device(device)
}

pub(crate) fn bools(v: &[bool], device: Device) -> Tensor {
    Tensor::from_slice(&v.iter().map(|&x| u8::from(x)).collect::<Vec<u8>>()).to_device(device).to_kind(Kind::Bool)
}

/// What the objective is, beyond the step's features: the objective, the banks of the memory-bank
/// variant, and the joints per sample.
pub(crate) struct Assembly<'a> {
    pub objective: &'a Objective,
    pub banks: Option<&'a Banks>,
    pub joints: i64,
}

impl Assembly<'_> {
    /// The objective over the global batch, from this rank's features `fwd` of its slice `batch`
    /// (only its per-sample fields are read: masks, ids, slots, joint visibility, DICL cells).
    /// `expected`, when given, is the plan's `(offset, global rows)`, and a gather that differs is an
    /// error (ranks disagree on the plan). Time spent in collectives is added to `comm_time`. `None`:
    /// no rank brought a sample (all were skipped), and every rank sees the same empty gather.
    pub fn run(
        &self,
        comm: &mut dyn Communicator,
        fwd: &Forward,
        batch: &Batch,
        expected: Option<(usize, usize)>,
        comm_time: &mut Duration,
    ) -> Result<Option<Assembled>, StepError> {
        let Assembly { objective, banks, joints } = *self;
        let kind = fwd.z_rgb.kind();
        let dev = fwd.z_rgb.device();
        let dim = fwd.z_rgb.size()[1];
        let b = batch.len() as i64;
        let tau = objective.temperature;
        let stage2 = objective.stage == 2;
        let depth_rows = index(&batch.depth_rows, dev);
        let scatter_depth =
            |rows: &Tensor, shape: &[i64]| Tensor::zeros(shape, (kind, dev)).index_copy(0, &depth_rows, &rows.detach());
        let z_depth_full = match &fwd.z_depth {
            Some(z) => scatter_depth(z, &[b, dim]),
            None => Tensor::zeros([b, dim], (kind, dev)),
        };
        // Joints that anchor SSCL part 1: every visible joint (the fewer-than-2-visible rule belongs to
        // the sample-level terms only), as the PyTorch reference counts them.
        let vis = &batch.joint_visible;
        let vis_kp_counts: Vec<f64> =
            vis.chunks(joints.max(1) as usize).map(|c| c.iter().filter(|&&v| v).count() as f64).collect();
        let mut dicl_counts = vec![0.0f64; batch.len()];
        for &r in &batch.dicl_rows {
            dicl_counts[batch.depth_rows[r as usize] as usize] = batch.dicl_cells.size()[1] as f64;
        }

        // 2. Gather what the cross-sample terms need.
        let col = |v: Vec<f64>| Tensor::from_slice(&v).to_kind(kind).to_device(dev).view([b, 1]);
        let flag = |v: &[bool]| col(v.iter().map(|&x| f64::from(u8::from(x))).collect());
        let mut parts = vec![
            fwd.z_rgb.detach(),
            z_depth_full,
            fwd.z_kp.detach(),
            flag(&batch.has_depth),
            flag(&batch.has_keypoints),
            Tensor::full([b, 1], comm.rank() as f64, (kind, dev)),
            col(dicl_counts),
            col(vis_kp_counts),
            col(batch.ids.iter().map(|&id| (id / ID_SPLIT) as f64).collect()),
            col(batch.ids.iter().map(|&id| (id % ID_SPLIT) as f64).collect()),
        ];
        if let Some(d) = &fwd.dense {
            parts.push(bools(&batch.joint_visible, dev).to_kind(kind).view([b, joints]));
            parts.push(d.cell_rgb.detach().reshape([b, joints * dim]));
            parts.push(match &d.cell_depth {
                Some(c) => scatter_depth(c, &[b, joints, dim]).reshape([b, joints * dim]),
                None => Tensor::zeros([b, joints * dim], (kind, dev)),
            });
        }
        let local = Tensor::cat(&parts, 1);
        let t = Instant::now();
        let gathered = comm.all_gather_cat(&local)?;
        *comm_time += t.elapsed();
        let rows = gathered.size()[0];
        // The per-sample columns (and, in stage 2, the joint visibility) in one copy to the host.
        let host_cols = META + if stage2 { joints } else { 0 };
        let meta = Vec::<f64>::try_from(
            &gathered.narrow(1, 3 * dim, host_cols).reshape([-1]).to_kind(Kind::Double).to_device(Device::Cpu),
        )
        .map_err(|e| StepError::Tensor(format!("reading the gathered masks and ranks: {e}")))?;
        let column = |c: usize| meta.iter().skip(c).step_by(host_cols as usize).copied();
        let ranks: Vec<f64> = column(META_RANK).collect();
        let offset = ranks.iter().filter(|&&r| (r as usize) < comm.rank()).count();
        if let Some((want_offset, want_rows)) = expected
            && (rows != want_rows as i64 || offset != want_offset)
        {
            return Err(StepError::RowMismatch { got: rows, want: want_rows as i64 });
        }
        if rows == 0 {
            return Ok(None);
        }
        let local_range = offset..offset + batch.len();
        let g_has_depth: Vec<bool> = column(META_HAS_DEPTH).map(|x| x > 0.5).collect();
        let g_has_kp: Vec<bool> = column(META_HAS_KP).map(|x| x > 0.5).collect();
        let has = [vec![true; rows as usize], g_has_depth.clone(), g_has_kp];
        let g_ids: Vec<i64> =
            column(META_ID_HI).zip(column(META_ID_LO)).map(|(hi, lo)| hi as i64 * ID_SPLIT + lo as i64).collect();

        // 3. Cross-sample shares on leaves.
        let mut leaves: Vec<Tensor> =
            (0..3).map(|m| gathered.narrow(1, m * dim, dim).detach().set_requires_grad(true)).collect();
        let cell_base = 3 * dim + host_cols;
        if stage2 {
            for m in 0..2 {
                let block = gathered.narrow(1, cell_base + m * joints * dim, joints * dim);
                leaves.push(block.detach().reshape([rows, joints, dim]).set_requires_grad(true));
            }
        }
        let z_leaves: [Tensor; 3] = std::array::from_fn(|m| leaves[m].shallow_clone());
        let (mut cross_total, mut values) = match (objective.variant, banks) {
            (Variant::InBatch, _) => {
                let share = loss::sample_level_share(&z_leaves, &has, local_range.clone(), tau);
                (share.total, vec![share.values])
            }
            (Variant::MemoryBank, Some(banks)) => {
                let shares = bank_shares(objective, banks, &z_leaves, &has, &g_ids, batch, local_range.clone());
                let values = Tensor::stack(&shares, 0);
                (values.sum(None::<Kind>), vec![values.detach()])
            }
            (Variant::MemoryBank, None) => {
                return Err(StepError::Tensor("the memory-bank variant needs banks".into()));
            }
        };
        let mut sscl_cross = None;
        if stage2 {
            let g_vis: Vec<bool> =
                meta.chunks(host_cols as usize).flat_map(|row| row[META as usize..].iter().map(|&x| x > 0.5)).collect();
            // Rows of SSCL part 2: r_j of every visible joint, then d_j of every visible joint of a
            // sample with depth; anchors are this rank's samples' rows.
            let (mut sel_r, mut sel_d, mut joint_r, mut joint_d, mut anchor_r, mut anchor_d) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for i in 0..rows as usize {
                for j in 0..joints as usize {
                    if g_vis[i * joints as usize + j] {
                        let flat = (i * joints as usize + j) as i64;
                        sel_r.push(flat);
                        joint_r.push(j as i64);
                        anchor_r.push(local_range.contains(&i));
                        if g_has_depth[i] {
                            sel_d.push(flat);
                            joint_d.push(j as i64);
                            anchor_d.push(local_range.contains(&i));
                        }
                    }
                }
            }
            let pick =
                |leaf: &Tensor, sel: &[i64]| leaf.reshape([rows * joints, dim]).index_select(0, &index(sel, dev));
            let all_rows = Tensor::cat(&[pick(&leaves[3], &sel_r), pick(&leaves[4], &sel_d)], 0);
            joint_r.extend(joint_d);
            anchor_r.extend(anchor_d);
            let (share, _) = loss::sscl_part2_share(&all_rows, &joint_r, &anchor_r, tau);
            sscl_cross = Some(share);
        }
        if let Some(t) = &sscl_cross {
            cross_total += t;
        }
        let leaf_grads: Vec<Tensor> = if cross_total.requires_grad() {
            Tensor::run_backward(&[&cross_total], &leaves, false, false)
                .into_iter()
                .zip(&leaves)
                .map(|(g, l)| if g.defined() { g } else { l.zeros_like() })
                .collect()
        } else {
            leaves.iter().map(|l| l.zeros_like()).collect()
        };

        // Intra-sample shares (stage 2), on the local graph, with global anchor counts.
        let mut intra: Vec<Tensor> = Vec::new();
        if let Some(d) = &fwd.dense {
            let global = |c: usize| column(c).sum::<f64>() as usize;
            let dicl_anchors = global(META_DICL);
            let (r2d, d2r) = match &d.f_depth {
                Some(f_depth) if !batch.dicl_rows.is_empty() => {
                    let dicl_rows = index(&batch.dicl_rows, dev);
                    let f_r = d.f_rgb.index_select(0, &depth_rows.index_select(0, &dicl_rows));
                    let f_d = f_depth.index_select(0, &dicl_rows);
                    loss::dicl_share(&f_r, &f_d, &batch.dicl_cells, tau, dicl_anchors)
                }
                _ => (Tensor::zeros([], (kind, dev)), Tensor::zeros([], (kind, dev))),
            };
            let vis_t = bools(vis, dev).view([b, joints]);
            let r2k = loss::sscl_part1_share(&d.cell_rgb, &d.g, &vis_t, tau, global(META_VIS_KP));
            let d2k_anchors: usize =
                column(META_VIS_KP).zip(g_has_depth.iter()).filter(|(_, h)| **h).map(|(n, _)| n as usize).sum();
            let d2k = match &d.cell_depth {
                Some(cell_depth) => loss::sscl_part1_share(
                    cell_depth,
                    &d.g.index_select(0, &depth_rows),
                    &vis_t.index_select(0, &depth_rows),
                    tau,
                    d2k_anchors,
                ),
                None => Tensor::zeros([], (kind, dev)),
            };
            intra = vec![r2d, d2r, r2k, d2k];
        }

        // 4. Sum the gathered rows' gradients over ranks; this rank's rows' gradients, dotted with its
        //    features, plus its intra-sample shares, make the surrogate.
        let mut flat_grads = Tensor::cat(&leaf_grads.iter().map(|g| g.reshape([rows, -1])).collect::<Vec<_>>(), 1);
        let t = Instant::now();
        comm.all_reduce_sum(&mut flat_grads)?;
        *comm_time += t.elapsed();
        let mine = flat_grads.narrow(0, offset as i64, b);
        let block = |k: i64| mine.narrow(1, k * dim, dim);
        let mut surrogate = Tensor::zeros([], (kind, dev));
        if b > 0 {
            surrogate += (&fwd.z_rgb * block(0)).sum(None::<Kind>) + (&fwd.z_kp * block(2)).sum(None::<Kind>);
            if let Some(z) = &fwd.z_depth {
                surrogate += (z * block(1).index_select(0, &depth_rows)).sum(None::<Kind>);
            }
            if let Some(d) = &fwd.dense {
                let cells = |m: i64| mine.narrow(1, 3 * dim + m * joints * dim, joints * dim).reshape([b, joints, dim]);
                surrogate += (&d.cell_rgb * cells(0)).sum(None::<Kind>);
                if let Some(c) = &d.cell_depth {
                    surrogate += (c * cells(1).index_select(0, &depth_rows)).sum(None::<Kind>);
                }
                for t in &intra {
                    surrogate += t;
                }
            }
        }
        if stage2 {
            // Order of DENSE_TERMS: dicl_r2d, dicl_d2r, sscl_r2k, sscl_d2k, sscl_cross.
            let dense: Vec<Tensor> = intra.iter().chain(sscl_cross.iter()).map(|t| t.detach().to_kind(kind)).collect();
            values.push(Tensor::stack(&dense, 0));
        }
        let z = std::array::from_fn(|m| leaves[m].detach());
        Ok(Some(Assembled { surrogate, values, rows, has, ids: g_ids, z }))
    }
}

/// The six sample-level shares against the memory banks: this rank's anchors only.
fn bank_shares(
    objective: &Objective,
    banks: &Banks,
    z: &[Tensor; 3],
    has: &[Vec<bool>; 3],
    ids: &[i64],
    batch: &Batch,
    local: Range<usize>,
) -> Vec<Tensor> {
    let (kind, dev) = (z[0].kind(), z[0].device());
    let k = objective.negatives;
    TERMS
        .iter()
        .enumerate()
        .map(|(t, &(_, a, bm))| {
            let (ha, hb) = (&has[a as usize], &has[bm as usize]);
            let global_anchors = ha.iter().zip(hb).filter(|(x, y)| **x && **y).count();
            let mine: Vec<usize> = local.clone().filter(|&i| ha[i] && hb[i]).collect();
            if mine.is_empty() || global_anchors == 0 {
                return Tensor::zeros([], (kind, dev));
            }
            let anchor_ids: Vec<i64> = mine.iter().map(|&i| ids[i]).collect();
            let mut negatives = Vec::with_capacity(mine.len() * k);
            for &i in &mine {
                let slot = batch.slots[i - local.start];
                // One draw per (anchor, term): the term index is mixed into the seed.
                let seed = hcmoco_data::augment::mix(objective.seed ^ (t as u64 + 1).wrapping_mul(0x5851_f42d));
                negatives.extend(MemoryBank::negatives(
                    seed,
                    batch.epoch,
                    slot,
                    &banks.eligible[bm as usize],
                    ids[i],
                    k,
                ));
            }
            // n x K, or n x 0 when the anchors' sample is the only one with the candidate modality
            // (then every anchor of the term is that sample, and its logits are the positive alone).
            let negatives = Tensor::from_slice(&negatives).view([mine.len() as i64, -1]).to_device(dev);
            let rows: Vec<i64> = mine.iter().map(|&i| i as i64).collect();
            let z_a = z[a as usize].index_select(0, &index(&rows, dev));
            banks.bank.share(a, bm, &z_a, &anchor_ids, &negatives, objective.temperature, global_anchors)
        })
        .collect()
}
