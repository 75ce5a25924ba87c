//! `hcmoco-worker run`: the worker process's life.
//!
//! Control (gRPC to the coordinator, heartbeats) runs on a small tokio runtime; tensor compute and
//! collectives run on one dedicated OS thread (the training thread), which calls the coordinator by
//! blocking on the runtime's handle from outside it. Order: connect (bounded retries) -> bind the
//! collective listener -> Join -> Rendezvous (long poll) -> form the communicator -> broadcast rank 0's
//! weights -> steps (fetch work, load, train, checkpoint on rank 0, report) -> done.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hcmoco_data::Dataset;
use hcmoco_proto::JobConfig;
use hcmoco_proto::pb;
use hcmoco_proto::pb::worker_service_client::WorkerServiceClient;
use tch::{Device, Tensor};
use tokio::runtime::{Handle, Runtime};
use tonic::transport::{Channel, Endpoint};

use crate::batch::{self, BatchOptions, SampleTag};
use crate::checkpoint::{self, CheckpointMeta};
use crate::comm::{AbortHandle, Communicator, CpuOptions, PeerInfo, connect_cpu_with};
use crate::export::ImageModality;
use crate::loader::{Loader, Request};
use crate::loss::MemoryBank;
use crate::model::Model;
use crate::train::{Banks, Objective, Trainer, Variant};
use hcmoco_data::augment::AugmentConfig;

/// How a worker process is started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub coordinator: String,
    pub job: Option<String>,
    pub host_id: String,
    /// Where the collective listener binds (`127.0.0.1:0` by default).
    pub bind: String,
    /// The address peers use to reach this worker's collective listener (multi-NIC hosts).
    pub advertise_addr: Option<String>,
    /// How long to keep trying to reach the coordinator before giving up.
    pub connect_timeout: Duration,
    /// Write this rank's final parameters and buffers to `DIR/rank-R.safetensors` (replica checks).
    pub dump_state: Option<PathBuf>,
    /// `cpu` or `cuda:N`; default: `cpu` for the cpu backend, `cuda:<local rank>` for nccl.
    pub device: Option<String>,
}

/// Parses `cpu` / `cuda:N`.
pub fn parse_device(text: &str) -> anyhow::Result<Device> {
    match text {
        "cpu" => Ok(Device::Cpu),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("device {text:?}: expected \"cpu\" or \"cuda:N\""),
        },
    }
}

/// What a finished worker reports.
#[derive(Debug)]
pub struct RunSummary {
    pub job_id: String,
    pub worker_id: String,
    pub rank: u32,
    pub steps: u64,
    pub last_loss: Option<f64>,
}

/// Upper bound of any single call to the coordinator.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects and joins, retrying transport failures with backoff until `timeout`.
async fn connect_and_join(
    opts: &RunOptions,
    collective_addr: &str,
) -> anyhow::Result<(WorkerServiceClient<Channel>, pb::JoinResponse)> {
    let endpoint = Endpoint::from_shared(hcmoco_proto::endpoint_uri(&opts.coordinator))
        .with_context(|| format!("bad coordinator address {:?}", opts.coordinator))?;
    // Every call is bounded (the longest, a rendezvous long poll, answers within ~10 s), so a
    // black-holed coordinator cannot hang the training thread.
    let endpoint = endpoint.connect_timeout(Duration::from_secs(2)).timeout(RPC_TIMEOUT).tcp_nodelay(true);
    let deadline = Instant::now() + opts.connect_timeout;
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last_error = match endpoint.connect().await {
            Ok(channel) => {
                let mut client = WorkerServiceClient::new(channel);
                let req = pb::JoinRequest {
                    job_id: opts.job.clone().unwrap_or_default(),
                    host_id: opts.host_id.clone(),
                    collective_addr: collective_addr.to_string(),
                    device: "cpu".into(),
                    pid: std::process::id(),
                };
                match client.join(req).await {
                    Ok(resp) => return Ok((client, resp.into_inner())),
                    Err(s) if s.code() == tonic::Code::Unavailable => s.message().to_string(),
                    Err(s) => bail!(
                        "the coordinator at {} refused to let this worker join: {}",
                        opts.coordinator,
                        s.message()
                    ),
                }
            }
            Err(e) => format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()),
        };
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "could not reach the coordinator at {} within {:.0?} ({attempts} attempts); last error: {last_error}",
                opts.coordinator,
                opts.connect_timeout
            );
        }
        tracing::debug!(attempts, error = %last_error, "coordinator not reachable yet, retrying");
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Shared between the heartbeat task and the training thread: why the worker must stop, if it must,
/// and the communicator to abort so that a rank blocked in a collective stops at once.
#[derive(Default)]
struct Stop {
    reason: Mutex<Option<String>>,
    abort: Mutex<Option<AbortHandle>>,
}

impl Stop {
    fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records why the worker must stop (the first reason wins) and aborts the communicator.
    fn trigger(&self, why: String) {
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why).clone();
        if let Some(h) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h.abort(&reason);
        }
    }

    /// Registers the communicator's abort handle (aborting at once if a stop already came).
    fn set_abort(&self, handle: AbortHandle) {
        if let Some(reason) = self.reason() {
            handle.abort(&reason);
        }
        *self.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }
}

type StopFlag = Arc<Stop>;

#[allow(clippy::too_many_arguments)]
fn spawn_heartbeats(
    rt: &Runtime,
    mut client: WorkerServiceClient<Channel>,
    worker_id: String,
    interval: Duration,
    silence_limit: Duration,
    generation: Arc<Mutex<u64>>,
    step: Arc<AtomicU64>,
    stop: StopFlag,
) {
    rt.spawn(async move {
        let mut last_ok = Instant::now();
        // A heartbeat that does not answer within this long counts as missed.
        let call_limit = interval.max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(interval).await;
            let gen_now = *generation.lock().unwrap_or_else(|p| p.into_inner());
            let req = pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                generation: gen_now,
                step: step.load(Ordering::Relaxed),
            };
            let error = match tokio::time::timeout(call_limit, client.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    last_ok = Instant::now();
                    let r = r.into_inner();
                    if r.stop {
                        stop.trigger(r.message);
                        return;
                    }
                    continue;
                }
                Ok(Err(s)) => s.message().to_string(),
                Err(_) => format!("no answer within {call_limit:.0?}"),
            };
            if last_ok.elapsed() > silence_limit {
                stop.trigger(format!("lost contact with the coordinator for {:.0?}: {error}", last_ok.elapsed()));
                return;
            }
        }
    });
}

/// Runs a worker to the end of its job.
pub fn run(opts: RunOptions) -> anyhow::Result<RunSummary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let listener = TcpListener::bind(&opts.bind)
        .with_context(|| format!("cannot bind the collective listener on {}", opts.bind))?;
    let local = listener.local_addr()?;
    let collective_addr = match &opts.advertise_addr {
        Some(a) => a.clone(),
        None if local.ip().is_unspecified() => bail!(
            "--bind {} listens on every interface: pass --advertise-addr HOST:PORT so peers know which one to use",
            opts.bind
        ),
        None => local.to_string(),
    };

    let (client, joined) = rt.block_on(connect_and_join(&opts, &collective_addr))?;
    let config = JobConfig::from_toml(&joined.job_config_toml)
        .context("the coordinator sent a job config this worker cannot read")?;
    tracing::info!(job = %joined.job_id, worker = %joined.worker_id, "joined");
    eprintln!("worker {} joined job {} (collective address {collective_addr})", joined.worker_id, joined.job_id);

    let generation = Arc::new(Mutex::new(0u64));
    let stop: StopFlag = Arc::new(Stop::default());
    let current_step = Arc::new(AtomicU64::new(0));
    spawn_heartbeats(
        &rt,
        client.clone(),
        joined.worker_id.clone(),
        Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(1))),
        Duration::from_millis(config.heartbeat.timeout_ms),
        generation.clone(),
        current_step.clone(),
        stop.clone(),
    );

    // The collective bootstrap this worker offers; the coordinator hands rank 0's to every member.
    let offer = match config.collective.backend.as_str() {
        "nccl" => crate::comm::nccl::nccl_unique_id().context("collective.backend = \"nccl\"")?,
        _ => Vec::new(),
    };
    // Rendezvous: long polls until this worker's generation is sealed.
    let assignment = rt.block_on(async {
        let mut c = client.clone();
        loop {
            if let Some(why) = stop.reason() {
                bail!("stopped before training: {why}");
            }
            let r = c
                .rendezvous(pb::RendezvousRequest {
                    worker_id: joined.worker_id.clone(),
                    generation: 0,
                    collective_bootstrap: offer.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("rendezvous failed: {}", s.message()))?
                .into_inner();
            if r.ready {
                return Ok(r);
            }
        }
    })?;
    *generation.lock().unwrap_or_else(|p| p.into_inner()) = assignment.generation;
    eprintln!("generation {}: rank {} of {}", assignment.generation, assignment.rank, assignment.world_size);

    current_step.store(assignment.start_step, Ordering::Relaxed);
    let ctx = TrainContext {
        current_step: current_step.clone(),
        handle: rt.handle().clone(),
        client: client.clone(),
        worker_id: joined.worker_id.clone(),
        job_id: joined.job_id.clone(),
        config,
        job_toml: joined.job_config_toml.clone(),
        assignment,
        stop: stop.clone(),
        dump_state: opts.dump_state.clone(),
        device: opts.device.clone(),
    };
    // Tensor work on its own OS thread, never on the runtime's workers.
    let trainer = std::thread::Builder::new().name("hcmoco-train".into()).spawn(move || train_loop(ctx, listener))?;
    // A panic on the training thread (libtorch refusing an operation) is a failure like any other:
    // it is reported with its message.
    let result = trainer.join().unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(anyhow::anyhow!("the training thread panicked: {what}"))
    });
    // A peer that was told to stop first (a cancel, a failure elsewhere) closes its connections before
    // this rank's next heartbeat: a collective error here may be the echo of a stop. Ask the coordinator
    // once, so the error leads with the job's reason rather than with the closed connection.
    let result = match result {
        Err(e) if stop.reason().is_none() => {
            let req = pb::HeartbeatRequest {
                worker_id: joined.worker_id.clone(),
                generation: *generation.lock().unwrap_or_else(|p| p.into_inner()),
                step: current_step.load(Ordering::Relaxed),
            };
            let mut c = client.clone();
            match rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), c.heartbeat(req)).await }) {
                Ok(Ok(resp)) if resp.get_ref().stop => {
                    let why = resp.into_inner().message;
                    Err(e.context(format!("stopping: {why}")))
                }
                _ => Err(e),
            }
        }
        other => other,
    };
    if let Err(e) = &result {
        // Best effort: tell the coordinator, so the job's status names the failure.
        let req = pb::ReportFailureRequest {
            worker_id: joined.worker_id.clone(),
            generation: *generation.lock().unwrap_or_else(|p| p.into_inner()),
            step: current_step.load(Ordering::Relaxed),
            message: format!("{e:#}"),
            failed_rank: e
                .chain()
                .find_map(|c| c.downcast_ref::<crate::comm::CommError>())
                .and_then(|c| c.peer_rank())
                .map_or(-1, |r| r as i32),
        };
        let mut c = client;
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), c.report_failure(req)).await });
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

struct TrainContext {
    /// The step being trained, for failure reports.
    current_step: Arc<AtomicU64>,
    handle: Handle,
    client: WorkerServiceClient<Channel>,
    worker_id: String,
    job_id: String,
    config: JobConfig,
    job_toml: String,
    assignment: pb::RendezvousResponse,
    stop: StopFlag,
    dump_state: Option<PathBuf>,
    device: Option<String>,
}

impl TrainContext {
    fn call<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(WorkerServiceClient<Channel>) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<T> {
        let client = self.client.clone();
        self.handle
            .block_on(f(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| anyhow::anyhow!("{what} refused by the coordinator: {}", s.message()))
    }
}

fn train_loop(ctx: TrainContext, listener: TcpListener) -> anyhow::Result<RunSummary> {
    let cfg = &ctx.config;
    tch::set_num_threads(cfg.runtime.torch_threads as i32);
    let a = &ctx.assignment;
    let (rank, world) = (a.rank, a.world_size);
    let generation = a.generation;
    let span = tracing::info_span!("train", job = %ctx.job_id, worker = %ctx.worker_id, generation, rank);
    let _entered = span.enter();

    // Datasets: the layout and image size must agree across the job's datasets (checked here, once).
    let mut datasets = Vec::new();
    for (i, d) in cfg.data.datasets.iter().enumerate() {
        datasets.push(
            Dataset::open(std::path::Path::new(&d.manifest))
                .with_context(|| format!("data.datasets[{i}]: cannot open {}", d.manifest))?,
        );
    }
    let first = datasets.first().context("the job lists no dataset")?.manifest().clone();
    for (i, d) in datasets.iter().enumerate() {
        let m = d.manifest();
        if m.layout != first.layout {
            bail!(
                "data.datasets[{i}] uses keypoint layout {} but data.datasets[0] uses {}: one layout per job",
                m.layout,
                first.layout
            );
        }
        let fixed = m.image_width > 0 && (m.image_width, m.image_height) == (first.image_width, first.image_height);
        if cfg.data.image_size == 0 && !fixed {
            bail!(
                "data.image_size = 0 trains on images as stored, which needs one image size: data.datasets[{i}] has {}x{}, data.datasets[0] {}x{} (0 = varies); set data.image_size",
                m.image_width,
                m.image_height,
                first.image_width,
                first.image_height
            );
        }
    }
    let image_size = match cfg.data.image_size {
        0 => (first.image_width, first.image_height),
        s => (s, s),
    };
    let augment_cfg = (cfg.data.image_size > 0).then(|| AugmentConfig {
        size: cfg.data.image_size,
        scale_min: cfg.data.crop_scale_min,
        scale_max: cfg.data.crop_scale_max,
        scale_jitter: cfg.data.scale_jitter,
        rotation_deg: cfg.data.rotation_deg,
        ..AugmentConfig::default()
    });

    let epoch_len: u64 = datasets.iter().map(Dataset::len).sum();
    // Global sample ids: each dataset's samples follow those of the datasets before it.
    let dataset_offsets: Vec<i64> = datasets
        .iter()
        .scan(0i64, |next, d| {
            let start = *next;
            *next += d.len() as i64;
            Some(start)
        })
        .collect();
    let eligible =
        (cfg.loss.variant == "memory_bank").then(|| bank_eligibility(&datasets, &dataset_offsets)).transpose()?;
    let mut loader = Loader::new(Arc::new(datasets), augment_cfg, cfg.seed, cfg.data.loader_threads as usize);
    let timeout = Duration::from_millis(cfg.collective.timeout_ms);
    // Device: --device, else the local rank's GPU for NCCL (ranks sharing a host), else the CPU.
    let local_rank = a.peers.iter().take(rank as usize).filter(|p| p.host_id == a.peers[rank as usize].host_id).count();
    let device = match (&ctx.device, cfg.collective.backend.as_str()) {
        (Some(d), _) => parse_device(d)?,
        (None, "nccl") => Device::Cuda(local_rank),
        (None, _) => Device::Cpu,
    };
    let comm: Box<dyn Communicator> = match (cfg.collective.backend.as_str(), device) {
        ("nccl", Device::Cuda(index)) => {
            drop(listener);
            Box::new(
                crate::comm::nccl::connect_nccl(
                    rank as usize,
                    world as usize,
                    generation,
                    &a.collective_bootstrap,
                    index,
                    timeout,
                )
                .context("cannot form the NCCL communicator")?,
            )
        }
        ("nccl", d) => bail!("collective.backend = \"nccl\" needs a CUDA device, not {d:?}"),
        (_, Device::Cpu) => {
            let peers: Vec<PeerInfo> = a
                .peers
                .iter()
                .map(|p| PeerInfo { addr: p.collective_addr.clone(), host_id: p.host_id.clone() })
                .collect();
            let opts = CpuOptions { transport: cfg.collective.transport.parse()?, timeout, ..CpuOptions::default() };
            Box::new(
                connect_cpu_with(listener, rank as usize, &peers, generation, &opts)
                    .context("cannot form the collective ring")?,
            )
        }
        (backend, d) => bail!("collective.backend = {backend:?} works on CPU tensors; device {d:?} needs \"nccl\""),
    };
    // A stop from the coordinator (job failed or cancelled) aborts a collective this rank is blocked in.
    ctx.stop.set_abort(comm.abort_handle());
    let model = Model::new(&cfg.model, first.layout, cfg.seed, device)?;
    let bucket_bytes = (cfg.collective.bucket_mb * 1048576.0) as usize;
    let objective = Objective {
        stage: cfg.loss.stage,
        variant: if cfg.loss.variant == "memory_bank" { Variant::MemoryBank } else { Variant::InBatch },
        temperature: cfg.loss.temperature,
        negatives: cfg.loss.negatives as usize,
        seed: cfg.seed,
    };
    let banks = eligible
        .map(|eligible| {
            let bank = MemoryBank::new(epoch_len as i64, i64::from(cfg.model.embed_dim), cfg.seed, model.kind, device);
            Banks::new(bank, eligible)
        })
        .transpose()?;
    let joints = first.layout.num_joints() as i64;
    let mut trainer = Trainer::new(
        model,
        comm,
        cfg.optimizer.momentum,
        cfg.optimizer.weight_decay,
        objective,
        banks,
        joints,
        bucket_bytes,
    );
    trainer.autocast = cfg.runtime.autocast == "bf16";
    if !cfg.model.init_checkpoint.is_empty() {
        init_from_checkpoint(&mut trainer, std::path::Path::new(&cfg.model.init_checkpoint))
            .with_context(|| format!("model.init_checkpoint = {:?}", cfg.model.init_checkpoint))?;
    }
    for (modality, path) in
        [(ImageModality::Rgb, &cfg.model.init_rgb_backbone), (ImageModality::Depth, &cfg.model.init_depth_backbone)]
    {
        if !path.is_empty() {
            trainer
                .model
                .load_backbone(modality, std::path::Path::new(path))
                .with_context(|| format!("model.init_{}_backbone = {path:?}", modality.as_str()))?;
        }
    }
    // Rank 0's weights, statistics and memory banks everywhere.
    trainer.broadcast_initial_state().context("cannot broadcast rank 0's initial weights")?;
    eprintln!("rank {rank}: ring formed, weights synchronised");

    let fetch = |step: u64| {
        ctx.call("fetch work", async |mut c| {
            c.fetch_work(pb::FetchWorkRequest { worker_id: ctx.worker_id.clone(), generation, step }).await
        })
    };
    let mut prefetched: Option<pb::FetchWorkResponse> = None;
    let skip_bad = cfg.data.on_error == "skip";
    let names = trainer.objective.term_names();
    let batch_opts = BatchOptions {
        layout: first.layout,
        image_size,
        kind: trainer.model.kind,
        dicl_points: if cfg.loss.stage == 2 { cfg.loss.dicl_points as usize } else { 0 },
        seed: cfg.seed,
    };
    let mut step = a.start_step;
    let mut last_loss = None;
    loop {
        if let Some(why) = ctx.stop.reason() {
            bail!("stopping: {why}");
        }
        ctx.current_step.store(step, Ordering::Relaxed);
        let t0 = Instant::now();
        let work = match prefetched.take() {
            Some(w) if w.step == step => w,
            _ => fetch(step)?,
        };
        if work.done {
            if !work.message.is_empty() {
                bail!("{}", work.message);
            }
            break;
        }
        loader.submit(step, requests(step, &work)?)?;
        // Prefetch: the next step's work and samples load while this one trains.
        if step + 1 < cfg.steps {
            let next = fetch(step + 1)?;
            if !next.done {
                loader.submit(step + 1, requests(step + 1, &next)?)?;
            }
            prefetched = Some(next);
        }
        let mut samples = Vec::new();
        let mut tags = Vec::new();
        let mut skipped = 0u32;
        for (loaded, s) in loader.take(step)?.into_iter().zip(&work.samples) {
            match loaded {
                Ok(sample) => {
                    samples.push(sample);
                    let offset = dataset_offsets.get(s.dataset as usize).copied().unwrap_or_default();
                    tags.push(SampleTag { id: offset + s.index as i64, epoch: work.epoch, slot: s.slot });
                }
                // Skipped samples are logged (shard and key) and counted in the job's status.
                Err(e) if skip_bad => {
                    skipped += 1;
                    eprintln!("rank {rank}: step {step}: skipped a sample: {e:#}");
                }
                Err(e) => return Err(e.context(format!("step {step}: loading (data.on_error = \"fail\")"))),
            }
        }
        let batch = batch::build(&samples, &tags, &batch_opts)
            .with_context(|| format!("step {step}: cannot build the batch"))?
            .to_device(device);
        let data_time = t0.elapsed();
        // Under the fail policy every rank brings exactly its planned rows; skipping may bring fewer.
        let expected = (!skip_bad).then(|| {
            (
                (work.local_slot_begin - work.global_slot_begin) as usize,
                (work.global_slot_end - work.global_slot_begin) as usize,
            )
        });
        let out =
            trainer.step(&batch, expected, work.learning_rate).with_context(|| format!("step {step} (rank {rank})"))?;
        last_loss = Some(out.total);
        tracing::debug!(
            step,
            loss = out.total,
            compute_ms = out.compute.as_secs_f64() * 1e3,
            comm_ms = out.comm.as_secs_f64() * 1e3,
            "step trained"
        );

        let done_steps = step + 1;
        let mut checkpoint_dir = String::new();
        let due = done_steps == cfg.steps
            || (cfg.checkpoint.every_steps > 0 && done_steps.is_multiple_of(cfg.checkpoint.every_steps));
        if due && rank == 0 {
            let meta = CheckpointMeta {
                format: checkpoint::FORMAT.into(),
                job_id: ctx.job_id.clone(),
                step: done_steps,
                // Where the next step starts: the next slot of this epoch, or slot 0 of the next.
                epoch: if work.global_slot_end >= epoch_len { work.epoch + 1 } else { work.epoch },
                next_slot_in_epoch: if work.global_slot_end >= epoch_len { 0 } else { work.global_slot_end },
                generation,
                world_size: world,
                loss_total: out.total,
                created_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            };
            let path = checkpoint::write(
                std::path::Path::new(&cfg.checkpoint.dir),
                &meta,
                &trainer.model.state_on_cpu(),
                &trainer.opt.state().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu))).collect::<Vec<_>>(),
                &trainer.banks.as_ref().map(Banks::state_on_cpu).unwrap_or_default(),
                &ctx.job_toml,
            )
            .with_context(|| format!("step {done_steps}: checkpoint"))?;
            checkpoint_dir = path.display().to_string();
        }
        let step_time = t0.elapsed();
        let metrics = pb::StepMetrics {
            step,
            loss_total: out.total,
            loss_terms: names.iter().zip(out.terms).map(|(n, v)| (n.to_string(), v)).collect(),
            samples_per_sec: batch.len() as f64 / step_time.as_secs_f64().max(1e-9),
            step_ms: step_time.as_secs_f64() * 1e3,
            data_ms: data_time.as_secs_f64() * 1e3,
            compute_ms: out.compute.as_secs_f64() * 1e3,
            comm_ms: out.comm.as_secs_f64() * 1e3,
            local_samples: batch.len() as u32,
            learning_rate: work.learning_rate,
            skipped_samples: skipped,
            device: match device {
                Device::Cuda(n) => format!("cuda:{n}"),
                _ => "cpu".into(),
            },
        };
        ctx.call("report step", async |mut c| {
            c.report_step(pb::ReportStepRequest {
                worker_id: ctx.worker_id.clone(),
                generation,
                metrics: Some(metrics),
                checkpoint: checkpoint_dir,
            })
            .await
        })?;
        step += 1;
    }

    if let Some(dir) = &ctx.dump_state {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("rank-{rank}.safetensors"));
        let mut state: Vec<(String, Tensor)> = trainer.model.state_on_cpu();
        if let Some(b) = &trainer.banks {
            state.extend(b.state_on_cpu());
        }
        Tensor::write_safetensors(&state, &path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("rank {rank}: finished at step {step}");
    Ok(RunSummary { job_id: ctx.job_id, worker_id: ctx.worker_id, rank, steps: step, last_loss })
}

/// Per modality, the global ids of the samples that have it (memory-bank negatives are drawn from
/// these). RGB: every sample. Depth: the samples whose shard index lists a depth member (read from the
/// tar headers of shards that have any; their bank rows are the only depth rows ever written).
/// Keypoints: every sample, since every dataset has keypoints; a sample whose crops never show 2
/// visible joints keeps its initial random row, which can still be drawn.
fn bank_eligibility(datasets: &[Dataset], offsets: &[i64]) -> anyhow::Result<[Vec<i64>; 3]> {
    let all: Vec<i64> = (0..datasets.iter().map(|d| d.len() as i64).sum()).collect();
    let mut depth = Vec::new();
    for (d, &offset) in datasets.iter().zip(offsets) {
        let mut start = offset;
        for (i, shard) in d.manifest().shards.iter().enumerate() {
            if shard.with_depth == shard.samples {
                depth.extend(start..start + shard.samples as i64);
            } else if shard.with_depth > 0 {
                let reader = d.shard(i).with_context(|| format!("{}: shard {i}", d.manifest_path().display()))?;
                depth.extend(
                    (0..shard.samples as usize)
                        .filter(|&k| reader.has_depth(k) == Some(true))
                        .map(|k| start + k as i64),
                );
            }
            start += shard.samples as i64;
        }
    }
    Ok([all.clone(), depth, all])
}

/// Stage 2's start: every variable of the stage-1 checkpoint but the dense heads (new in stage 2),
/// and the memory banks when this job uses them. A missing, extra or mis-shaped tensor is refused,
/// naming it.
fn init_from_checkpoint(trainer: &mut Trainer, path: &std::path::Path) -> anyhow::Result<()> {
    let dir = if path.join("meta.json").is_file() {
        path.to_path_buf()
    } else {
        checkpoint::latest(path)
            .with_context(|| format!("{} is neither a checkpoint nor holds a `latest` one", path.display()))?
    };
    let (meta, model, _opt, banks) = checkpoint::read(&dir)?;
    let wanted: Vec<(String, Tensor)> =
        trainer.model.state().into_iter().filter(|(n, _)| !Model::is_dense_head(n)).collect();
    let given: Vec<(String, Tensor)> = model.into_iter().filter(|(n, _)| !Model::is_dense_head(n)).collect();
    crate::weights::copy_into(&format!("{}/model.safetensors", dir.display()), &wanted, &given)?;
    if let Some(target) = &mut trainer.banks {
        let banks = banks.with_context(|| {
            format!(
                "{} has no memory banks (banks.safetensors): was stage 1 trained with loss.variant = \"memory_bank\"?",
                dir.display()
            )
        })?;
        target.load(&banks, &format!("{}/banks.safetensors", dir.display()))?;
    }
    eprintln!("initialised from {} (step {}; dense heads new)", dir.display(), meta.step);
    Ok(())
}

/// The loader requests of one step's work, after checking that the coordinator's slice is consistent.
fn requests(step: u64, work: &pb::FetchWorkResponse) -> anyhow::Result<Vec<Request>> {
    let slots_ok = work.global_slot_begin <= work.local_slot_begin
        && work.local_slot_begin <= work.local_slot_end
        && work.local_slot_end <= work.global_slot_end
        && work.samples.len() as u64 == work.local_slot_end - work.local_slot_begin;
    if !slots_ok {
        bail!(
            "step {step}: the coordinator sent an inconsistent slice: global [{}, {}), local [{}, {}), {} samples",
            work.global_slot_begin,
            work.global_slot_end,
            work.local_slot_begin,
            work.local_slot_end,
            work.samples.len()
        );
    }
    Ok(work
        .samples
        .iter()
        .enumerate()
        .map(|(position, s)| Request {
            step,
            position,
            dataset: s.dataset as usize,
            index: s.index,
            epoch: work.epoch,
            slot: s.slot,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Depth negatives come only from samples that have depth, also in shards that mix both; ids
    /// continue across datasets.
    #[test]
    fn bank_eligibility_lists_exactly_the_samples_with_depth() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut datasets = Vec::new();
        for (i, (samples, depth_fraction)) in [(10u64, 0.5f32), (6, 1.0)].into_iter().enumerate() {
            let dir = tmp.path().join(format!("d{i}"));
            let cfg = hcmoco_data::SynthConfig {
                samples,
                image_size: 16,
                depth_fraction,
                shard_size: 4,
                ..Default::default()
            };
            hcmoco_data::generate(&cfg, &dir).expect("synth");
            datasets.push(Dataset::open(dir.join("manifest.json")).expect("open"));
        }
        let [rgb, depth, kp] = bank_eligibility(&datasets, &[0, 10]).expect("eligibility");
        let mut want = Vec::new();
        for (d, offset) in datasets.iter().zip([0i64, 10]) {
            for k in 0..d.len() {
                if d.get(k).expect("sample").depth.is_some() {
                    want.push(offset + k as i64);
                }
            }
        }
        assert!(want.len() > 6 && want.len() < 16, "the first dataset mixes samples with and without depth: {want:?}");
        assert_eq!(depth, want);
        assert_eq!((rgb.len(), kp.len()), (16, 16));
    }
}
