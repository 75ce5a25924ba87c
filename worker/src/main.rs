//! `hcmoco-worker`: a training worker, plus data tools.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hcmoco_worker::run::{RunOptions, run};

#[derive(Parser)]
#[command(name = "hcmoco-worker", version, about = "hcmoco training worker")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join a job on a coordinator and train until it ends.
    Run {
        /// Coordinator address (host:port or http://host:port).
        #[arg(long, env = "HCMOCO_COORDINATOR")]
        coordinator: String,
        /// Job to join (default: the coordinator's only open job).
        #[arg(long)]
        job: Option<String>,
        /// Identity of this machine; ranks sharing a host id are placed next to each other.
        #[arg(long, env = "HCMOCO_HOST_ID")]
        host_id: Option<String>,
        /// Address the collective listener binds.
        #[arg(long, env = "HCMOCO_BIND", default_value = "127.0.0.1:0")]
        bind: String,
        /// Address peers use to reach this worker (required when --bind is 0.0.0.0 on a multi-NIC host).
        #[arg(long, env = "HCMOCO_ADVERTISE_ADDR")]
        advertise_addr: Option<String>,
        /// Keep trying to reach the coordinator for this many seconds, then exit non-zero.
        #[arg(long, default_value_t = 30.0)]
        connect_timeout_secs: f64,
        /// Write this rank's final parameters, buffers, momentum and memory banks to DIR/rank-R.safetensors.
        #[arg(long)]
        dump_state: Option<PathBuf>,
        /// cpu or cuda:N (default: cpu; with the nccl backend, the GPU of this worker's local rank).
        #[arg(long, env = "HCMOCO_DEVICE")]
        device: Option<String>,
        /// Append one JSON object per line for every applied and every undone step (`event`, `epoch`,
        /// `step`, `generation`, `rank`, `slots`): what this worker really trained, for audits.
        #[arg(long)]
        trace_slots: Option<PathBuf>,
    },
    /// Check the NCCL backend on one GPU (world size 1): every collective against expected values.
    NcclCheck {
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Collective benchmarks (one process per rank).
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
    /// Write the RGB or depth encoder of a checkpoint as a PyTorch-loadable safetensors file.
    Export {
        /// A checkpoint step directory, a checkpoint directory (its `latest` is used), or a model.safetensors.
        #[arg(long)]
        checkpoint: PathBuf,
        /// rgb or depth.
        #[arg(long)]
        modality: String,
        #[arg(long)]
        output: PathBuf,
    },
    /// Run an exported encoder on an input tensor; write its four branch maps (branch1..branch4).
    Encode {
        /// An encoder written by `export`.
        #[arg(long)]
        weights: PathBuf,
        /// A safetensors file holding one N x C x H x W float tensor (or one named `input`).
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Evaluate the in-batch objective and its gradients on given features (docs/loss-eval.md).
    LossEval {
        /// safetensors with z_rgb, z_depth, z_kp, has_depth, dense_rgb, dense_depth, pixel_idx, g_kp,
        /// joint_cells, joint_vis (and optionally has_kp).
        #[arg(long)]
        input: PathBuf,
        /// safetensors written with the eleven loss_* terms, loss_total and the grad_* tensors.
        #[arg(long)]
        output: PathBuf,
        /// Temperature of every term.
        #[arg(long, default_value_t = 0.07)]
        tau: f64,
    },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCmd,
    },
}

#[derive(clap::Args, Clone)]
struct BenchArgs {
    /// Ranks (processes) on this machine.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// `cpu` (the TCP ring).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Comma-separated byte counts (suffixes K, M, G allowed).
    #[arg(long, default_value = "16777216,67108864")]
    sizes: String,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// f32, f64 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// For `grads`: bucket size in MiB (0: one all-reduce per tensor).
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    /// auto (shared memory between these same-host ranks), tcp or shm.
    #[arg(long, default_value = "auto")]
    transport: String,
}

impl BenchArgs {
    fn spec(&self, op: &str) -> anyhow::Result<hcmoco_worker::bench::BenchSpec> {
        Ok(hcmoco_worker::bench::BenchSpec {
            op: op.to_string(),
            world: self.world,
            backend: self.backend.clone(),
            sizes: hcmoco_worker::bench::parse_sizes(&self.sizes)?,
            iters: self.iters,
            warmup: self.warmup,
            dtype: self.dtype.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            bucket_mb: self.bucket_mb,
            transport: self.transport.clone(),
        })
    }
}

#[derive(clap::Args, Clone)]
struct StepArgs {
    /// hrnet_small or hrnet_w18.
    #[arg(long, default_value = "hrnet_small")]
    backbone: String,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 64)]
    image: i64,
    /// 1 (sample-level terms) or 2 (all terms).
    #[arg(long, default_value_t = 2)]
    stage: u32,
    #[arg(long, default_value_t = 400)]
    dicl_points: usize,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run the encoders under bfloat16 autocast.
    #[arg(long)]
    bf16: bool,
    /// batch or group.
    #[arg(long, default_value = "batch")]
    norm: String,
    /// The memory-bank variant with a bank of this many samples (0: in-batch).
    #[arg(long, default_value_t = 0)]
    bank_samples: i64,
    /// Memory-bank variant: negatives per anchor.
    #[arg(long, default_value_t = 16384)]
    negatives: usize,
}

impl StepArgs {
    fn spec(&self) -> anyhow::Result<hcmoco_worker::bench_step::StepBenchSpec> {
        let norm = match self.norm.as_str() {
            "batch" => hcmoco_proto::config::Norm::Batch,
            "group" => hcmoco_proto::config::Norm::Group,
            other => anyhow::bail!("--norm {other:?}: expected batch or group"),
        };
        anyhow::ensure!(self.stage == 1 || self.stage == 2, "--stage {}: expected 1 or 2", self.stage);
        Ok(hcmoco_worker::bench_step::StepBenchSpec {
            backbone: self.backbone.clone(),
            batch: self.batch,
            image: self.image,
            stage: self.stage,
            dicl_points: self.dicl_points,
            threads: self.threads,
            warmup: self.warmup,
            iters: self.iters,
            device: hcmoco_worker::run::parse_device(&self.device)?,
            autocast: self.bf16,
            norm,
            memory_bank: (self.bank_samples > 0).then_some((self.bank_samples, self.negatives)),
        })
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// All-reduce bandwidth: `bytes=... time_ms=... algbw_GBps=... busbw_GBps=...` per size.
    Allreduce(BenchArgs),
    /// Reducing the default model's gradients: fused buckets (--bucket-mb) against per tensor (0).
    Grads(BenchArgs),
    /// Sample loading: decode + augment with the loader pool (compare: scripts/bench_loader.py).
    Loader {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 2048)]
        samples: u64,
        #[arg(long, default_value_t = 32)]
        batch: u64,
        /// Crop size (0: decode only, no augmentation).
        #[arg(long, default_value_t = 64)]
        image_size: u32,
    },
    /// One training step (forward, every loss term of the stage, backward, SGD) of the real model on a
    /// synthetic batch, world size 1 (compare: scripts/bench_step.py).
    Step(StepArgs),
    /// One rank of a benchmark (spawned by the two above).
    #[command(hide = true)]
    Rank {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        op: String,
        #[command(flatten)]
        args: BenchArgs,
    },
}

#[derive(Subcommand)]
enum ConvertSource {
    /// COCO person keypoints (annotation JSON + images) -> RGB + keypoints, COCO-13.
    Coco {
        #[arg(long)]
        annotations: PathBuf,
        #[arg(long)]
        images: PathBuf,
    },
    /// MPII (the HRNet JSON form of the annotations + images) -> RGB + keypoints, MPII-16.
    Mpii {
        #[arg(long)]
        annotations: PathBuf,
        #[arg(long)]
        images: PathBuf,
    },
    /// NTU RGB+D style (rgb/, depth/, skeleton/ under ROOT) -> RGB + depth + keypoints.
    Ntu {
        #[arg(long)]
        root: PathBuf,
        /// mpii16 or coco13.
        #[arg(long, default_value = "mpii16")]
        layout: String,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Print a dataset's counts, modalities, layout and shards.
    Inspect { manifest: PathBuf },
    /// Check every shard's checksum and that every sample decodes.
    Verify { manifest: PathBuf },
    /// Convert a real dataset into shards + manifest (person-centred crops).
    Convert {
        #[command(subcommand)]
        source: ConvertSource,
        /// Output directory (shards and manifest.json).
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        /// Crops are resized so their longer side is at most this (0: keep).
        #[arg(long, global = true, default_value_t = 320)]
        max_side: u32,
        #[arg(long, global = true, default_value_t = 256)]
        shard_size: u64,
    },
    /// Generate synthetic multi-modal humans (RGB, depth for a share of them, 2D keypoints).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 512)]
        samples: u64,
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Share of samples that have depth.
        #[arg(long, default_value_t = 0.5)]
        depth_fraction: f32,
        /// Store RGB as JPEG of this quality (default: PNG).
        #[arg(long)]
        jpeg_quality: Option<u8>,
    },
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HCMOCO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match Cli::parse().command {
        Cmd::Run {
            coordinator,
            job,
            host_id,
            bind,
            advertise_addr,
            connect_timeout_secs,
            dump_state,
            device,
            trace_slots,
        } => run(RunOptions {
            coordinator,
            job,
            host_id: host_id.unwrap_or_else(host_name),
            bind,
            advertise_addr,
            connect_timeout: match Duration::try_from_secs_f64(connect_timeout_secs) {
                Ok(d) => d,
                Err(_) => {
                    eprintln!(
                        "error: --connect-timeout-secs {connect_timeout_secs}: expected a finite number of seconds >= 0"
                    );
                    std::process::exit(2);
                }
            },
            dump_state,
            device,
            trace_slots,
        })
        .map(|s| {
            let how = match s.ending {
                hcmoco_worker::run::Ending::Completed => "done",
                hcmoco_worker::run::Ending::Left => "left",
                hcmoco_worker::run::Ending::Released => "released",
            };
            eprintln!(
                "worker {} (rank {}) {how}: job {} at step {}, last loss {:?}",
                s.worker_id, s.rank, s.job_id, s.steps, s.last_loss
            )
        }),
        Cmd::NcclCheck { device } => hcmoco_worker::comm::nccl::self_check(device).map(|report| println!("{report}")),
        Cmd::Bench { command } => match command {
            BenchCmd::Allreduce(a) => a.spec("allreduce").and_then(|s| hcmoco_worker::bench::run_parent(&s)),
            BenchCmd::Grads(a) => a.spec("grads").and_then(|s| hcmoco_worker::bench::run_parent(&s)),
            BenchCmd::Loader { manifest, threads, samples, batch, image_size } => {
                hcmoco_worker::bench::run_loader(&manifest, threads, samples, batch, image_size)
            }
            BenchCmd::Rank { rank, op, args } => args
                .spec(&op)
                .and_then(|s| hcmoco_worker::bench::run_rank(&s, rank))
                .map_err(|e| e.context(format!("rank {rank} failed"))),
            BenchCmd::Step(a) => a.spec().and_then(|s| hcmoco_worker::bench_step::run(&s)),
        },
        Cmd::Export { checkpoint, modality, output } => modality
            .parse::<hcmoco_worker::export::ImageModality>()
            .and_then(|m| hcmoco_worker::export::export(&checkpoint, m, &output))
            .map(|r| {
                println!(
                    "wrote the {} encoder ({}, {} tensors, norm {}, upsample {}) of {} to {}",
                    r.meta.modality,
                    r.meta.backbone,
                    r.tensors,
                    hcmoco_worker::export::norm_name(r.meta.norm),
                    r.meta.upsample,
                    r.model.display(),
                    output.display()
                )
            }),
        Cmd::Encode { weights, input, output, device } => hcmoco_worker::run::parse_device(&device)
            .and_then(|d| hcmoco_worker::export::encode(&weights, &input, &output, d))
            .map(|shapes| println!("wrote branch1..branch4 {shapes:?} to {}", output.display())),
        Cmd::LossEval { input, output, tau } => hcmoco_worker::loss_eval::run(&input, &output, tau)
            .map(|values| values.iter().for_each(|(name, v)| println!("{name} {v}")))
            .map_err(anyhow::Error::from),
        Cmd::Data { command: DataCmd::Inspect { manifest } } => inspect(&manifest),
        Cmd::Data { command: DataCmd::Verify { manifest } } => verify(&manifest),
        Cmd::Data { command: DataCmd::Convert { source, out, max_side, shard_size } } => {
            convert(source, out, max_side, shard_size)
        }
        Cmd::Data { command: DataCmd::Synth { out, samples, size, seed, depth_fraction, jpeg_quality } } => {
            let cfg = hcmoco_data::SynthConfig {
                samples,
                image_size: size,
                seed,
                depth_fraction,
                rgb_jpeg_quality: jpeg_quality,
                ..Default::default()
            };
            // Progress on stderr (one line, redrawn on a terminal), throughput at the end.
            let started = std::time::Instant::now();
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let progress = |done: u64, total: u64| {
                if tty {
                    eprint!("\r  {done}/{total} samples ({:.0}%)", 100.0 * done as f64 / total.max(1) as f64);
                }
            };
            hcmoco_data::generate_with_progress(&cfg, &out, &progress)
                .map(|m| {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    if tty {
                        eprintln!();
                    }
                    println!(
                        "wrote {} samples in {} shards to {} in {secs:.2}s ({:.0} samples/s, {} threads)",
                        m.samples,
                        m.shards.len(),
                        out.display(),
                        m.samples as f64 / secs,
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    )
                })
                .map_err(anyhow::Error::from)
        }
    };
    if let Err(e) = result {
        // One write: benchmark ranks share a stderr, and their lines must not interleave.
        use std::io::Write;
        let _ = std::io::stderr().write_all(format!("error: {e:#}\n").as_bytes());
        std::process::exit(1);
    }
}

fn inspect(path: &std::path::Path) -> anyhow::Result<()> {
    let d = hcmoco_data::Dataset::open(path)?;
    let m = d.manifest();
    println!("dataset {} ({})", m.name, path.display());
    println!("  samples {}  with depth {}  without depth {}", m.samples, m.with_depth(), m.samples - m.with_depth());
    println!("  modalities {}", m.modalities.join(", "));
    println!("  keypoint layout {} ({} joints)", m.layout, m.layout.num_joints());
    println!("  images {}x{}", m.image_width, m.image_height);
    println!("  shards {}", m.shards.len());
    for s in &m.shards {
        println!(
            "    {}  {} samples, {} with depth, sha256 {}",
            s.path,
            s.samples,
            s.with_depth,
            &s.sha256[..12.min(s.sha256.len())]
        );
    }
    Ok(())
}

fn verify(path: &std::path::Path) -> anyhow::Result<()> {
    let d = hcmoco_data::Dataset::open(path)?;
    d.verify()?;
    let n = d.len();
    for i in 0..n {
        d.get(i)?;
        if (i + 1) % 1000 == 0 {
            eprintln!("  {} of {n} samples decoded", i + 1);
        }
    }
    println!("ok: {} shards match their checksums, {n} samples decode", d.manifest().shards.len());
    Ok(())
}

fn convert(source: ConvertSource, out: Option<PathBuf>, max_side: u32, shard_size: u64) -> anyhow::Result<()> {
    use hcmoco_data::convert::{ConvertOptions, convert_coco, convert_mpii, convert_ntu};
    let out = out.ok_or_else(|| anyhow::anyhow!("--out DIR is required"))?;
    let name = |n: &str| ConvertOptions { name: n.into(), max_side, shard_size, ..ConvertOptions::default() };
    let report = match source {
        ConvertSource::Coco { annotations, images } => convert_coco(&annotations, &images, &out, &name("coco"))?,
        ConvertSource::Mpii { annotations, images } => convert_mpii(&annotations, &images, &out, &name("mpii"))?,
        ConvertSource::Ntu { root, layout } => {
            let layout: hcmoco_data::KeypointLayout =
                layout.parse().map_err(|e| anyhow::anyhow!("--layout {layout:?}: {e}"))?;
            convert_ntu(&root, &out, layout, &name("ntu"))?
        }
    };
    println!("wrote {} samples ({} with depth) to {}", report.samples, report.with_depth, out.display());
    for (reason, count) in &report.skipped {
        println!("  skipped {count}: {reason}");
    }
    Ok(())
}
