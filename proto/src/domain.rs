//! Validated domain types: what the services work with once a request has been received.
//!
//! Each request message converts with `TryFrom` exactly once, at the boundary. Required fields become
//! non-optional; a bad field becomes a [`FieldError`] naming it, answered as `InvalidArgument`.

use std::collections::BTreeMap;

use crate::config::JobConfig;
use crate::pb;

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { field: field.into(), reason: reason.into() }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Job identifier assigned by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub String);

/// Worker identifier assigned by the coordinator at join.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WorkerId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn id_field(field: &str, value: &str) -> Result<String, FieldError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if v.len() > 128 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(FieldError::new(field, "must be at most 128 characters of [A-Za-z0-9-_.:]"));
    }
    Ok(v.to_string())
}

fn job_id(field: &str, value: &str) -> Result<JobId, FieldError> {
    id_field(field, value).map(JobId)
}

fn worker_id(value: &str) -> Result<WorkerId, FieldError> {
    id_field("worker_id", value).map(WorkerId)
}

/// `host:port` with a non-zero port; the host is a name or an IP literal (IPv6 in brackets).
pub fn parse_host_port(field: &str, value: &str) -> Result<String, FieldError> {
    let (host, port) =
        value.rsplit_once(':').ok_or_else(|| FieldError::new(field, format!("{value:?} is not host:port")))?;
    let port: u16 = port.parse().map_err(|_| FieldError::new(field, format!("{value:?} has no valid port")))?;
    if port == 0 {
        return Err(FieldError::new(field, format!("{value:?}: port 0 is not an address peers can reach")));
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if bare.is_empty() {
        return Err(FieldError::new(field, format!("{value:?} has no host")));
    }
    if bare == "0.0.0.0" || bare == "::" {
        return Err(FieldError::new(
            field,
            format!("{value:?}: an unspecified address is not reachable; pass --advertise-addr"),
        ));
    }
    Ok(value.to_string())
}

/// Validated `SubmitJob`.
#[derive(Debug, Clone)]
pub struct SubmitJob {
    pub config: JobConfig,
    /// A checkpoint directory to start from.
    pub resume: Option<String>,
}

impl TryFrom<pb::SubmitJobRequest> for SubmitJob {
    type Error = FieldError;
    fn try_from(r: pb::SubmitJobRequest) -> Result<Self, FieldError> {
        if r.spec_toml.trim().is_empty() {
            return Err(FieldError::new("spec_toml", "must not be empty"));
        }
        let config = JobConfig::from_toml(&r.spec_toml).map_err(|e| FieldError::new("spec_toml", e.to_string()))?;
        let resume = (!r.resume_checkpoint.trim().is_empty()).then(|| r.resume_checkpoint.trim().to_string());
        Ok(SubmitJob { config, resume })
    }
}

/// A request that names one job (`GetJob`, `WatchJob`).
#[derive(Debug, Clone)]
pub struct JobRef {
    pub job_id: JobId,
}

impl TryFrom<pb::CheckpointJobRequest> for JobRef {
    type Error = FieldError;
    fn try_from(r: pb::CheckpointJobRequest) -> Result<Self, FieldError> {
        Ok(JobRef { job_id: job_id("job_id", &r.job_id)? })
    }
}

impl TryFrom<pb::GetJobRequest> for JobRef {
    type Error = FieldError;
    fn try_from(r: pb::GetJobRequest) -> Result<Self, FieldError> {
        Ok(JobRef { job_id: job_id("job_id", &r.job_id)? })
    }
}

impl TryFrom<pb::WatchJobRequest> for JobRef {
    type Error = FieldError;
    fn try_from(r: pb::WatchJobRequest) -> Result<Self, FieldError> {
        Ok(JobRef { job_id: job_id("job_id", &r.job_id)? })
    }
}

/// Validated `CancelJob`.
#[derive(Debug, Clone)]
pub struct CancelJob {
    pub job_id: JobId,
    pub reason: String,
}

impl TryFrom<pb::CancelJobRequest> for CancelJob {
    type Error = FieldError;
    fn try_from(r: pb::CancelJobRequest) -> Result<Self, FieldError> {
        let reason = if r.reason.trim().is_empty() { "cancelled by request".to_string() } else { r.reason };
        Ok(CancelJob { job_id: job_id("job_id", &r.job_id)?, reason })
    }
}

/// Validated `Join`.
#[derive(Debug, Clone)]
pub struct Join {
    pub job_id: Option<JobId>,
    pub host_id: String,
    pub collective_addr: String,
    pub device: String,
    pub pid: u32,
}

impl TryFrom<pb::JoinRequest> for Join {
    type Error = FieldError;
    fn try_from(r: pb::JoinRequest) -> Result<Self, FieldError> {
        let job_id = if r.job_id.trim().is_empty() { None } else { Some(job_id("job_id", &r.job_id)?) };
        let host_id = id_field("host_id", &r.host_id)?;
        let collective_addr = parse_host_port("collective_addr", &r.collective_addr)?;
        let device = r.device.trim().to_string();
        if !valid_device(&device) {
            return Err(FieldError::new("device", format!("{device:?} is not \"cpu\" or \"cuda:N\"")));
        }
        Ok(Join { job_id, host_id, collective_addr, device, pid: r.pid })
    }
}

/// Who is calling, and in which generation: carried by every worker call after `Join`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerCall {
    pub worker_id: WorkerId,
    pub generation: u64,
}

/// Validated `Rendezvous`.
#[derive(Debug, Clone, Default)]
pub struct Rendezvous {
    pub call: WorkerCall,
    pub collective_bootstrap: Vec<u8>,
    /// What the worker's model state holds, when it holds any.
    pub state: Option<HeldState>,
}

/// The trained state a worker brings to a rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldState {
    /// Steps applied to it.
    pub applied_steps: u64,
    /// It can also go back one step (it keeps the undo record of its last applied step).
    pub can_undo: bool,
}

impl HeldState {
    /// Whether this state can become the state after `steps` steps.
    pub fn reaches(&self, steps: u64) -> bool {
        self.applied_steps == steps || (self.can_undo && self.applied_steps == steps + 1)
    }
}

/// Largest accepted collective bootstrap (an NCCL unique id is 128 bytes).
pub const MAX_BOOTSTRAP_BYTES: usize = 4096;

impl TryFrom<pb::RendezvousRequest> for Rendezvous {
    type Error = FieldError;
    fn try_from(r: pb::RendezvousRequest) -> Result<Self, FieldError> {
        if r.collective_bootstrap.len() > MAX_BOOTSTRAP_BYTES {
            return Err(FieldError::new("collective_bootstrap", format!("at most {MAX_BOOTSTRAP_BYTES} bytes")));
        }
        if !r.has_state && (r.applied_steps != 0 || r.can_undo) {
            return Err(FieldError::new("has_state", "is false, but applied_steps or can_undo describe a state"));
        }
        if r.can_undo && r.applied_steps == 0 {
            return Err(FieldError::new("can_undo", "a state of 0 applied steps has no step to undo"));
        }
        Ok(Rendezvous {
            call: WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation },
            collective_bootstrap: r.collective_bootstrap,
            state: r.has_state.then_some(HeldState { applied_steps: r.applied_steps, can_undo: r.can_undo }),
        })
    }
}

/// Validated `Heartbeat`.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub call: WorkerCall,
    pub step: u64,
}

impl TryFrom<pb::HeartbeatRequest> for Heartbeat {
    type Error = FieldError;
    fn try_from(r: pb::HeartbeatRequest) -> Result<Self, FieldError> {
        Ok(Heartbeat {
            call: WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation },
            step: r.step,
        })
    }
}

/// Validated `FetchWork`.
#[derive(Debug, Clone)]
pub struct FetchWork {
    pub call: WorkerCall,
    pub step: u64,
}

impl TryFrom<pb::FetchWorkRequest> for FetchWork {
    type Error = FieldError;
    fn try_from(r: pb::FetchWorkRequest) -> Result<Self, FieldError> {
        if r.generation == 0 {
            return Err(FieldError::new("generation", "must be the generation from Rendezvous (>= 1)"));
        }
        Ok(FetchWork {
            call: WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation },
            step: r.step,
        })
    }
}

/// Metrics of one step, all values finite and non-negative where they are times or rates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepMetrics {
    pub step: u64,
    pub loss_total: f64,
    pub loss_terms: BTreeMap<String, f64>,
    pub samples_per_sec: f64,
    pub step_ms: f64,
    pub data_ms: f64,
    pub compute_ms: f64,
    pub comm_ms: f64,
    pub local_samples: u32,
    pub learning_rate: f64,
    pub skipped_samples: u32,
    /// `cpu` or `cuda:N`; empty when the worker did not say.
    pub device: String,
}

/// `cpu` or `cuda:N`.
fn valid_device(device: &str) -> bool {
    device == "cpu" || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok())
}

impl TryFrom<pb::StepMetrics> for StepMetrics {
    type Error = FieldError;
    fn try_from(m: pb::StepMetrics) -> Result<Self, FieldError> {
        let time = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(FieldError::new(format!("metrics.{field}"), format!("{v} is not a non-negative number")))
            }
        };
        // A contrastive term is a cross-entropy: never below 0 (beyond rounding).
        let loss = |field: &str, v: f64| {
            if v.is_finite() && v >= -1e-6 {
                Ok(v)
            } else {
                Err(FieldError::new(format!("metrics.{field}"), format!("{v} is not a loss (finite, >= 0)")))
            }
        };
        let mut loss_terms = BTreeMap::new();
        for (k, v) in m.loss_terms {
            if k.is_empty() {
                return Err(FieldError::new("metrics.loss_terms", "term names must not be empty"));
            }
            let v = loss(&format!("loss_terms.{k}"), v)?;
            loss_terms.insert(k, v);
        }
        let device = m.device.trim().to_string();
        if !device.is_empty() && !valid_device(&device) {
            return Err(FieldError::new("metrics.device", format!("{device:?} is not \"cpu\" or \"cuda:N\"")));
        }
        Ok(StepMetrics {
            step: m.step,
            loss_total: loss("loss_total", m.loss_total)?,
            loss_terms,
            samples_per_sec: time("samples_per_sec", m.samples_per_sec)?,
            step_ms: time("step_ms", m.step_ms)?,
            data_ms: time("data_ms", m.data_ms)?,
            compute_ms: time("compute_ms", m.compute_ms)?,
            comm_ms: time("comm_ms", m.comm_ms)?,
            local_samples: m.local_samples,
            learning_rate: time("learning_rate", m.learning_rate)?,
            skipped_samples: m.skipped_samples,
            device,
        })
    }
}

impl From<&StepMetrics> for pb::StepMetrics {
    fn from(m: &StepMetrics) -> Self {
        pb::StepMetrics {
            step: m.step,
            loss_total: m.loss_total,
            loss_terms: m.loss_terms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            samples_per_sec: m.samples_per_sec,
            step_ms: m.step_ms,
            data_ms: m.data_ms,
            compute_ms: m.compute_ms,
            comm_ms: m.comm_ms,
            local_samples: m.local_samples,
            learning_rate: m.learning_rate,
            skipped_samples: m.skipped_samples,
            device: m.device.clone(),
        }
    }
}

/// Validated `ReportStep`.
#[derive(Debug, Clone, Default)]
pub struct ReportStep {
    pub call: WorkerCall,
    pub metrics: StepMetrics,
    pub checkpoint: Option<String>,
    /// The plan slots the rank was given (`[local_slot_begin, local_slot_end)`).
    pub slots: std::ops::Range<u64>,
    /// Those of `slots` it skipped (data.on_error = "skip"), ascending.
    pub skipped_slots: Vec<u64>,
}

impl TryFrom<pb::ReportStepRequest> for ReportStep {
    type Error = FieldError;
    fn try_from(r: pb::ReportStepRequest) -> Result<Self, FieldError> {
        let call = WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation };
        let metrics = r.metrics.ok_or_else(|| FieldError::new("metrics", "is required"))?.try_into()?;
        let checkpoint = if r.checkpoint.is_empty() { None } else { Some(r.checkpoint) };
        if r.local_slot_end < r.local_slot_begin {
            return Err(FieldError::new(
                "local_slot_end",
                format!("{} is before local_slot_begin {}", r.local_slot_end, r.local_slot_begin),
            ));
        }
        let slots = r.local_slot_begin..r.local_slot_end;
        if !r.skipped_slots.windows(2).all(|w| w[0] < w[1]) || !r.skipped_slots.iter().all(|s| slots.contains(s)) {
            return Err(FieldError::new(
                "skipped_slots",
                format!("must be ascending slots within [{}, {})", slots.start, slots.end),
            ));
        }
        Ok(ReportStep { call, metrics, checkpoint, slots, skipped_slots: r.skipped_slots })
    }
}

/// Validated `ReportFailure`.
#[derive(Debug, Clone)]
pub struct ReportFailure {
    pub call: WorkerCall,
    pub step: u64,
    pub message: String,
    pub failed_rank: Option<u32>,
    /// No new generation can help: the job fails.
    pub fatal: bool,
}

impl TryFrom<pb::ReportFailureRequest> for ReportFailure {
    type Error = FieldError;
    fn try_from(r: pb::ReportFailureRequest) -> Result<Self, FieldError> {
        let call = WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation };
        if r.message.trim().is_empty() {
            return Err(FieldError::new("message", "must say what failed"));
        }
        let failed_rank = match r.failed_rank {
            -1 => None,
            n if n >= 0 => Some(n as u32),
            n => return Err(FieldError::new("failed_rank", format!("{n} is not a rank or -1"))),
        };
        Ok(ReportFailure { call, step: r.step, message: r.message, failed_rank, fatal: r.fatal })
    }
}

/// Validated `Leave`.
#[derive(Debug, Clone)]
pub struct Leave {
    pub call: WorkerCall,
}

impl TryFrom<pb::LeaveRequest> for Leave {
    type Error = FieldError;
    fn try_from(r: pb::LeaveRequest) -> Result<Self, FieldError> {
        Ok(Leave { call: WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation } })
    }
}

/// Validated `ScaleJob`.
#[derive(Debug, Clone)]
pub struct ScaleJob {
    pub job_id: JobId,
    pub workers: u32,
}

impl TryFrom<pb::ScaleJobRequest> for ScaleJob {
    type Error = FieldError;
    fn try_from(r: pb::ScaleJobRequest) -> Result<Self, FieldError> {
        if r.workers == 0 {
            return Err(FieldError::new("workers", "must be at least 1"));
        }
        Ok(ScaleJob { job_id: job_id("job_id", &r.job_id)?, workers: r.workers })
    }
}

/// Validated `GetLedger`.
#[derive(Debug, Clone)]
pub struct LedgerRef {
    pub job_id: JobId,
    pub epoch: u64,
}

impl TryFrom<pb::GetLedgerRequest> for LedgerRef {
    type Error = FieldError;
    fn try_from(r: pb::GetLedgerRequest) -> Result<Self, FieldError> {
        Ok(LedgerRef { job_id: job_id("job_id", &r.job_id)?, epoch: r.epoch })
    }
}

/// A ring neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Neighbour {
    pub worker_id: String,
    pub host_id: String,
    pub collective_addr: String,
}

impl From<Neighbour> for pb::Peer {
    fn from(n: Neighbour) -> pb::Peer {
        pb::Peer { worker_id: n.worker_id, host_id: n.host_id, collective_addr: n.collective_addr }
    }
}

impl From<pb::Peer> for Neighbour {
    fn from(p: pb::Peer) -> Neighbour {
        Neighbour { worker_id: p.worker_id, host_id: p.host_id, collective_addr: p.collective_addr }
    }
}

/// Where the members of a new generation take their state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// This rank's state (after its undo, if it needs one) is broadcast to every member.
    Rank(u32),
    /// Every member loads this committed checkpoint directory.
    Checkpoint(String),
}

/// What a worker learns when its rendezvous completes: converted once on each side of the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// A member of `generation`.
    Member(Box<Membership>),
    /// Not needed (scale-down, or more workers than the target): exit 0.
    Released { generation: u64 },
}

/// A member's place in a sealed generation: its neighbours, never the whole world.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
    pub left: Neighbour,
    pub right: Neighbour,
    /// This rank's own entry (its host id decides shared memory with its neighbours).
    pub me: Neighbour,
    pub local_rank: u32,
    pub local_world: u32,
    pub bootstrap: Vec<u8>,
    /// The first step the generation trains.
    pub start_step: u64,
    pub source: StateSource,
}

impl From<Assignment> for pb::RendezvousResponse {
    fn from(a: Assignment) -> pb::RendezvousResponse {
        match a {
            Assignment::Released { generation } => {
                pb::RendezvousResponse { ready: true, released: true, generation, ..Default::default() }
            }
            Assignment::Member(m) => {
                let m = *m;
                let (state_source_rank, restore_checkpoint) = match m.source {
                    StateSource::Rank(r) => (r as i32, String::new()),
                    StateSource::Checkpoint(dir) => (-1, dir),
                };
                pb::RendezvousResponse {
                    ready: true,
                    generation: m.generation,
                    rank: m.rank,
                    world_size: m.world,
                    peers: Vec::new(),
                    collective_bootstrap: m.bootstrap,
                    start_step: m.start_step,
                    restore_checkpoint,
                    state_source_rank,
                    left: Some(m.left.into()),
                    right: Some(m.right.into()),
                    local_rank: m.local_rank,
                    local_world: m.local_world,
                    released: false,
                }
            }
        }
    }
}

impl TryFrom<pb::RendezvousResponse> for Option<Assignment> {
    type Error = FieldError;
    /// `None` when the response is not ready (poll again).
    fn try_from(r: pb::RendezvousResponse) -> Result<Self, FieldError> {
        if !r.ready {
            return Ok(None);
        }
        if r.released {
            return Ok(Some(Assignment::Released { generation: r.generation }));
        }
        if r.generation == 0 {
            return Err(FieldError::new("generation", "a sealed generation is numbered from 1"));
        }
        if r.world_size == 0 || r.rank >= r.world_size {
            return Err(FieldError::new("rank", format!("rank {} outside a world of {}", r.rank, r.world_size)));
        }
        if r.local_world == 0 || r.local_rank >= r.local_world {
            return Err(FieldError::new(
                "local_rank",
                format!("{} outside {} ranks on this host", r.local_rank, r.local_world),
            ));
        }
        let source = match (r.state_source_rank, r.restore_checkpoint.is_empty()) {
            (n, true) if n >= 0 && (n as u32) < r.world_size => StateSource::Rank(n as u32),
            (-1, false) => StateSource::Checkpoint(r.restore_checkpoint),
            (n, _) => {
                return Err(FieldError::new(
                    "state_source_rank",
                    format!("{n} is not a rank of the world of {}, or -1 with restore_checkpoint", r.world_size),
                ));
            }
        };
        let left = r.left.ok_or_else(|| FieldError::new("left", "is required"))?.into();
        let right = r.right.ok_or_else(|| FieldError::new("right", "is required"))?.into();
        // The rank's own entry: from `peers` when the coordinator sent the world, else rebuilt from
        // the neighbours (a world of one is its own neighbour).
        let me = match r.peers.get(r.rank as usize) {
            Some(p) => p.clone().into(),
            None if r.world_size == 1 => Neighbour::clone(&left),
            None => Neighbour::default(),
        };
        Ok(Some(Assignment::Member(Box::new(Membership {
            generation: r.generation,
            rank: r.rank,
            world: r.world_size,
            left,
            right,
            me,
            local_rank: r.local_rank,
            local_world: r.local_world,
            bootstrap: r.collective_bootstrap,
            start_step: r.start_step,
            source,
        }))))
    }
}

/// One step's work for one rank, as the worker uses it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepWork {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// The step's global batch: plan slots of `epoch`.
    pub global_slots: std::ops::Range<u64>,
    /// This rank's slice of it.
    pub local_slots: std::ops::Range<u64>,
    /// The samples of `local_slots`, in slot order.
    pub samples: Vec<pb::SampleRef>,
    pub learning_rate: f64,
    /// Rank 0 writes a checkpoint after this step (on demand).
    pub checkpoint: bool,
}

/// What `FetchWork` answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Step(StepWork),
    /// The generation ends before this step: rendezvous for the next one.
    Rendezvous,
    /// Nothing to train yet (past the last step, which is not committed): fetch again shortly.
    Wait,
    /// The job has no more steps.
    Done,
    /// The job failed or was cancelled: why.
    Ended(String),
}

impl From<Work> for pb::FetchWorkResponse {
    fn from(w: Work) -> pb::FetchWorkResponse {
        match w {
            Work::Step(s) => pb::FetchWorkResponse {
                done: false,
                step: s.step,
                epoch: s.epoch,
                step_in_epoch: s.step_in_epoch,
                global_slot_begin: s.global_slots.start,
                global_slot_end: s.global_slots.end,
                local_slot_begin: s.local_slots.start,
                local_slot_end: s.local_slots.end,
                samples: s.samples,
                learning_rate: s.learning_rate,
                message: String::new(),
                rendezvous: false,
                wait: false,
                checkpoint: s.checkpoint,
            },
            Work::Rendezvous => pb::FetchWorkResponse { rendezvous: true, ..Default::default() },
            Work::Wait => pb::FetchWorkResponse { wait: true, ..Default::default() },
            Work::Done => pb::FetchWorkResponse { done: true, ..Default::default() },
            Work::Ended(message) => pb::FetchWorkResponse { done: true, message, ..Default::default() },
        }
    }
}

impl TryFrom<pb::FetchWorkResponse> for Work {
    type Error = FieldError;
    fn try_from(w: pb::FetchWorkResponse) -> Result<Self, FieldError> {
        if w.rendezvous {
            return Ok(Work::Rendezvous);
        }
        if w.wait {
            return Ok(Work::Wait);
        }
        if w.done {
            return Ok(if w.message.is_empty() { Work::Done } else { Work::Ended(w.message) });
        }
        let slots_ok = w.global_slot_begin <= w.local_slot_begin
            && w.local_slot_begin <= w.local_slot_end
            && w.local_slot_end <= w.global_slot_end
            && w.samples.len() as u64 == w.local_slot_end - w.local_slot_begin
            && w.samples.iter().zip(w.local_slot_begin..).all(|(s, slot)| s.slot == slot);
        if !slots_ok {
            return Err(FieldError::new(
                "samples",
                format!(
                    "step {}: inconsistent slice: global [{}, {}), local [{}, {}), {} samples",
                    w.step,
                    w.global_slot_begin,
                    w.global_slot_end,
                    w.local_slot_begin,
                    w.local_slot_end,
                    w.samples.len()
                ),
            ));
        }
        Ok(Work::Step(StepWork {
            step: w.step,
            epoch: w.epoch,
            step_in_epoch: w.step_in_epoch,
            global_slots: w.global_slot_begin..w.global_slot_end,
            local_slots: w.local_slot_begin..w.local_slot_end,
            samples: w.samples,
            learning_rate: w.learning_rate,
            checkpoint: w.checkpoint,
        }))
    }
}

/// Errors of worker calls that the worker acts on, carried in the gRPC status as metadata (the
/// message stays human-readable) and decoded once on the worker: "rendezvous again" and "stop" are
/// never told apart by parsing messages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The call named an older generation: rendezvous for `current`.
    #[error("{message}")]
    StaleGeneration { current: u64, message: String },
    /// The job failed, was cancelled or completed: stop.
    #[error("{message}")]
    JobEnded { state: String, message: String },
    /// The coordinator no longer knows this worker (evicted, or another coordinator's): stop.
    #[error("{message}")]
    UnknownWorker { message: String },
    /// Anything else: refused for the reason given, or the coordinator was unreachable.
    #[error("{message}")]
    Other { code: tonic::Code, message: String },
}

const ERROR_KIND: &str = "hcmoco-error";
const ERROR_GENERATION: &str = "hcmoco-generation";
const ERROR_STATE: &str = "hcmoco-job-state";

impl CallError {
    /// The status a coordinator answers with.
    pub fn into_status(self) -> tonic::Status {
        let mut status = match &self {
            CallError::StaleGeneration { message, .. } => tonic::Status::failed_precondition(message.clone()),
            CallError::JobEnded { message, .. } => tonic::Status::failed_precondition(message.clone()),
            CallError::UnknownWorker { message } => tonic::Status::not_found(message.clone()),
            CallError::Other { code, message } => tonic::Status::new(*code, message.clone()),
        };
        let md = status.metadata_mut();
        let mut put = |k: &'static str, v: String| {
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        };
        match self {
            CallError::StaleGeneration { current, .. } => {
                put(ERROR_KIND, "stale-generation".into());
                put(ERROR_GENERATION, current.to_string());
            }
            CallError::JobEnded { state, .. } => {
                put(ERROR_KIND, "job-ended".into());
                put(ERROR_STATE, state);
            }
            CallError::UnknownWorker { .. } => put(ERROR_KIND, "unknown-worker".into()),
            CallError::Other { .. } => {}
        }
        status
    }

    /// Decodes what a worker call's error status means.
    pub fn from_status(s: &tonic::Status) -> CallError {
        let md = s.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let message = s.message().to_string();
        match get(ERROR_KIND).as_deref() {
            Some("stale-generation") => match get(ERROR_GENERATION).and_then(|g| g.parse().ok()) {
                Some(current) => CallError::StaleGeneration { current, message },
                None => CallError::Other { code: s.code(), message },
            },
            Some("job-ended") => CallError::JobEnded { state: get(ERROR_STATE).unwrap_or_default(), message },
            Some("unknown-worker") => CallError::UnknownWorker { message },
            _ => CallError::Other { code: s.code(), message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> pb::JoinRequest {
        pb::JoinRequest {
            job_id: String::new(),
            host_id: "node-a".into(),
            collective_addr: "127.0.0.1:4000".into(),
            device: "cpu".into(),
            pid: 7,
        }
    }

    fn field_of<T: std::fmt::Debug>(r: Result<T, FieldError>) -> String {
        let e = r.expect_err("must be refused");
        let status: tonic::Status = e.clone().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(&e.field), "{} should name {}", status.message(), e.field);
        e.field
    }

    #[test]
    fn valid_join_converts() {
        let j = Join::try_from(join()).expect("valid");
        assert_eq!(j.job_id, None);
        assert_eq!(j.collective_addr, "127.0.0.1:4000");
    }

    #[test]
    fn each_invalid_join_field_is_named() {
        type Mutation = fn(&mut pb::JoinRequest);
        let cases: Vec<(Mutation, &str)> = vec![
            (|r| r.host_id = String::new(), "host_id"),
            (|r| r.host_id = "a b".into(), "host_id"),
            (|r| r.collective_addr = "nohost".into(), "collective_addr"),
            (|r| r.collective_addr = "127.0.0.1:0".into(), "collective_addr"),
            (|r| r.collective_addr = "0.0.0.0:4000".into(), "collective_addr"),
            (|r| r.collective_addr = "127.0.0.1:99999".into(), "collective_addr"),
            (|r| r.device = "tpu".into(), "device"),
            (|r| r.job_id = "bad id!".into(), "job_id"),
        ];
        for (mutate, field) in cases {
            let mut r = join();
            mutate(&mut r);
            assert_eq!(field_of(Join::try_from(r)), field);
        }
    }

    #[test]
    fn each_invalid_worker_call_field_is_named() {
        assert_eq!(field_of(Heartbeat::try_from(pb::HeartbeatRequest::default())), "worker_id");
        let fetch = pb::FetchWorkRequest { worker_id: "w-1".into(), generation: 0, step: 0 };
        assert_eq!(field_of(FetchWork::try_from(fetch)), "generation");
        let rdv = pb::RendezvousRequest {
            worker_id: "w-1".into(),
            generation: 0,
            collective_bootstrap: vec![0; MAX_BOOTSTRAP_BYTES + 1],
            ..Default::default()
        };
        assert_eq!(field_of(Rendezvous::try_from(rdv)), "collective_bootstrap");
        let report =
            pb::ReportStepRequest { worker_id: "w-1".into(), generation: 1, metrics: None, ..Default::default() };
        assert_eq!(field_of(ReportStep::try_from(report)), "metrics");
        let nan = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { loss_total: f64::NAN, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(nan)), "metrics.loss_total");
        let neg = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { step_ms: -1.0, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(neg)), "metrics.step_ms");
        let gpu = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { device: "gpu0".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(gpu)), "metrics.device");
        let absurd = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { loss_total: -1e308, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(absurd)), "metrics.loss_total");
        let mut terms = std::collections::HashMap::new();
        terms.insert("dicl_r2d".to_string(), f64::NAN);
        let nan = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { loss_terms: terms, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(nan)), "metrics.loss_terms.dicl_r2d");
        let fail = pb::ReportFailureRequest {
            worker_id: "w-1".into(),
            generation: 1,
            step: 0,
            message: " ".into(),
            failed_rank: -1,
            fatal: false,
        };
        assert_eq!(field_of(ReportFailure::try_from(fail)), "message");
        let fail = pb::ReportFailureRequest {
            worker_id: "w-1".into(),
            generation: 1,
            step: 0,
            message: "x".into(),
            failed_rank: -5,
            fatal: false,
        };
        assert_eq!(field_of(ReportFailure::try_from(fail)), "failed_rank");
    }

    #[test]
    fn each_invalid_job_request_field_is_named() {
        assert_eq!(field_of(JobRef::try_from(pb::GetJobRequest { job_id: String::new() })), "job_id");
        assert_eq!(
            field_of(CancelJob::try_from(pb::CancelJobRequest { job_id: "a/b".into(), reason: String::new() })),
            "job_id"
        );
        assert_eq!(
            field_of(SubmitJob::try_from(pb::SubmitJobRequest { spec_toml: String::new(), ..Default::default() })),
            "spec_toml"
        );
        let e = SubmitJob::try_from(pb::SubmitJobRequest { spec_toml: "stepz = 1".into(), ..Default::default() })
            .expect_err("unknown key");
        assert_eq!(e.field, "spec_toml");
        assert!(e.reason.contains("stepz"), "{}", e.reason);
    }

    #[test]
    fn typed_call_errors_survive_the_wire() {
        for e in [
            CallError::StaleGeneration { current: 7, message: "stale generation 6".into() },
            CallError::JobEnded { state: "cancelled".into(), message: "job job-1 is cancelled: why".into() },
            CallError::UnknownWorker { message: "unknown worker w-3".into() },
            CallError::Other { code: tonic::Code::InvalidArgument, message: "bad".into() },
        ] {
            assert_eq!(CallError::from_status(&e.clone().into_status()), e);
        }
        // A status without the metadata (a proxy, an older coordinator) is never mistaken for one.
        let plain = tonic::Status::failed_precondition("stale generation 1: rendezvous again");
        assert!(matches!(CallError::from_status(&plain), CallError::Other { .. }));
    }

    #[test]
    fn assignments_round_trip_and_bad_ones_are_named() {
        let n = |i: u32| Neighbour {
            worker_id: format!("w-{i}"),
            host_id: "h".into(),
            collective_addr: format!("127.0.0.1:{}", 4000 + i),
        };
        let m = Membership {
            generation: 3,
            rank: 1,
            world: 3,
            left: n(0),
            right: n(2),
            me: Neighbour::default(),
            local_rank: 1,
            local_world: 3,
            bootstrap: vec![1, 2],
            start_step: 40,
            source: StateSource::Rank(0),
        };
        let wire: pb::RendezvousResponse = Assignment::Member(Box::new(m.clone())).into();
        assert_eq!(Option::<Assignment>::try_from(wire.clone()).expect("valid"), Some(Assignment::Member(Box::new(m))));
        let bad = pb::RendezvousResponse { state_source_rank: 5, ..wire.clone() };
        assert_eq!(field_of(Option::<Assignment>::try_from(bad)), "state_source_rank");
        let bad = pb::RendezvousResponse { rank: 3, ..wire };
        assert_eq!(field_of(Option::<Assignment>::try_from(bad)), "rank");
        let released: pb::RendezvousResponse = Assignment::Released { generation: 4 }.into();
        assert_eq!(
            Option::<Assignment>::try_from(released).expect("valid"),
            Some(Assignment::Released { generation: 4 })
        );
    }

    #[test]
    fn work_with_an_inconsistent_slice_is_refused() {
        let ok = pb::FetchWorkResponse {
            step: 2,
            global_slot_begin: 10,
            global_slot_end: 20,
            local_slot_begin: 12,
            local_slot_end: 14,
            samples: vec![
                pb::SampleRef { slot: 12, ..Default::default() },
                pb::SampleRef { slot: 13, ..Default::default() },
            ],
            ..Default::default()
        };
        assert!(matches!(Work::try_from(ok.clone()), Ok(Work::Step(_))));
        let short = pb::FetchWorkResponse { local_slot_end: 15, ..ok.clone() };
        assert_eq!(field_of(Work::try_from(short)), "samples");
        assert_eq!(Work::try_from(pb::FetchWorkResponse { rendezvous: true, ..ok }).expect("ok"), Work::Rendezvous);
    }

    #[test]
    fn report_step_slices_are_checked() {
        let r = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics::default()),
            local_slot_begin: 4,
            local_slot_end: 8,
            skipped_slots: vec![5, 9],
            ..Default::default()
        };
        assert_eq!(field_of(ReportStep::try_from(r.clone())), "skipped_slots");
        let back = pb::ReportStepRequest { local_slot_end: 3, skipped_slots: vec![], ..r.clone() };
        assert_eq!(field_of(ReportStep::try_from(back)), "local_slot_end");
        let good = pb::ReportStepRequest { skipped_slots: vec![5, 7], ..r };
        assert_eq!(ReportStep::try_from(good).expect("valid").slots, 4..8);
    }
}
