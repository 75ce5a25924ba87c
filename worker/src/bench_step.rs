//! `hcmoco-worker bench step`: the time of one training step of the real model and objective, on a
//! synthetic batch, at world size 1 (CPU ring or NCCL), for comparison with PyTorch eager running
//! the project's Python reference on the same shapes (`scripts/bench_step.py`).
//!
//! The batch: `batch` samples of `image` x `image` pixels, every other one with depth (foreground in
//! a central box), every sample with keypoints, 80% of joints visible, and P DICL cells per sample
//! with depth. Prints one line per timed step and a summary line:
//! `impl=hcmoco ... median_ms=... samples_per_s=...`.

use std::time::{Duration, Instant};

use hcmoco_data::KeypointLayout;
use hcmoco_proto::config::{Dtype, ModelConfig, Norm};
use tch::{Device, Kind, Tensor};

use crate::batch::{Batch, map_side};
use crate::comm::{Communicator, CpuOptions, connect_cpu_alone};
use crate::loss::MemoryBank;
use crate::model::Model;
use crate::train::{Banks, Objective, Trainer, Variant};

/// What `bench step` runs.
#[derive(Debug, Clone)]
pub struct StepBenchSpec {
    pub backbone: String,
    pub batch: usize,
    pub image: i64,
    pub stage: u32,
    pub dicl_points: usize,
    pub threads: i32,
    pub warmup: usize,
    pub iters: usize,
    pub device: Device,
    pub autocast: bool,
    pub norm: Norm,
    /// Memory-bank variant: `Some((dataset size N, negatives K))`; `None`: in-batch.
    pub memory_bank: Option<(i64, usize)>,
}

/// The synthetic batch (deterministic: seeded).
pub fn synthetic_batch(spec: &StepBenchSpec, joints: i64, kind: Kind) -> Batch {
    tch::manual_seed(1234);
    let (b, s) = (spec.batch as i64, spec.image);
    let depth_rows: Vec<i64> = (0..b).filter(|i| i % 2 == 0).collect();
    let bd = depth_rows.len() as i64;
    let depth = Tensor::zeros([bd, 1, s, s], (Kind::Float, Device::Cpu));
    let (lo, hi) = (s / 4, s - s / 4);
    let _ = depth.narrow(2, lo, hi - lo).narrow(3, lo, hi - lo).uniform_(-0.5, 0.5);
    let m = map_side(s);
    let p = spec.dicl_points as i64;
    let (mlo, mhi) = (m / 4, m - m / 4);
    let rows = Tensor::randint_low(mlo, mhi.max(mlo + 1), [bd, p], (Kind::Int64, Device::Cpu));
    let cols = Tensor::randint_low(mlo, mhi.max(mlo + 1), [bd, p], (Kind::Int64, Device::Cpu));
    let visible = Tensor::rand([b * joints], (Kind::Float, Device::Cpu)).lt(0.8);
    let joint_visible: Vec<bool> =
        Vec::<bool>::try_from(&visible).unwrap_or_else(|_| vec![true; (b * joints) as usize]);
    Batch {
        rgb: Tensor::randn([b, 3, s, s], (kind, Device::Cpu)),
        depth: depth.to_kind(kind),
        depth_rows: depth_rows.clone(),
        keypoints: (Tensor::rand([b, joints, 2], (kind, Device::Cpu)) * 2.0 - 1.0),
        has_depth: (0..b).map(|i| i % 2 == 0).collect(),
        has_keypoints: vec![true; b as usize],
        ids: (0..b).collect(),
        slots: (0..b as u64).collect(),
        epoch: 0,
        joint_cells: Tensor::randint(m, [b, joints, 2], (Kind::Int64, Device::Cpu)),
        joint_visible,
        dicl_rows: if spec.stage == 2 { (0..bd).collect() } else { Vec::new() },
        dicl_cells: if spec.stage == 2 { rows * m + cols } else { Tensor::zeros([0, 0], (Kind::Int64, Device::Cpu)) },
    }
}

fn world_of_one(device: Device) -> anyhow::Result<Box<dyn Communicator>> {
    let timeout = Duration::from_secs(60);
    Ok(match device {
        Device::Cuda(index) => {
            let id = crate::comm::nccl::nccl_unique_id()?;
            Box::new(crate::comm::nccl::connect_nccl(0, 1, 1, &id, index, timeout)?)
        }
        _ => Box::new(connect_cpu_alone(&CpuOptions { timeout, ..CpuOptions::default() })?),
    })
}

/// Runs the benchmark and prints its lines.
pub fn run(spec: &StepBenchSpec) -> anyhow::Result<()> {
    tch::set_num_threads(spec.threads);
    let layout = KeypointLayout::Mpii16;
    let cfg = ModelConfig { backbone: spec.backbone.clone(), norm: spec.norm, dtype: Dtype::F32, ..Default::default() };
    let model = Model::new(&cfg, layout, 0, spec.device)?;
    let (variant, negatives) = match spec.memory_bank {
        Some((_, k)) => (Variant::MemoryBank, k),
        None => (Variant::InBatch, 0),
    };
    let objective = Objective { stage: spec.stage, variant, temperature: 0.07, negatives, seed: 0 };
    // Every sample of the N-sample dataset eligible for every modality; the batch holds ids 0..B.
    let banks = match spec.memory_bank {
        Some((n, _)) => {
            anyhow::ensure!(
                n > spec.batch as i64,
                "--bank-samples {n}: the batch holds ids 0..{}: more are needed",
                spec.batch
            );
            let bank = MemoryBank::new(n, i64::from(cfg.embed_dim), 0, model.kind, spec.device);
            Some(Banks::new(bank, std::array::from_fn(|_| (0..n).collect()))?)
        }
        None => None,
    };
    let mut comm = world_of_one(spec.device)?;
    let joints = layout.num_joints() as i64;
    let mut trainer = Trainer::new(model, 0.9, 1e-4, objective, banks, joints, 25 << 20);
    trainer.autocast = spec.autocast;
    let batch = synthetic_batch(spec, joints, Kind::Float).to_device(spec.device);
    let sync = || {
        if let Device::Cuda(i) = spec.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::with_capacity(spec.iters);
    let mut undo = Vec::with_capacity(spec.iters);
    for i in 0..spec.warmup + spec.iters {
        sync();
        let t = Instant::now();
        let out = trainer.step(comm.as_mut(), &batch, None, 0.01)?;
        sync();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i >= spec.warmup {
            println!(
                "step={} ms={ms:.2} loss={:.4} undo_ms={:.3}",
                i - spec.warmup,
                out.total,
                out.undo.as_secs_f64() * 1e3
            );
            times.push(ms);
            undo.push(out.undo.as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    undo.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let undo_median = undo.get(undo.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "impl=hcmoco backbone={} batch={} image={} stage={} variant={} threads={} device={:?} autocast={} median_ms={median:.2} samples_per_s={:.1} undo_median_ms={undo_median:.3}",
        spec.backbone,
        spec.batch,
        spec.image,
        spec.stage,
        spec.memory_bank.map_or("in_batch".to_string(), |(n, k)| format!("memory_bank(N={n},K={k})")),
        spec.threads,
        spec.device,
        spec.autocast,
        spec.batch as f64 / (median / 1e3)
    );
    Ok(())
}
