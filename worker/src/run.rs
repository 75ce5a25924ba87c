//! `hcmoco-worker run`: the worker process's life.
//!
//! Control (gRPC to the coordinator, heartbeats, SIGTERM) runs on a small tokio runtime; tensor compute
//! and collectives run on one dedicated OS thread (the training thread), which calls the coordinator by
//! blocking on the runtime's handle from outside it.
//!
//! The life is three parts ([`run`]):
//! - **setup**, once: bind the collective listener (kept for the worker's life), connect and join,
//!   then, at the first rendezvous, open the datasets and build the loader, the model and the
//!   trainer ([`Setup`]);
//! - **sessions**, one per generation ([`Setup::session`]): rendezvous, return to the generation's
//!   start step (undoing a step the coordinator never committed), form the communicator on the kept
//!   listener, take the state source's parameters, momentum, buffers and banks (or the committed
//!   checkpoint), then fetch, load, train, checkpoint (rank 0) and report until the generation ends:
//!   [`SessionEnd::Done`], [`SessionEnd::NewGeneration`] (a join, leave or failure elsewhere: the
//!   worker rendezvouses again), [`SessionEnd::Left`] (after SIGTERM) or an error;
//! - **reporting**: a failure is reported to the coordinator, which forms a new generation; a
//!   fatal one (bad data under `data.on_error = "fail"`, a diverged loss) fails the job. The worker
//!   exits non-zero only when told to stop, or on a fatal error; released (scale-down) and leaving
//!   workers exit 0.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hcmoco_data::Dataset;
use hcmoco_proto::JobConfig;
use hcmoco_proto::config::{Autocast, Backend, LossVariant, OnError, TransportChoice};
use hcmoco_proto::domain::{Assignment, CallError, HeldState, Membership, StateSource, StepWork, Work};
use hcmoco_proto::pb;
use hcmoco_proto::pb::worker_service_client::WorkerServiceClient;
use tch::{Device, Tensor};
use tokio::runtime::{Handle, Runtime};
use tonic::transport::{Channel, Endpoint};

use crate::batch::{self, BatchOptions, SampleTag};
use crate::checkpoint::{self, CheckpointMeta};
use crate::comm::{AbortHandle, CommError, Communicator, CpuOptions, PeerInfo, Transport, connect_cpu_with};
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
    /// Append one JSON object per applied and per undone step (the slots this rank trained).
    pub trace_slots: Option<PathBuf>,
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

/// How a worker's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The job completed.
    Completed,
    /// It left after SIGTERM.
    Left,
    /// The coordinator did not need it (scale-down, or more workers than the target).
    Released,
}

/// What a finished worker reports.
#[derive(Debug)]
pub struct RunSummary {
    pub job_id: String,
    pub worker_id: String,
    pub rank: u32,
    pub steps: u64,
    pub last_loss: Option<f64>,
    pub ending: Ending,
}

/// Upper bound of any single call to the coordinator.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// The coordinators a worker may call (`--coordinator A,B`): the leader answers; a standby answers
/// `Unavailable` naming the leader, and a dead one does not answer, so the worker moves to the next
/// address. Channels connect lazily; `current` is the one that answered last.
struct Coordinators {
    addrs: Vec<String>,
    clients: Vec<WorkerServiceClient<Channel>>,
    current: std::sync::atomic::AtomicUsize,
}

impl Coordinators {
    fn new(list: &str) -> anyhow::Result<Coordinators> {
        let addrs: Vec<String> = list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
        anyhow::ensure!(!addrs.is_empty(), "--coordinator: no address given");
        let mut clients = Vec::new();
        for a in &addrs {
            let endpoint = Endpoint::from_shared(hcmoco_proto::endpoint_uri(a))
                .with_context(|| format!("bad coordinator address {a:?}"))?;
            // Every call is bounded (the longest, a rendezvous long poll, answers within ~10 s), so a
            // black-holed coordinator cannot hang the training thread.
            let endpoint = endpoint.connect_timeout(Duration::from_secs(2)).timeout(RPC_TIMEOUT).tcp_nodelay(true);
            clients.push(WorkerServiceClient::new(endpoint.connect_lazy()));
        }
        Ok(Coordinators { addrs, clients, current: Default::default() })
    }

    fn client(&self) -> (usize, WorkerServiceClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Moves on from `from` (unless another caller already did).
    fn rotate(&self, from: usize) {
        let _ =
            self.current.compare_exchange(from, (from + 1) % self.clients.len(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn names(&self) -> String {
        self.addrs.join(",")
    }

    /// Calls the current coordinator, moving on to the next address when it is unavailable (a
    /// standby, a dead or restarting one) for up to `patience`. Calls are safe to repeat: the
    /// coordinator answers a repeated report of a committed step as it answered the first.
    async fn call<T>(
        &self,
        patience: Duration,
        f: &impl AsyncFn(WorkerServiceClient<Channel>) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let deadline = Instant::now() + patience;
        let mut backoff = Duration::from_millis(50);
        loop {
            let (i, c) = self.client();
            match f(c).await {
                Ok(r) => return Ok(r.into_inner()),
                // Unavailable: a standby, or nobody listening. Unknown / Cancelled / DeadlineExceeded:
                // the connection broke under the call (the coordinator died mid-call). The
                // coordinator's own refusals use other codes and are not retried.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                    ) && Instant::now() < deadline =>
                {
                    tracing::debug!(coordinator = %self.addrs[i], error = %s.message(), "trying the next coordinator");
                    self.rotate(i);
                    if (i + 1) % self.clients.len() == 0 {
                        // A round of every address: wait a little before the next.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
                Err(s) => {
                    let msg = format!("{} (coordinator {})", s.message(), self.addrs[i]);
                    return Err(tonic::Status::with_metadata(s.code(), msg, s.metadata().clone()));
                }
            }
        }
    }
}

/// Connects and joins, retrying unreachable coordinators with backoff until `timeout`.
async fn connect_and_join(
    opts: &RunOptions,
    coordinators: &Coordinators,
    collective_addr: &str,
) -> anyhow::Result<pb::JoinResponse> {
    let req = pb::JoinRequest {
        job_id: opts.job.clone().unwrap_or_default(),
        host_id: opts.host_id.clone(),
        collective_addr: collective_addr.to_string(),
        device: "cpu".into(),
        pid: std::process::id(),
    };
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let join = async |mut c: WorkerServiceClient<Channel>| {
        attempts.fetch_add(1, Ordering::Relaxed);
        c.join(req.clone()).await
    };
    match coordinators.call(opts.connect_timeout, &join).await {
        Ok(resp) => Ok(resp),
        Err(s) if s.code() == tonic::Code::Unavailable => bail!(
            "could not reach the coordinator at {} within {:.0?} ({} attempts); last error: {}",
            coordinators.names(),
            opts.connect_timeout,
            attempts.load(Ordering::Relaxed),
            s.message()
        ),
        Err(s) => bail!("the coordinator at {} refused to let this worker join: {}", coordinators.names(), s.message()),
    }
}

/// Shared between the heartbeat task, the SIGTERM handler and the training thread: why the worker
/// must stop (sticky: the job failed or was cancelled), the newest generation the coordinator named
/// (a larger one than the worker's means "rendezvous again", never "stop"), whether a leave was
/// asked for, and the session's communicator to abort so that a rank blocked in a collective
/// returns at once.
#[derive(Default)]
struct Control {
    reason: Mutex<Option<String>>,
    abort: Mutex<Option<AbortHandle>>,
    /// The generation this worker belongs to (0 before its first).
    generation: AtomicU64,
    /// The newest generation a heartbeat named.
    announced: AtomicU64,
    /// SIGTERM arrived: leave at the next step boundary.
    leave: AtomicBool,
    /// The step being trained, for heartbeats and failure reports.
    step: AtomicU64,
}

impl Control {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason(&self) -> Option<String> {
        Self::lock(&self.reason).clone()
    }

    /// Records why the worker must stop (the first reason wins) and aborts the communicator.
    fn stop(&self, why: String) {
        let reason = Self::lock(&self.reason).get_or_insert(why).clone();
        if let Some(h) = Self::lock(&self.abort).as_ref() {
            h.abort(&reason);
        }
    }

    /// A heartbeat named `generation`: if it is newer than this worker's, the session's communicator
    /// is aborted (peers may be gone) and the worker rendezvouses again.
    fn announce(&self, generation: u64) {
        let before = self.announced.fetch_max(generation, Ordering::SeqCst);
        if generation > before.max(self.generation.load(Ordering::SeqCst))
            && let Some(h) = Self::lock(&self.abort).as_ref()
        {
            h.abort(&format!("regenerate: the coordinator is forming generation {generation}"));
        }
    }

    /// Whether a newer generation than this worker's has been announced.
    fn regenerate(&self) -> bool {
        self.announced.load(Ordering::SeqCst) > self.generation.load(Ordering::SeqCst)
    }

    /// Registers the session's communicator (aborting at once if a stop already came).
    fn set_abort(&self, handle: Option<AbortHandle>) {
        if let (Some(reason), Some(h)) = (self.reason(), handle.as_ref()) {
            h.abort(&reason);
        }
        *Self::lock(&self.abort) = handle;
    }
}

fn spawn_heartbeats(
    rt: &Runtime,
    coordinators: Arc<Coordinators>,
    worker_id: String,
    interval: Duration,
    silence_limit: Duration,
    control: Arc<Control>,
) {
    rt.spawn(async move {
        let mut last_ok = Instant::now();
        // A heartbeat that does not answer within this long counts as missed.
        let call_limit = interval.max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(interval).await;
            let req = pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                generation: control.generation.load(Ordering::SeqCst),
                step: control.step.load(Ordering::Relaxed),
            };
            let (at, mut client) = coordinators.client();
            let error = match tokio::time::timeout(call_limit, client.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    last_ok = Instant::now();
                    let r = r.into_inner();
                    if r.stop {
                        control.stop(r.message);
                        return;
                    }
                    control.announce(r.generation);
                    continue;
                }
                Ok(Err(s)) => match CallError::from_status(&s) {
                    CallError::UnknownWorker { message } => {
                        control.stop(format!("the coordinator no longer knows this worker: {message}"));
                        return;
                    }
                    other => {
                        coordinators.rotate(at);
                        other.to_string()
                    }
                },
                Err(_) => {
                    coordinators.rotate(at);
                    format!("no answer within {call_limit:.0?}")
                }
            };
            if last_ok.elapsed() > silence_limit {
                control.stop(format!("lost contact with the coordinator for {:.0?}: {error}", last_ok.elapsed()));
                return;
            }
        }
    });
}

/// SIGTERM (preemption, scale-down by the cluster): leave at the next step boundary and exit 0.
fn spawn_sigterm(rt: &Runtime, control: Arc<Control>) -> anyhow::Result<()> {
    let mut term = {
        let _guard = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?
    };
    rt.spawn(async move {
        if term.recv().await.is_some() {
            eprintln!("SIGTERM: leaving the job at the next step boundary");
            control.leave.store(true, Ordering::SeqCst);
        }
    });
    Ok(())
}

/// Runs a worker to the end of its job (or until it leaves or is released).
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

    let coordinators = Arc::new({
        let _guard = rt.enter();
        Coordinators::new(&opts.coordinator)?
    });
    let joined = rt.block_on(connect_and_join(&opts, &coordinators, &collective_addr))?;
    let config = JobConfig::from_toml(&joined.job_config_toml)
        .context("the coordinator sent a job config this worker cannot read")?;
    tracing::info!(job = %joined.job_id, worker = %joined.worker_id, "joined");
    eprintln!("worker {} joined job {} (collective address {collective_addr})", joined.worker_id, joined.job_id);

    let control = Arc::new(Control::default());
    spawn_heartbeats(
        &rt,
        coordinators.clone(),
        joined.worker_id.clone(),
        Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(1))),
        Duration::from_millis(config.heartbeat.timeout_ms),
        control.clone(),
    );
    spawn_sigterm(&rt, control.clone())?;

    let trace = match &opts.trace_slots {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--trace-slots {}", path.display()))?,
        ),
        None => None,
    };
    let ctx = Ctx {
        handle: rt.handle().clone(),
        coordinators: coordinators.clone(),
        worker_id: joined.worker_id.clone(),
        job_id: joined.job_id.clone(),
        config,
        job_toml: joined.job_config_toml.clone(),
        control: control.clone(),
        host_id: opts.host_id.clone(),
        collective_addr,
        opts: opts.clone(),
        trace: trace.map(Mutex::new),
    };
    // Tensor work on its own OS thread, never on the runtime's workers.
    let trainer = std::thread::Builder::new().name("hcmoco-train".into()).spawn(move || lifecycle(&ctx, listener))?;
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
    if let Err(e) = &result {
        // Best effort: tell the coordinator, so the job's status names the failure. The job fails
        // only for a fatal error; otherwise the others go on without this worker.
        report_failure(&rt, &coordinators, &joined.worker_id, &control, e, is_fatal(e));
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// A failure report: the error with its chain, and the rank a collective error blames.
fn failure_report(
    worker_id: &str,
    generation: u64,
    step: u64,
    e: &anyhow::Error,
    fatal: bool,
) -> pb::ReportFailureRequest {
    pb::ReportFailureRequest {
        worker_id: worker_id.to_string(),
        generation,
        step,
        message: format!("{e:#}"),
        failed_rank: e
            .chain()
            .find_map(|c| c.downcast_ref::<CommError>())
            .and_then(|c| c.peer_rank())
            .map_or(-1, |r| r as i32),
        fatal,
    }
}

fn report_failure(
    rt: &Runtime,
    coordinators: &Coordinators,
    worker_id: &str,
    control: &Control,
    e: &anyhow::Error,
    fatal: bool,
) {
    let req = failure_report(
        worker_id,
        control.generation.load(Ordering::SeqCst),
        control.step.load(Ordering::Relaxed),
        e,
        fatal,
    );
    let call = async |mut c: WorkerServiceClient<Channel>| c.report_failure(req.clone()).await;
    let _ = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), coordinators.call(Duration::from_secs(3), &call)).await
    });
}

/// What the training thread works with.
struct Ctx {
    handle: Handle,
    coordinators: Arc<Coordinators>,
    worker_id: String,
    job_id: String,
    config: JobConfig,
    job_toml: String,
    control: Arc<Control>,
    host_id: String,
    collective_addr: String,
    opts: RunOptions,
    trace: Option<Mutex<std::fs::File>>,
}

/// Why a worker call failed: what the coordinator said, decoded once.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}")]
struct CallFailed {
    what: &'static str,
    error: CallError,
}

impl Ctx {
    /// Calls the coordinator; an unreachable one (or a standby) is retried at the next address for up
    /// to `heartbeat.timeout_ms` (a failover).
    fn call<T>(
        &self,
        what: &'static str,
        f: impl AsyncFn(WorkerServiceClient<Channel>) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, CallFailed> {
        let patience = Duration::from_millis(self.config.heartbeat.timeout_ms);
        self.handle.block_on(self.coordinators.call(patience, &f)).map_err(|s| {
            let error = match CallError::from_status(&s) {
                CallError::Other { code, message } if code != tonic::Code::Unavailable => {
                    CallError::Other { code, message: format!("refused by the coordinator: {message}") }
                }
                CallError::Other { code, message } => CallError::Other {
                    code,
                    message: format!("the coordinator at {} is unreachable: {message}", self.opts.coordinator),
                },
                other => other,
            };
            CallFailed { what, error }
        })
    }

    fn generation(&self) -> u64 {
        self.control.generation.load(Ordering::SeqCst)
    }

    /// Appends one line to `--trace-slots`.
    fn trace(&self, event: &str, work: &StepWork, rank: u32, slots: &[u64]) -> anyhow::Result<()> {
        let Some(file) = &self.trace else { return Ok(()) };
        let line = serde_json::json!({
            "event": event,
            "epoch": work.epoch,
            "step": work.step,
            "generation": self.generation(),
            "rank": rank,
            "slots": slots,
        });
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(f, "{line}").and_then(|()| f.flush()).context("--trace-slots: cannot append")
    }
}

/// Marks an error no new generation can help with (bad data under `data.on_error = "fail"`): the
/// worker reports it `fatal`, and the job fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

/// Whether an error must fail the job rather than end this worker alone: bad data under the fail
/// policy, a diverged loss, ranks disagreeing on the plan.
fn is_fatal(e: &anyhow::Error) -> bool {
    use crate::train::StepError;
    // A context layer is found by `anyhow::Error::downcast_ref` (it walks nested contexts), not by
    // `chain()`, which yields the layers as anyhow's own wrapper type.
    e.downcast_ref::<Fatal>().is_some()
        || e.chain().any(|c| {
            c.downcast_ref::<StepError>()
                .is_some_and(|s| matches!(s, StepError::NonFinite(_) | StepError::RowMismatch { .. }))
        })
}

/// How one generation ended for this worker.
#[derive(Debug)]
enum SessionEnd {
    /// The job has no more steps.
    Done,
    /// The generation ended (a membership change): rendezvous again.
    NewGeneration(String),
    /// This worker left after SIGTERM.
    Left,
}

/// Whether an error ends this generation only (a peer died, the coordinator moved on) rather than
/// the worker: collective failures and stale-generation answers.
fn is_membership_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<CommError>().is_some()
            || c.downcast_ref::<crate::train::StepError>()
                .is_some_and(|s| matches!(s, crate::train::StepError::Comm(_)))
            || c.downcast_ref::<CallFailed>().is_some_and(|f| matches!(f.error, CallError::StaleGeneration { .. }))
    })
}

/// The worker's generations: rendezvous, session, and again, until the job ends or the worker leaves.
fn lifecycle(ctx: &Ctx, listener: TcpListener) -> anyhow::Result<RunSummary> {
    tch::set_num_threads(ctx.config.runtime.torch_threads as i32);
    let mut setup: Option<Setup> = None;
    // Whether this worker's model holds a trained state the coordinator can count on.
    let mut has_state = false;
    let mut last_rank = 0;
    loop {
        let held = setup
            .as_ref()
            .filter(|_| has_state)
            .map(|s| HeldState { applied_steps: s.trainer.applied_steps, can_undo: s.trainer.can_undo() });
        let m = match rendezvous(ctx, held)? {
            Assignment::Released { generation } => {
                eprintln!("released at generation {generation}: the job does not need this worker");
                return Ok(summary(ctx, setup.as_ref(), last_rank, Ending::Released));
            }
            Assignment::Member(m) => *m,
        };
        ctx.control.generation.store(m.generation, Ordering::SeqCst);
        last_rank = m.rank;
        eprintln!(
            "generation {}: rank {} of {}, from step {} ({})",
            m.generation,
            m.rank,
            m.world,
            m.start_step,
            match &m.source {
                StateSource::Rank(r) => format!("state from rank {r}"),
                StateSource::Checkpoint(dir) => format!("restoring {dir}"),
            }
        );
        if setup.is_none() {
            // The first generation's members all build the same job: a failure there is the job's
            // (a bad init checkpoint, a missing dataset) and fails it. A later joiner's failure is
            // its own host's: the others go on without it.
            setup =
                Some(Setup::new(ctx, &m).map_err(|e| {
                    if m.generation == 1 { e.context(Fatal("cannot set up the job".into())) } else { e }
                })?);
        }
        let s = setup.as_mut().expect("built above");
        let ended = s.session(ctx, &listener, &m, &mut has_state);
        s.comm_dropped(ctx);
        match ended {
            Ok(SessionEnd::Done) => {
                s.dump_state(ctx, m.rank)?;
                eprintln!("rank {}: finished at step {}", m.rank, s.trainer.applied_steps);
                return Ok(summary(ctx, Some(s), m.rank, Ending::Completed));
            }
            Ok(SessionEnd::Left) => {
                eprintln!("rank {}: left after step {}", m.rank, s.trainer.applied_steps);
                return Ok(summary(ctx, Some(s), m.rank, Ending::Left));
            }
            Ok(SessionEnd::NewGeneration(why)) => eprintln!("generation {} ends: {why}", m.generation),
            Err(e) if ctx.control.reason().is_some() => {
                let why = ctx.control.reason().unwrap_or_default();
                return Err(e.context(format!("stopping: {why}")));
            }
            Err(e) if is_membership_error(&e) => {
                eprintln!("generation {} failed: {e:#}", m.generation);
                if !ctx.control.regenerate() {
                    // The coordinator has not moved on yet: tell it, so it forms the next generation.
                    let rt_report = failure_report(
                        &ctx.worker_id,
                        m.generation,
                        ctx.control.step.load(Ordering::Relaxed),
                        &e,
                        false,
                    );
                    let _ = ctx.call("report failure", async |mut c| c.report_failure(rt_report.clone()).await);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn summary(ctx: &Ctx, setup: Option<&Setup>, rank: u32, ending: Ending) -> RunSummary {
    RunSummary {
        job_id: ctx.job_id.clone(),
        worker_id: ctx.worker_id.clone(),
        rank,
        steps: setup.map_or(0, |s| s.trainer.applied_steps),
        last_loss: setup.and_then(|s| s.last_loss),
        ending,
    }
}

/// Long polls until a generation takes this worker in. A fresh collective bootstrap is offered each
/// time (an NCCL unique id is good for one communicator).
fn rendezvous(ctx: &Ctx, held: Option<HeldState>) -> anyhow::Result<Assignment> {
    let offer = match ctx.config.backend() {
        Backend::Nccl => crate::comm::nccl::nccl_unique_id().context("collective.backend = \"nccl\"")?,
        Backend::Cpu => Vec::new(),
    };
    loop {
        if let Some(why) = ctx.control.reason() {
            bail!("stopped: {why}");
        }
        if ctx.control.leave.load(Ordering::SeqCst) {
            let req = pb::LeaveRequest { worker_id: ctx.worker_id.clone(), generation: ctx.generation() };
            let _ = ctx.call("leave", async |mut c| c.leave(req.clone()).await);
            return Ok(Assignment::Released { generation: ctx.generation() });
        }
        let req = pb::RendezvousRequest {
            worker_id: ctx.worker_id.clone(),
            generation: ctx.generation(),
            collective_bootstrap: offer.clone(),
            applied_steps: held.map_or(0, |h| h.applied_steps),
            has_state: held.is_some(),
            can_undo: held.is_some_and(|h| h.can_undo),
        };
        let resp = match ctx.call("rendezvous", async |mut c| c.rendezvous(req.clone()).await) {
            Ok(r) => r,
            Err(CallFailed { error: CallError::JobEnded { state, message }, .. }) if state == "completed" => {
                eprintln!("{message}");
                return Ok(Assignment::Released { generation: ctx.generation() });
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(a) = Option::<Assignment>::try_from(resp).context("the coordinator sent a bad assignment")? {
            return Ok(a);
        }
    }
}

/// What a worker builds once and keeps across generations.
struct Setup {
    trainer: Trainer,
    loader: Loader,
    device: Device,
    dataset_offsets: Vec<i64>,
    epoch_len: u64,
    batch_opts: BatchOptions,
    last_loss: Option<f64>,
    /// The last applied step's work, slots trained and rank (what an undo takes back, for the trace).
    last_work: Option<StepWork>,
    last_slots: Vec<u64>,
    last_rank: u32,
}

impl Setup {
    fn new(ctx: &Ctx, first: &Membership) -> anyhow::Result<Setup> {
        let cfg = &ctx.config;
        // Datasets: the layout and image size must agree across the job's datasets (checked here, once).
        let mut datasets = Vec::new();
        for (i, d) in cfg.data.datasets.iter().enumerate() {
            datasets.push(
                Dataset::open(std::path::Path::new(&d.manifest))
                    .with_context(|| format!("data.datasets[{i}]: cannot open {}", d.manifest))?,
            );
        }
        let first_manifest = datasets.first().context("the job lists no dataset")?.manifest().clone();
        for (i, d) in datasets.iter().enumerate() {
            let m = d.manifest();
            if m.layout != first_manifest.layout {
                bail!(
                    "data.datasets[{i}] uses keypoint layout {} but data.datasets[0] uses {}: one layout per job",
                    m.layout,
                    first_manifest.layout
                );
            }
            let fixed = m.image_width > 0
                && (m.image_width, m.image_height) == (first_manifest.image_width, first_manifest.image_height);
            if cfg.data.image_size == 0 && !fixed {
                bail!(
                    "data.image_size = 0 trains on images as stored, which needs one image size: data.datasets[{i}] has {}x{}, data.datasets[0] {}x{} (0 = varies); set data.image_size",
                    m.image_width,
                    m.image_height,
                    first_manifest.image_width,
                    first_manifest.image_height
                );
            }
        }
        let image_size = match cfg.data.image_size {
            0 => (first_manifest.image_width, first_manifest.image_height),
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
        let eligible = (cfg.loss_variant() == LossVariant::MemoryBank)
            .then(|| bank_eligibility(&datasets, &dataset_offsets))
            .transpose()?;
        let loader = Loader::new(Arc::new(datasets), augment_cfg, cfg.seed, cfg.data.loader_threads as usize);
        let device = match (&ctx.opts.device, cfg.backend()) {
            (Some(d), _) => parse_device(d)?,
            // The local rank's GPU for NCCL (ranks sharing a host), kept for the worker's life.
            (None, Backend::Nccl) => Device::Cuda(first.local_rank as usize),
            (None, Backend::Cpu) => Device::Cpu,
        };
        let model = Model::new(&cfg.model, first_manifest.layout, cfg.seed, device)?;
        let bucket_bytes = (cfg.collective.bucket_mb * 1048576.0) as usize;
        let objective = Objective {
            stage: cfg.loss.stage,
            variant: match cfg.loss_variant() {
                LossVariant::MemoryBank => Variant::MemoryBank,
                LossVariant::InBatch => Variant::InBatch,
            },
            temperature: cfg.loss.temperature,
            negatives: cfg.loss.negatives as usize,
            seed: cfg.seed,
        };
        let banks = eligible
            .map(|eligible| {
                let bank =
                    MemoryBank::new(epoch_len as i64, i64::from(cfg.model.embed_dim), cfg.seed, model.kind, device);
                Banks::new(bank, eligible)
            })
            .transpose()?;
        let joints = first_manifest.layout.num_joints() as i64;
        let mut trainer = Trainer::new(
            model,
            cfg.optimizer.momentum,
            cfg.optimizer.weight_decay,
            objective,
            banks,
            joints,
            bucket_bytes,
        );
        trainer.autocast = cfg.autocast() == Autocast::Bf16;
        if !cfg.model.init_checkpoint.is_empty() {
            init_from_checkpoint(&mut trainer, Path::new(&cfg.model.init_checkpoint))
                .with_context(|| format!("model.init_checkpoint = {:?}", cfg.model.init_checkpoint))?;
        }
        for (modality, path) in
            [(ImageModality::Rgb, &cfg.model.init_rgb_backbone), (ImageModality::Depth, &cfg.model.init_depth_backbone)]
        {
            if !path.is_empty() {
                trainer
                    .model
                    .load_backbone(modality, Path::new(path))
                    .with_context(|| format!("model.init_{}_backbone = {path:?}", modality.as_str()))?;
            }
        }
        let batch_opts = BatchOptions {
            layout: first_manifest.layout,
            image_size,
            kind: trainer.model.kind,
            dicl_points: if cfg.loss.stage == 2 { cfg.loss.dicl_points as usize } else { 0 },
            seed: cfg.seed,
        };
        Ok(Setup {
            trainer,
            loader,
            device,
            dataset_offsets,
            epoch_len,
            batch_opts,
            last_loss: None,
            last_work: None,
            last_slots: Vec::new(),
            last_rank: 0,
        })
    }

    /// Forms this generation's communicator on the kept listener.
    fn connect(&self, ctx: &Ctx, listener: &TcpListener, m: &Membership) -> anyhow::Result<Box<dyn Communicator>> {
        let cfg = &ctx.config;
        let timeout = Duration::from_millis(cfg.collective.timeout_ms);
        Ok(match (cfg.backend(), self.device) {
            (Backend::Nccl, Device::Cuda(index)) => Box::new(
                crate::comm::nccl::connect_nccl(
                    m.rank as usize,
                    m.world as usize,
                    m.generation,
                    &m.bootstrap,
                    index,
                    timeout,
                )
                .context("cannot form the NCCL communicator")?,
            ),
            (Backend::Nccl, d) => bail!("collective.backend = \"nccl\" needs a CUDA device, not {d:?}"),
            (Backend::Cpu, Device::Cpu) => {
                // The ring needs this rank's neighbours only; the other entries stay empty.
                let world = m.world as usize;
                let mut peers = vec![PeerInfo { addr: String::new(), host_id: String::new() }; world];
                let rank = m.rank as usize;
                let info = |n: &hcmoco_proto::domain::Neighbour| PeerInfo {
                    addr: n.collective_addr.clone(),
                    host_id: n.host_id.clone(),
                };
                peers[(rank + world - 1) % world] = info(&m.left);
                peers[(rank + 1) % world] = info(&m.right);
                peers[rank] = PeerInfo { addr: ctx.collective_addr.clone(), host_id: ctx.host_id.clone() };
                let transport = match cfg.transport() {
                    TransportChoice::Auto => Transport::Auto,
                    TransportChoice::Tcp => Transport::Tcp,
                    TransportChoice::Shm => Transport::Shm,
                };
                let opts = CpuOptions { transport, timeout, ..CpuOptions::default() };
                Box::new(
                    connect_cpu_with(listener, rank, &peers, m.generation, &opts)
                        .context("cannot form the collective ring")?,
                )
            }
            (Backend::Cpu, d) => {
                bail!("collective.backend = \"cpu\" works on CPU tensors; device {d:?} needs \"nccl\"")
            }
        })
    }

    fn comm_dropped(&self, ctx: &Ctx) {
        ctx.control.set_abort(None);
    }

    /// One generation: return to its start step, form the communicator, take the state source's
    /// state, and train until the generation ends.
    fn session(
        &mut self,
        ctx: &Ctx,
        listener: &TcpListener,
        m: &Membership,
        has_state: &mut bool,
    ) -> anyhow::Result<SessionEnd> {
        let cfg = &ctx.config;
        let span = tracing::info_span!("train", job = %ctx.job_id, worker = %ctx.worker_id, generation = m.generation, rank = m.rank);
        let _entered = span.enter();
        let rank = m.rank;
        // A step this rank applied but the coordinator never committed is trained again.
        if *has_state && self.trainer.applied_steps == m.start_step + 1 && self.trainer.can_undo() {
            let step = self.trainer.undo_last().expect("can_undo");
            eprintln!("rank {rank}: undid step {step} (not committed)");
            if let Some(work) = &self.last_work
                && work.step == step
            {
                let slots = self.last_slots.clone();
                ctx.trace("undo", work, self.last_rank, &slots)?;
            }
        }
        self.loader.clear();
        let mut comm = self.connect(ctx, listener, m)?;
        // A stop from the coordinator (job failed or cancelled) or a newer generation aborts a
        // collective this rank is blocked in.
        ctx.control.set_abort(Some(comm.abort_handle()));
        if ctx.control.regenerate() {
            return Ok(SessionEnd::NewGeneration("a newer generation was announced while forming this one".into()));
        }
        let sync_started = Instant::now();
        match &m.source {
            StateSource::Rank(root) => {
                // Only the source's state is known good until the broadcast completes.
                *has_state = *has_state && *root == rank;
                self.trainer
                    .broadcast_state(comm.as_mut(), *root as usize)
                    .context("cannot take the state source's state")?;
            }
            StateSource::Checkpoint(dir) => {
                *has_state = false;
                // A checkpoint that does not fit the job's model is the job's problem, not this
                // worker's: fatal.
                restore_checkpoint(&mut self.trainer, Path::new(dir))
                    .map_err(|e| e.context(Fatal(format!("cannot restore the committed checkpoint {dir}"))))?;
            }
        }
        if self.trainer.applied_steps != m.start_step {
            bail!(
                "the state of generation {} holds {} steps, but the generation starts at step {}",
                m.generation,
                self.trainer.applied_steps,
                m.start_step
            );
        }
        *has_state = true;
        eprintln!(
            "rank {rank}: ring formed, state synchronised at step {} in {:.1} ms",
            m.start_step,
            sync_started.elapsed().as_secs_f64() * 1e3
        );

        let generation = m.generation;
        let fetch = |step: u64| -> anyhow::Result<Work> {
            let resp = ctx.call("fetch work", async |mut c| {
                c.fetch_work(pb::FetchWorkRequest { worker_id: ctx.worker_id.clone(), generation, step }).await
            })?;
            Work::try_from(resp).context("the coordinator sent inconsistent work")
        };
        let mut prefetched: Option<(u64, Work)> = None;
        let skip_bad = cfg.on_error() == OnError::Skip;
        let names = self.trainer.objective.term_names();
        let mut step = m.start_step;
        let mut until: Option<u64> = None;
        loop {
            if let Some(why) = ctx.control.reason() {
                bail!("stopping: {why}");
            }
            if ctx.control.regenerate() {
                return Ok(SessionEnd::NewGeneration(format!(
                    "the coordinator is forming generation {}",
                    ctx.control.announced.load(Ordering::SeqCst)
                )));
            }
            if until.is_none() && ctx.control.leave.load(Ordering::SeqCst) {
                let req = pb::LeaveRequest { worker_id: ctx.worker_id.clone(), generation };
                let resp = ctx.call("leave", async |mut c| c.leave(req.clone()).await)?;
                eprintln!("rank {rank}: leaving after step {}", resp.until_step);
                until = Some(resp.until_step);
            }
            if until.is_some_and(|u| step >= u) {
                return Ok(SessionEnd::Left);
            }
            ctx.control.step.store(step, Ordering::Relaxed);
            let t0 = Instant::now();
            let work = match prefetched.take() {
                Some((s, w)) if s == step => w,
                _ => fetch(step)?,
            };
            let work = match work {
                Work::Step(w) => w,
                Work::Wait => {
                    // The last step is trained but not committed everywhere yet.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Work::Rendezvous => {
                    return Ok(SessionEnd::NewGeneration(format!("the generation ends before step {step}")));
                }
                Work::Done => return Ok(SessionEnd::Done),
                Work::Ended(why) => {
                    ctx.control.stop(why.clone());
                    bail!("{why}");
                }
            };
            self.loader.submit(step, requests(step, &work))?;
            // Prefetch: the next step's work and samples load while this one trains.
            if step + 1 < cfg.steps && until.is_none_or(|u| step + 1 < u) {
                let next = fetch(step + 1)?;
                if let Work::Step(n) = &next {
                    self.loader.submit(step + 1, requests(step + 1, n))?;
                }
                prefetched = Some((step + 1, next));
            }
            let mut samples = Vec::new();
            let mut tags = Vec::new();
            let mut skipped_slots = Vec::new();
            for (loaded, s) in self.loader.take(step)?.into_iter().zip(&work.samples) {
                match loaded {
                    Ok(sample) => {
                        samples.push(sample);
                        let offset = self.dataset_offsets.get(s.dataset as usize).copied().unwrap_or_default();
                        tags.push(SampleTag { id: offset + s.index as i64, epoch: work.epoch, slot: s.slot });
                    }
                    // Skipped samples are logged (shard and key) and counted in the job's status.
                    Err(e) if skip_bad => {
                        skipped_slots.push(s.slot);
                        eprintln!("rank {rank}: step {step}: skipped a sample: {e:#}");
                    }
                    Err(e) => {
                        return Err(e.context(Fatal(format!("step {step}: loading (data.on_error = \"fail\")"))));
                    }
                }
            }
            let batch = batch::build(&samples, &tags, &self.batch_opts)
                .with_context(|| format!("step {step}: cannot build the batch"))?
                .to_device(self.device);
            let data_time = t0.elapsed();
            // Under the fail policy every rank brings exactly its planned rows; skipping may bring fewer.
            let expected = (!skip_bad).then(|| {
                (
                    (work.local_slots.start - work.global_slots.start) as usize,
                    (work.global_slots.end - work.global_slots.start) as usize,
                )
            });
            let out = self
                .trainer
                .step(comm.as_mut(), &batch, expected, work.learning_rate)
                .with_context(|| format!("step {step} (rank {rank})"))?;
            // Applied: what this rank trained, for the audit.
            let trained: Vec<u64> = work.local_slots.clone().filter(|s| !skipped_slots.contains(s)).collect();
            ctx.trace("apply", &work, rank, &trained)?;
            self.last_work = Some(work.clone());
            self.last_slots = trained;
            self.last_rank = rank;
            self.last_loss = Some(out.total);
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
                || work.checkpoint
                || (cfg.checkpoint.every_steps > 0 && done_steps.is_multiple_of(cfg.checkpoint.every_steps));
            if due && rank == 0 {
                let ends_epoch = work.global_slots.end >= self.epoch_len;
                let meta = CheckpointMeta {
                    format: checkpoint::FORMAT.into(),
                    job_id: ctx.job_id.clone(),
                    step: done_steps,
                    // Where the next step starts: the next slot of this epoch, or slot 0 of the next.
                    epoch: if ends_epoch { work.epoch + 1 } else { work.epoch },
                    next_slot_in_epoch: if ends_epoch { 0 } else { work.global_slots.end },
                    generation,
                    world_size: m.world,
                    loss_total: out.total,
                    created_unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                };
                let t = &self.trainer;
                let path = checkpoint::write(
                    Path::new(&cfg.checkpoint.dir),
                    &meta,
                    &t.model.state_on_cpu(),
                    &t.opt.state().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu))).collect::<Vec<_>>(),
                    &t.banks.as_ref().map(Banks::state_on_cpu).unwrap_or_default(),
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
                skipped_samples: skipped_slots.len() as u32,
                device: match self.device {
                    Device::Cuda(n) => format!("cuda:{n}"),
                    _ => "cpu".into(),
                },
            };
            let report = pb::ReportStepRequest {
                worker_id: ctx.worker_id.clone(),
                generation,
                metrics: Some(metrics),
                checkpoint: checkpoint_dir,
                local_slot_begin: work.local_slots.start,
                local_slot_end: work.local_slots.end,
                skipped_slots,
            };
            ctx.call("report step", async |mut c| c.report_step(report.clone()).await)?;
            step += 1;
        }
    }

    fn dump_state(&self, ctx: &Ctx, rank: u32) -> anyhow::Result<()> {
        let Some(dir) = &ctx.opts.dump_state else { return Ok(()) };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("rank-{rank}.safetensors"));
        let mut state: Vec<(String, Tensor)> = self.trainer.model.state_on_cpu();
        state.extend(self.trainer.opt.state().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))));
        if let Some(b) = &self.trainer.banks {
            state.extend(b.state_on_cpu());
        }
        Tensor::write_safetensors(&state, &path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Restores a committed checkpoint: model (parameters and buffers), momentum, memory banks and the
/// step count. A missing, extra or mis-shaped tensor is refused, naming it.
fn restore_checkpoint(trainer: &mut Trainer, dir: &Path) -> anyhow::Result<()> {
    let (meta, model, opt, banks) = checkpoint::read(dir)?;
    crate::weights::copy_into(&format!("{}/model.safetensors", dir.display()), &trainer.model.state(), &model)?;
    trainer.opt.load_state(&opt).map_err(|e| anyhow::anyhow!("{}/optimizer.safetensors: {e}", dir.display()))?;
    if let Some(target) = &mut trainer.banks {
        let banks = banks.with_context(|| format!("{} has no memory banks (banks.safetensors)", dir.display()))?;
        target.load(&banks, &format!("{}/banks.safetensors", dir.display()))?;
    }
    trainer.applied_steps = meta.step;
    trainer.forget_undo();
    eprintln!("restored {} (step {})", dir.display(), meta.step);
    Ok(())
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

/// The loader requests of one step's work (its slice was checked when the work was decoded).
fn requests(step: u64, work: &StepWork) -> Vec<Request> {
    work.samples
        .iter()
        .enumerate()
        .map(|(position, s)| Request {
            step,
            position,
            dataset: s.dataset as usize,
            index: s.index,
            epoch: work.epoch,
            slot: s.slot,
            ticket: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_are_recognised_under_any_context() {
        let data = anyhow::anyhow!("corrupt png").context(Fatal("step 1: loading".into())).context("outer");
        assert!(is_fatal(&data));
        let diverged = anyhow::Error::from(crate::train::StepError::NonFinite(f64::NAN)).context("step 3 (rank 0)");
        assert!(is_fatal(&diverged));
        let comm = anyhow::Error::from(CommError::Aborted { op: "all_reduce", reason: "peer gone".into() })
            .context("step 3 (rank 1)");
        assert!(!is_fatal(&comm) && is_membership_error(&comm));
        assert!(!is_fatal(&anyhow::anyhow!("disk full")));
    }

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
