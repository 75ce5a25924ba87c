//! The coordinator's state: jobs, their members, generations and committed progress.
//!
//! All state sits behind one mutex held for short, non-blocking sections. Every change to a job bumps
//! that job's watch channel, which wakes long polls (rendezvous) and status streams. Time comes from
//! `tokio::time::Instant`, so lease and settle logic runs under a paused clock in tests.
//!
//! The embedded default keeps this state in memory; a persistent store (etcd, for failover) plugs in
//! at the points marked `persist`, where a change becomes visible.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hcmoco_proto::config::JobConfig;
use hcmoco_proto::domain::{self, JobId, StepMetrics, WorkerCall, WorkerId};
use hcmoco_proto::pb;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::job::JobState;
use crate::plan::DataPlan;

/// How many steps from the committed one a rank may fetch: the step it trains, and the next (prefetched
/// by its loader) while a slower rank has not yet reported the previous one.
pub const MAX_INFLIGHT_STEPS: u64 = 3;

/// Errors of coordinator operations, mapped once to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error(transparent)]
    Invalid(#[from] domain::FieldError),
    #[error("no job {0}")]
    NoJob(JobId),
    #[error("unknown worker {0} (it never joined, or it was removed)")]
    NoWorker(WorkerId),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Full(String),
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::Invalid(f) => f.into(),
            CoordError::NoJob(_) | CoordError::NoWorker(_) => tonic::Status::not_found(msg),
            CoordError::Precondition(_) => tonic::Status::failed_precondition(msg),
            CoordError::Full(_) => tonic::Status::resource_exhausted(msg),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    host_id: String,
    collective_addr: String,
    device: String,
    last_seen: Instant,
    last_seen_unix_ms: u64,
    /// The collective bootstrap bytes this worker offered at its latest rendezvous (None: not yet).
    bootstrap: Option<Vec<u8>>,
    reported_steps: u64,
    latest: Option<StepMetrics>,
}

/// One fixed membership: ranks 0..N-1 and how to reach them.
#[derive(Debug, Clone)]
struct Generation {
    number: u64,
    members: Vec<WorkerId>,
    /// Rank 0's offer, fixed when rank 0 first rendezvouses in this generation; members wait for it.
    bootstrap: Option<Vec<u8>>,
    start_step: u64,
}

#[derive(Debug)]
struct Job {
    id: JobId,
    config: JobConfig,
    config_toml: String,
    plan: DataPlan,
    state: JobState,
    message: String,
    /// Joined workers in join order.
    workers: Vec<Worker>,
    generation: Option<Generation>,
    /// When `workers.min` workers were first waiting (the settle window starts).
    quorum_since: Option<Instant>,
    committed_steps: u64,
    /// Reports of uncommitted steps: step -> rank -> metrics.
    pending_reports: BTreeMap<u64, BTreeMap<u32, StepMetrics>>,
    latest: Option<StepMetrics>,
    latest_checkpoint: String,
    /// Samples skipped under `data.on_error = "skip"`, all ranks and steps.
    skipped_samples: u64,
    submitted_unix_ms: u64,
    updated_unix_ms: u64,
    changed: watch::Sender<u64>,
}

impl Job {
    fn touch(&mut self) {
        self.updated_unix_ms = unix_ms();
        // persist: the job record changed here.
        self.changed.send_modify(|v| *v += 1);
    }

    /// "job X is cancelled: why" (the reason is left out when there is none).
    fn ended_because(&self) -> String {
        if self.message.is_empty() {
            format!("job {} is {}", self.id, self.state)
        } else {
            format!("job {} is {}: {}", self.id, self.state, self.message)
        }
    }

    fn set_state(&mut self, to: JobState, message: impl Into<String>) -> Result<(), CoordError> {
        self.state =
            self.state.transition(to).map_err(|e| CoordError::Precondition(format!("job {}: {e}", self.id)))?;
        self.message = message.into();
        tracing::info!(job = %self.id, state = %to, message = %self.message, "job state changed");
        self.touch();
        Ok(())
    }

    fn worker_mut(&mut self, id: &WorkerId) -> Result<&mut Worker, CoordError> {
        self.workers.iter_mut().find(|w| &w.id == id).ok_or_else(|| CoordError::NoWorker(id.clone()))
    }

    fn rank_of(&self, id: &WorkerId) -> Option<u32> {
        self.generation.as_ref()?.members.iter().position(|m| m == id).map(|r| r as u32)
    }

    /// Checks that a worker call belongs to the current generation and returns the caller's rank.
    fn member_rank(&self, call: &WorkerCall) -> Result<u32, CoordError> {
        let generation = self.generation.as_ref().ok_or_else(|| {
            CoordError::Precondition(format!("job {} has no generation yet: call Rendezvous first", self.id))
        })?;
        if call.generation != generation.number {
            return Err(CoordError::Precondition(format!(
                "stale generation {} for worker {}: the current generation of job {} is {}; rendezvous again",
                call.generation, call.worker_id, self.id, generation.number
            )));
        }
        self.rank_of(&call.worker_id).ok_or_else(|| {
            CoordError::Precondition(format!(
                "worker {} is not a member of generation {}",
                call.worker_id, generation.number
            ))
        })
    }

    /// Seals the first generation when enough workers wait: at `workers.max` at once, else after the
    /// settle window that starts when `workers.min` are present.
    fn maybe_seal(&mut self, now: Instant) -> Option<Instant> {
        if self.state != JobState::Pending || self.generation.is_some() {
            return None;
        }
        let waiting = self.workers.len() as u32;
        if waiting < self.config.workers.min {
            self.quorum_since = None;
            return None;
        }
        let since = *self.quorum_since.get_or_insert(now);
        let deadline = since + Duration::from_millis(self.config.rendezvous.settle_ms);
        if waiting < self.config.workers.max && now < deadline {
            return Some(deadline);
        }
        // Ranks: workers sharing a host are adjacent (host order by first arrival), then join order.
        let mut hosts: Vec<&str> = Vec::new();
        for w in &self.workers {
            if !hosts.contains(&w.host_id.as_str()) {
                hosts.push(&w.host_id);
            }
        }
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        order.sort_by_key(|&i| (hosts.iter().position(|h| *h == self.workers[i].host_id), i));
        let members: Vec<WorkerId> = order.iter().map(|&i| self.workers[i].id.clone()).collect();
        let bootstrap = self.workers[order[0]].bootstrap.clone();
        let number = 1;
        tracing::info!(job = %self.id, generation = number, world = members.len(), "generation sealed");
        self.generation = Some(Generation { number, members, bootstrap, start_step: self.committed_steps });
        // Pending -> Running is always legal here (checked state above).
        let _ = self.set_state(JobState::Running, "");
        None
    }

    fn commit_ready_steps(&mut self) {
        let world = self.generation.as_ref().map_or(0, |g| g.members.len());
        while let Some(reports) = self.pending_reports.get(&self.committed_steps) {
            if reports.len() < world {
                break;
            }
            let reports = self.pending_reports.remove(&self.committed_steps).unwrap_or_default();
            // Loss terms are global (identical on every rank); throughput adds up across ranks.
            let mut latest = reports.get(&0).cloned().unwrap_or_default();
            latest.samples_per_sec = reports.values().map(|m| m.samples_per_sec).sum();
            latest.local_samples = reports.values().map(|m| m.local_samples).sum();
            latest.step_ms = reports.values().map(|m| m.step_ms).fold(0.0, f64::max);
            latest.skipped_samples = reports.values().map(|m| m.skipped_samples).sum();
            self.skipped_samples += u64::from(latest.skipped_samples);
            self.latest = Some(latest);
            self.committed_steps += 1;
            // persist: committed progress.
        }
        if self.committed_steps >= self.config.steps && self.state == JobState::Running {
            let _ = self.set_state(JobState::Completed, "");
        }
    }

    fn status(&self) -> pb::JobStatus {
        let plan = self.plan.step(self.committed_steps.min(self.config.steps.saturating_sub(1)));
        pb::JobStatus {
            job_id: self.id.0.clone(),
            name: self.config.name.clone(),
            state: pb::JobState::from(self.state) as i32,
            message: self.message.clone(),
            committed_steps: self.committed_steps,
            total_steps: self.config.steps,
            epoch: plan.epoch,
            generation: self.generation.as_ref().map_or(0, |g| g.number),
            world_size: self.generation.as_ref().map_or(0, |g| g.members.len() as u32),
            min_workers: self.config.workers.min,
            max_workers: self.config.workers.max,
            workers: self
                .workers
                .iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.id.0.clone(),
                    host_id: w.host_id.clone(),
                    rank: self.rank_of(&w.id).map_or(-1, |r| r as i32),
                    reported_steps: w.reported_steps,
                    latest: w.latest.as_ref().map(Into::into),
                    collective_addr: w.collective_addr.clone(),
                    last_heartbeat_unix_ms: w.last_seen_unix_ms,
                    device: w.device.clone(),
                })
                .collect(),
            latest: self.latest.as_ref().map(Into::into),
            latest_checkpoint: self.latest_checkpoint.clone(),
            global_batch: self.config.global_batch,
            dataset_samples: self.plan.epoch_len(),
            submitted_unix_ms: self.submitted_unix_ms,
            updated_unix_ms: self.updated_unix_ms,
            skipped_samples: self.skipped_samples,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<JobId, Job>,
    worker_jobs: HashMap<WorkerId, JobId>,
    next_job: u64,
    next_worker: u64,
}

/// What a worker learns when its rendezvous completes.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub generation: u64,
    pub rank: u32,
    pub peers: Vec<pb::Peer>,
    pub bootstrap: Vec<u8>,
    pub start_step: u64,
}

/// One rendezvous attempt: the assignment, or when to look again (the settle deadline, if one runs)
/// and a receiver that fires on any change to the job.
type Attempt = Result<Assignment, (Option<Instant>, watch::Receiver<u64>)>;

/// The coordinator: shared by every service handler.
#[derive(Debug, Clone, Default)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
}

/// How long one rendezvous long poll waits before answering `ready = false`.
pub const RENDEZVOUS_POLL: Duration = Duration::from_secs(10);

impl Coordinator {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a job. Reads each dataset's manifest for its sample count (the plan's input).
    pub fn submit(&self, config: JobConfig) -> Result<JobId, CoordError> {
        let mut sizes = Vec::with_capacity(config.data.datasets.len());
        let mut layout = None;
        for (i, d) in config.data.datasets.iter().enumerate() {
            let manifest = hcmoco_data::Manifest::load(Path::new(&d.manifest)).map_err(|e| {
                domain::FieldError::new(format!("spec_toml: data.datasets[{i}].manifest"), e.to_string())
            })?;
            if let Some((first, layout)) = &layout {
                if *layout != manifest.layout {
                    return Err(domain::FieldError::new(
                        format!("spec_toml: data.datasets[{i}].manifest"),
                        format!(
                            "keypoint layout {} differs from data.datasets[{first}]'s {layout}: a job trains one layout (convert the dataset)",
                            manifest.layout
                        ),
                    )
                    .into());
                }
            } else {
                layout = Some((i, manifest.layout));
            }
            sizes.push(manifest.samples);
        }
        let weights: Option<Vec<f64>> = config.data.datasets.iter().map(|d| d.weight).collect();
        let plan = DataPlan::new(config.seed, config.global_batch, sizes, weights.as_deref())
            .map_err(|e| domain::FieldError::new("spec_toml: data.datasets", e.to_string()))?;
        let mut inner = self.lock();
        inner.next_job += 1;
        let id = JobId(format!("job-{}", inner.next_job));
        let now = unix_ms();
        let job = Job {
            id: id.clone(),
            config_toml: config.to_toml(),
            config,
            plan,
            state: JobState::Pending,
            message: String::new(),
            workers: Vec::new(),
            generation: None,
            quorum_since: None,
            committed_steps: 0,
            pending_reports: BTreeMap::new(),
            latest: None,
            latest_checkpoint: String::new(),
            skipped_samples: 0,
            submitted_unix_ms: now,
            updated_unix_ms: now,
            changed: watch::channel(0).0,
        };
        tracing::info!(job = %id, name = %job.config.name, steps = job.config.steps, "job submitted");
        inner.jobs.insert(id.clone(), job);
        Ok(id)
    }

    pub fn status(&self, id: &JobId) -> Result<pb::JobStatus, CoordError> {
        let inner = self.lock();
        inner.jobs.get(id).map(Job::status).ok_or_else(|| CoordError::NoJob(id.clone()))
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        self.lock().jobs.values().map(Job::status).collect()
    }

    /// A receiver that changes whenever the job does.
    pub fn subscribe(&self, id: &JobId) -> Result<watch::Receiver<u64>, CoordError> {
        let inner = self.lock();
        inner.jobs.get(id).map(|j| j.changed.subscribe()).ok_or_else(|| CoordError::NoJob(id.clone()))
    }

    pub fn cancel(&self, id: &JobId, reason: &str) -> Result<JobState, CoordError> {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(id).ok_or_else(|| CoordError::NoJob(id.clone()))?;
        if !job.state.is_terminal() {
            job.set_state(JobState::Cancelled, reason)?;
        }
        Ok(job.state)
    }

    /// Adds a worker to a job that has not started yet.
    pub fn join(&self, req: domain::Join) -> Result<pb::JoinResponse, CoordError> {
        let mut inner = self.lock();
        let job_id = match req.job_id {
            Some(id) => id,
            None => {
                let open: Vec<&JobId> = inner.jobs.values().filter(|j| !j.state.is_terminal()).map(|j| &j.id).collect();
                match open.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(CoordError::Precondition(
                            "no pending or running job to join; submit one first".into(),
                        ));
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|j| j.0.as_str()).collect();
                        return Err(CoordError::Precondition(format!(
                            "several jobs are open ({}); pass --job",
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        inner.next_worker += 1;
        let worker_id = WorkerId(format!("w-{}", inner.next_worker));
        let job = inner.jobs.get_mut(&job_id).ok_or_else(|| CoordError::NoJob(job_id.clone()))?;
        match job.state {
            JobState::Pending => {}
            JobState::Running => {
                return Err(CoordError::Precondition(format!(
                    "job {job_id} is already running with a sealed generation; joining a running job needs elastic membership, which this version does not have"
                )));
            }
            s => return Err(CoordError::Precondition(format!("job {job_id} is {s}"))),
        }
        if job.workers.len() as u32 >= job.config.workers.max {
            return Err(CoordError::Full(format!(
                "job {job_id} already has workers.max = {} workers",
                job.config.workers.max
            )));
        }
        if let Some(other) = job.workers.iter().find(|w| w.collective_addr == req.collective_addr) {
            return Err(CoordError::Precondition(format!(
                "collective address {} is already used by worker {}",
                req.collective_addr, other.id
            )));
        }
        tracing::info!(job = %job_id, worker = %worker_id, host = %req.host_id, addr = %req.collective_addr, "worker joined");
        job.workers.push(Worker {
            id: worker_id.clone(),
            host_id: req.host_id,
            collective_addr: req.collective_addr,
            device: req.device,
            last_seen: Instant::now(),
            last_seen_unix_ms: unix_ms(),
            bootstrap: None,
            reported_steps: 0,
            latest: None,
        });
        job.touch();
        let resp = pb::JoinResponse {
            worker_id: worker_id.0.clone(),
            job_id: job_id.0.clone(),
            job_config_toml: job.config_toml.clone(),
            heartbeat_interval_ms: u32::try_from(job.config.heartbeat.interval_ms).unwrap_or(u32::MAX),
        };
        inner.worker_jobs.insert(worker_id, job_id);
        Ok(resp)
    }

    fn with_worker_job<T>(
        &self,
        worker: &WorkerId,
        f: impl FnOnce(&mut Job) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        let mut inner = self.lock();
        let job_id = inner.worker_jobs.get(worker).cloned().ok_or_else(|| CoordError::NoWorker(worker.clone()))?;
        let job = inner.jobs.get_mut(&job_id).ok_or(CoordError::NoJob(job_id))?;
        let w = job.worker_mut(worker)?;
        w.last_seen = Instant::now();
        w.last_seen_unix_ms = unix_ms();
        f(job)
    }

    /// One rendezvous attempt: the assignment if the worker's generation is sealed, else when to look
    /// again (the settle deadline, if one is running) and a receiver that fires on any change.
    fn try_rendezvous(&self, req: &domain::Rendezvous, now: Instant) -> Result<Attempt, CoordError> {
        self.with_worker_job(&req.call.worker_id, |job| {
            if job.state.is_terminal() {
                return Err(CoordError::Precondition(job.ended_because()));
            }
            job.worker_mut(&req.call.worker_id)?.bootstrap = Some(req.collective_bootstrap.clone());
            let deadline = job.maybe_seal(now);
            let rank = job.rank_of(&req.call.worker_id);
            if let (Some(g), Some(0)) = (job.generation.as_mut(), rank)
                && g.bootstrap.is_none()
            {
                g.bootstrap = Some(req.collective_bootstrap.clone());
                job.touch();
            }
            if let (Some(g), Some(rank)) = (job.generation.clone(), rank)
                && let (true, Some(bootstrap)) = (g.number > req.call.generation, g.bootstrap)
            {
                let peers = g
                    .members
                    .iter()
                    .filter_map(|m| job.workers.iter().find(|w| &w.id == m))
                    .map(|w| pb::Peer {
                        worker_id: w.id.0.clone(),
                        host_id: w.host_id.clone(),
                        collective_addr: w.collective_addr.clone(),
                    })
                    .collect();
                return Ok(Ok(Assignment { generation: g.number, rank, peers, bootstrap, start_step: g.start_step }));
            }
            if job.generation.is_some() && job.rank_of(&req.call.worker_id).is_none() {
                return Err(CoordError::Precondition(format!(
                    "worker {} is not part of job {}'s generation",
                    req.call.worker_id, job.id
                )));
            }
            Ok(Err((deadline, job.changed.subscribe())))
        })
    }

    /// Long poll until the worker's generation is sealed or `window` passes (then `Ok(None)`).
    pub async fn rendezvous(
        &self,
        req: domain::Rendezvous,
        window: Duration,
    ) -> Result<Option<Assignment>, CoordError> {
        let give_up = Instant::now() + window;
        loop {
            let now = Instant::now();
            match self.try_rendezvous(&req, now)? {
                Ok(a) => return Ok(Some(a)),
                Err((deadline, mut changed)) => {
                    if now >= give_up {
                        return Ok(None);
                    }
                    let wake = deadline.map_or(give_up, |d| d.min(give_up));
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    pub fn heartbeat(&self, req: domain::Heartbeat) -> Result<pb::HeartbeatResponse, CoordError> {
        self.with_worker_job(&req.call.worker_id, |job| {
            // Completed jobs end through FetchWork (`done`); a stop is for failed or cancelled ones.
            let stop = matches!(job.state, JobState::Failed | JobState::Cancelled);
            Ok(pb::HeartbeatResponse {
                generation: job.generation.as_ref().map_or(0, |g| g.number),
                job_state: pb::JobState::from(job.state) as i32,
                stop,
                message: if stop { job.ended_because() } else { String::new() },
            })
        })
    }

    pub fn fetch_work(&self, req: domain::FetchWork) -> Result<pb::FetchWorkResponse, CoordError> {
        self.with_worker_job(&req.call.worker_id, |job| {
            if job.state.is_terminal() || req.step >= job.config.steps {
                let message = match job.state {
                    JobState::Failed | JobState::Cancelled => job.ended_because(),
                    _ => String::new(),
                };
                return Ok(pb::FetchWorkResponse { done: true, step: req.step, message, ..Default::default() });
            }
            let rank = job.member_rank(&req.call)?;
            let world = job.generation.as_ref().map_or(1, |g| g.members.len() as u32);
            if req.step < job.committed_steps || req.step >= job.committed_steps + MAX_INFLIGHT_STEPS {
                return Err(CoordError::Precondition(format!(
                    "step {} is not fetchable: {} steps are committed, at most {} may be in flight",
                    req.step, job.committed_steps, MAX_INFLIGHT_STEPS
                )));
            }
            let sp = job.plan.step(req.step);
            let local = DataPlan::rank_slice(&sp.slots, rank, world);
            let samples = local
                .clone()
                .map(|slot| {
                    let s = job.plan.sample_at(sp.epoch, slot);
                    pb::SampleRef { slot, dataset: s.dataset, index: s.index }
                })
                .collect();
            let lr = job.config.learning_rate(sp.epoch, job.plan.epochs_for(job.config.steps));
            Ok(pb::FetchWorkResponse {
                done: false,
                step: req.step,
                epoch: sp.epoch,
                step_in_epoch: sp.step_in_epoch,
                global_slot_begin: sp.slots.start,
                global_slot_end: sp.slots.end,
                local_slot_begin: local.start,
                local_slot_end: local.end,
                samples,
                learning_rate: lr,
                message: String::new(),
            })
        })
    }

    pub fn report_step(&self, req: domain::ReportStep) -> Result<pb::ReportStepResponse, CoordError> {
        self.with_worker_job(&req.call.worker_id, |job| {
            if job.state.is_terminal() {
                return Err(CoordError::Precondition(job.ended_because()));
            }
            let rank = job.member_rank(&req.call)?;
            let step = req.metrics.step;
            if step < job.committed_steps || step >= job.committed_steps + MAX_INFLIGHT_STEPS {
                return Err(CoordError::Precondition(format!(
                    "report of step {step} out of order: {} steps are committed",
                    job.committed_steps
                )));
            }
            if let Some(ckpt) = &req.checkpoint {
                job.latest_checkpoint = ckpt.clone();
            }
            let w = job.worker_mut(&req.call.worker_id)?;
            w.reported_steps = w.reported_steps.max(step + 1);
            if !req.metrics.device.is_empty() {
                w.device = req.metrics.device.clone();
            }
            w.latest = Some(req.metrics.clone());
            job.pending_reports.entry(step).or_default().insert(rank, req.metrics);
            job.commit_ready_steps();
            job.touch();
            Ok(pb::ReportStepResponse { committed_steps: job.committed_steps })
        })
    }

    pub fn report_failure(&self, req: domain::ReportFailure) -> Result<(), CoordError> {
        self.with_worker_job(&req.call.worker_id, |job| {
            // A report from an earlier generation must not touch the current one (0: before any).
            let current = job.generation.as_ref().map_or(0, |g| g.number);
            if req.call.generation != 0 && req.call.generation != current {
                return Err(CoordError::Precondition(format!(
                    "failure report from stale generation {} (current {current}) ignored",
                    req.call.generation
                )));
            }
            let rank = job.rank_of(&req.call.worker_id).map_or("-".to_string(), |r| r.to_string());
            let blame = req.failed_rank.map(|r| format!(" (attributed to rank {r})")).unwrap_or_default();
            tracing::warn!(job = %job.id, worker = %req.call.worker_id, step = req.step, message = %req.message, "worker reported a failure");
            if !job.state.is_terminal() {
                let msg = format!("worker {} (rank {rank}) failed at step {}{blame}: {}", req.call.worker_id, req.step, req.message);
                job.set_state(JobState::Failed, msg)?;
            }
            Ok(())
        })
    }

    /// Applies heartbeat leases: a member of a running generation that has been silent past the
    /// job's `heartbeat.timeout_ms` fails the job (elastic re-forming arrives with elastic
    /// membership); a silent worker still waiting for its first generation is dropped.
    pub fn reap(&self, now: Instant) {
        let mut inner = self.lock();
        let mut dropped = Vec::new();
        for job in inner.jobs.values_mut() {
            if job.state.is_terminal() {
                continue;
            }
            let timeout = Duration::from_millis(job.config.heartbeat.timeout_ms);
            let silent: Vec<(WorkerId, String, Duration)> = job
                .workers
                .iter()
                .filter(|w| now.saturating_duration_since(w.last_seen) > timeout)
                .map(|w| (w.id.clone(), w.host_id.clone(), now.saturating_duration_since(w.last_seen)))
                .collect();
            for (id, host, quiet) in silent {
                match job.rank_of(&id) {
                    Some(rank) => {
                        let msg = format!(
                            "worker {id} (rank {rank}, host {host}) lost: no heartbeat for {:.1}s",
                            quiet.as_secs_f64()
                        );
                        tracing::warn!(job = %job.id, worker = %id, rank, "worker lost");
                        let _ = job.set_state(JobState::Failed, msg);
                        break;
                    }
                    None if job.state == JobState::Pending => {
                        tracing::warn!(job = %job.id, worker = %id, "waiting worker lost, dropped");
                        job.workers.retain(|w| w.id != id);
                        dropped.push(id);
                        job.touch();
                    }
                    None => {}
                }
            }
        }
        for id in dropped {
            inner.worker_jobs.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcmoco_proto::domain::{FetchWork, Heartbeat, Join, Rendezvous, ReportStep};

    struct Fixture {
        _dir: tempfile::TempDir,
        manifest: String,
    }

    fn fixture(samples: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = hcmoco_data::SynthConfig { samples, image_size: 16, ..Default::default() };
        hcmoco_data::generate(&cfg, dir.path()).expect("synth");
        let manifest = dir.path().join("manifest.json").display().to_string();
        Fixture { _dir: dir, manifest }
    }

    fn config(f: &Fixture, min: u32, max: u32) -> JobConfig {
        let mut cfg = JobConfig::from_toml(&format!("[[data.datasets]]\nmanifest = {:?}\n", f.manifest)).expect("cfg");
        cfg.workers.min = min;
        cfg.workers.max = max;
        cfg.global_batch = 5;
        cfg.steps = 4;
        cfg.rendezvous.settle_ms = 1_000;
        cfg
    }

    fn join(c: &Coordinator, job: &JobId, host: &str, port: u16) -> WorkerId {
        let r = c
            .join(Join {
                job_id: Some(job.clone()),
                host_id: host.into(),
                collective_addr: format!("127.0.0.1:{port}"),
                device: "cpu".into(),
                pid: 1,
            })
            .expect("join");
        WorkerId(r.worker_id)
    }

    fn rdv(w: &WorkerId) -> Rendezvous {
        Rendezvous {
            call: WorkerCall { worker_id: w.clone(), generation: 0 },
            collective_bootstrap: w.0.as_bytes().to_vec(),
        }
    }

    fn state(c: &Coordinator, job: &JobId) -> pb::JobState {
        pb::JobState::try_from(c.status(job).expect("status").state).expect("state")
    }

    #[tokio::test(start_paused = true)]
    async fn generation_seals_at_max_at_once_with_hosts_adjacent() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 2, 3)).expect("submit");
        let a = join(&c, &job, "host-a", 1001);
        let b = join(&c, &job, "host-b", 1002);
        let a2 = join(&c, &job, "host-a", 1003);
        assert_eq!(state(&c, &job), pb::JobState::Pending);
        // b's rendezvous seals the generation (max reached) but must wait for rank 0's bootstrap offer.
        let pending_b = {
            let c = c.clone();
            let b = b.clone();
            tokio::spawn(async move { c.rendezvous(rdv(&b), Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(state(&c, &job), pb::JobState::Running);
        let got_a = c.rendezvous(rdv(&a), Duration::from_secs(5)).await.expect("rdv").expect("sealed");
        assert_eq!(got_a.rank, 0);
        let got = pending_b.await.expect("task").expect("rdv").expect("ready once rank 0 offered");
        assert_eq!(got.bootstrap, a.0.as_bytes(), "rank 0's offer reaches every member");
        assert_eq!(got.generation, 1);
        // Ranks: host-a's two workers first (host order by first arrival), then host-b.
        let order: Vec<&str> = got.peers.iter().map(|p| p.worker_id.as_str()).collect();
        assert_eq!(order, [a.0.as_str(), a2.0.as_str(), b.0.as_str()]);
        assert_eq!(got.rank, 2);
        // A running job refuses new workers; membership changes would need a new generation.
        let late = c.join(Join {
            job_id: Some(job.clone()),
            host_id: "h".into(),
            collective_addr: "127.0.0.1:9".into(),
            device: "cpu".into(),
            pid: 1,
        });
        assert!(matches!(late, Err(CoordError::Precondition(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn generation_seals_after_the_settle_window_with_min_workers() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 1, 2)).expect("submit");
        let a = join(&c, &job, "h", 1001);
        let t0 = Instant::now();
        let got = c.rendezvous(rdv(&a), Duration::from_secs(10)).await.expect("rdv").expect("sealed after settle");
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(1_000) && waited < Duration::from_millis(1_100), "{waited:?}");
        assert_eq!((got.generation, got.rank, got.peers.len()), (1, 0, 1));
        assert_eq!(got.bootstrap, a.0.as_bytes());
    }

    #[tokio::test(start_paused = true)]
    async fn rendezvous_below_min_answers_not_ready_after_the_poll_window() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 2, 2)).expect("submit");
        let a = join(&c, &job, "h", 1001);
        assert_eq!(c.rendezvous(rdv(&a), Duration::from_secs(3)).await.expect("rdv"), None);
        // Full: a third worker is refused.
        let _b = join(&c, &job, "h", 1002);
        let full = c.join(Join {
            job_id: Some(job.clone()),
            host_id: "h".into(),
            collective_addr: "127.0.0.1:1003".into(),
            device: "cpu".into(),
            pid: 1,
        });
        assert!(matches!(full, Err(CoordError::Full(_))));
        // Two workers cannot share a collective address.
        let f2 = fixture(20);
        let job2 = c.submit(config(&f2, 2, 2)).expect("submit");
        join(&c, &job2, "h", 2001);
        let dup = c.join(Join {
            job_id: Some(job2),
            host_id: "h".into(),
            collective_addr: "127.0.0.1:2001".into(),
            device: "cpu".into(),
            pid: 1,
        });
        assert!(matches!(dup, Err(CoordError::Precondition(_))));
    }

    async fn running_pair(c: &Coordinator, f: &Fixture) -> (JobId, WorkerId, WorkerId) {
        let job = c.submit(config(f, 2, 2)).expect("submit");
        let a = join(c, &job, "h", 1001);
        let b = join(c, &job, "h", 1002);
        c.rendezvous(rdv(&a), Duration::from_secs(1)).await.expect("rdv").expect("sealed");
        (job, a, b)
    }

    fn fetch(c: &Coordinator, w: &WorkerId, generation: u64, step: u64) -> Result<pb::FetchWorkResponse, CoordError> {
        c.fetch_work(FetchWork { call: WorkerCall { worker_id: w.clone(), generation }, step })
    }

    fn report(c: &Coordinator, w: &WorkerId, step: u64) -> Result<pb::ReportStepResponse, CoordError> {
        let metrics = StepMetrics { step, loss_total: 1.0, samples_per_sec: 10.0, ..Default::default() };
        c.report_step(ReportStep {
            call: WorkerCall { worker_id: w.clone(), generation: 1 },
            metrics,
            checkpoint: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn steps_are_sliced_committed_by_all_ranks_and_the_job_completes() {
        let f = fixture(12); // 12 samples, global batch 5: steps of 5, 5, 2 per epoch
        let c = Coordinator::new();
        let (job, a, b) = running_pair(&c, &f).await;
        let wa = fetch(&c, &a, 1, 0).expect("work");
        let wb = fetch(&c, &b, 1, 0).expect("work");
        assert_eq!((wa.global_slot_begin, wa.global_slot_end), (0, 5));
        assert_eq!((wa.local_slot_begin, wa.local_slot_end, wb.local_slot_begin, wb.local_slot_end), (0, 2, 2, 5));
        assert_eq!(wa.samples.len() + wb.samples.len(), 5);
        // Stale generation, out-of-window steps: refused.
        assert!(matches!(fetch(&c, &a, 2, 0), Err(CoordError::Precondition(m)) if m.contains("stale generation")));
        assert!(fetch(&c, &a, 1, 2).is_ok(), "a loader may prefetch");
        assert!(matches!(fetch(&c, &a, 1, 3), Err(CoordError::Precondition(_))));
        // A step commits only when both ranks reported it.
        assert_eq!(report(&c, &a, 0).expect("report").committed_steps, 0);
        assert_eq!(report(&c, &b, 0).expect("report").committed_steps, 1);
        // The device a step ran on replaces the one named at Join (with NCCL it is chosen later).
        let on_gpu = StepMetrics { step: 1, loss_total: 1.0, device: "cuda:0".into(), ..Default::default() };
        let call = WorkerCall { worker_id: a.clone(), generation: 1 };
        c.report_step(ReportStep { call, metrics: on_gpu, checkpoint: None }).expect("report on cuda:0");
        let devices: Vec<String> = c.status(&job).expect("status").workers.iter().map(|w| w.device.clone()).collect();
        assert_eq!(devices, ["cuda:0", "cpu"]);
        for s in 1..4 {
            let w = fetch(&c, &a, 1, s).expect("work");
            if s == 2 {
                assert_eq!((w.global_slot_begin, w.global_slot_end), (10, 12), "last step of the epoch is smaller");
            }
            if s == 3 {
                assert_eq!((w.epoch, w.step_in_epoch), (1, 0));
            }
            report(&c, &a, s).expect("report");
            report(&c, &b, s).expect("report");
        }
        assert_eq!(state(&c, &job), pb::JobState::Completed);
        // Completion ends through FetchWork's `done`, never as a heartbeat stop (which means failure).
        let hb =
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 1 }, step: 4 }).expect("hb");
        assert!(!hb.stop);
        assert!(fetch(&c, &a, 1, 4).expect("done").done);
        let st = c.status(&job).expect("status");
        assert_eq!(st.committed_steps, 4);
        assert_eq!(st.latest.expect("latest").samples_per_sec, 20.0, "throughput adds up across ranks");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_member_fails_the_job_naming_it() {
        let f = fixture(20);
        let c = Coordinator::new();
        let (job, a, b) = running_pair(&c, &f).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 1 }, step: 0 }).expect("hb");
        c.reap(Instant::now());
        assert_eq!(state(&c, &job), pb::JobState::Running, "within the 15 s lease");
        tokio::time::advance(Duration::from_secs(6)).await;
        c.reap(Instant::now());
        let st = c.status(&job).expect("status");
        assert_eq!(state(&c, &job), pb::JobState::Failed);
        assert!(st.message.contains(&b.0) && st.message.contains("rank 1"), "{}", st.message);
        // The survivor learns it must stop.
        let hb = c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a, generation: 1 }, step: 0 }).expect("hb");
        assert!(hb.stop);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_waiting_worker_is_dropped_before_the_generation_forms() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 2, 2)).expect("submit");
        let a = join(&c, &job, "h", 1001);
        tokio::time::advance(Duration::from_secs(16)).await;
        c.reap(Instant::now());
        assert_eq!(state(&c, &job), pb::JobState::Pending);
        assert!(c.status(&job).expect("status").workers.is_empty());
        assert!(matches!(
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a, generation: 0 }, step: 0 }),
            Err(CoordError::NoWorker(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_workers_and_is_final() {
        let f = fixture(20);
        let c = Coordinator::new();
        let (job, a, _b) = running_pair(&c, &f).await;
        assert_eq!(c.cancel(&job, "user said so").expect("cancel"), JobState::Cancelled);
        let w = fetch(&c, &a, 1, 0).expect("answer");
        assert!(w.done && w.message.contains("user said so"), "{}", w.message);
        assert_eq!(c.cancel(&job, "again").expect("idempotent"), JobState::Cancelled);
        assert!(matches!(c.status(&JobId("job-99".into())), Err(CoordError::NoJob(_))));
    }

    #[test]
    fn submit_refuses_datasets_of_different_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, layout) in
            [("mpii", hcmoco_data::KeypointLayout::Mpii16), ("coco", hcmoco_data::KeypointLayout::Coco13)]
        {
            let cfg = hcmoco_data::SynthConfig { samples: 4, image_size: 16, layout, ..Default::default() };
            hcmoco_data::generate(&cfg, &dir.path().join(name)).expect("synth");
        }
        let m = |n: &str| dir.path().join(n).join("manifest.json").display().to_string();
        let cfg = JobConfig::from_toml(&format!(
            "[[data.datasets]]\nmanifest = {:?}\n[[data.datasets]]\nmanifest = {:?}\n",
            m("mpii"),
            m("coco")
        ))
        .expect("cfg");
        let status: tonic::Status = Coordinator::new().submit(cfg).expect_err("mixed layouts").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("data.datasets[1].manifest") && status.message().contains("layout"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn submit_names_a_missing_manifest() {
        let c = Coordinator::new();
        let cfg = JobConfig::from_toml("[[data.datasets]]\nmanifest = \"/nonexistent/manifest.json\"\n").expect("cfg");
        let err = c.submit(cfg).expect_err("missing manifest");
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("data.datasets[0].manifest"), "{}", status.message());
    }
}
