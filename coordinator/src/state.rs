//! The coordinator's state: jobs, their members, generations and committed progress.
//!
//! All state sits behind one mutex held for short, non-blocking sections. Every change to a job bumps
//! that job's watch channel, which wakes status streams; rendezvous long polls wait on a second
//! channel that moves only when a generation is sealed or opened, or the job ends, so thousands of
//! waiting workers are not woken by every join. Time comes from `tokio::time::Instant`, so lease,
//! settle and rejoin logic runs under a paused clock in tests.
//!
//! Membership rules live in [`crate::membership`]; the ledger of who trained which slot in
//! [`crate::ledger`]. The embedded default keeps this state in memory. With `hcmoco serve --etcd`,
//! every change to a job's durable record bumps its version, and the service persists the changed
//! records ([`Coordinator::persist`], one etcd transaction) before it answers the call that made
//! the change: a reported step is committed only once it is durable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hcmoco_proto::config::JobConfig;
use hcmoco_proto::domain::{
    self, Assignment, CallError, JobId, Membership, StateSource, StepMetrics, StepWork, Work, WorkerCall, WorkerId,
};
use hcmoco_proto::pb;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::job::JobState;
use crate::ledger::Ledger;
use crate::membership::{self, Change, Generation, Next, Offer, Worker};
use crate::plan::DataPlan;

/// How many steps from the committed one a rank may fetch: the step it trains, and the next (prefetched
/// by its loader) while a slower rank has not yet reported the previous one.
pub const MAX_INFLIGHT_STEPS: u64 = 3;

/// How many membership events a job keeps.
pub const MAX_EVENTS: usize = 64;

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
    /// An error the worker acts on (rendezvous again, stop).
    #[error(transparent)]
    Call(#[from] CallError),
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::Invalid(f) => f.into(),
            CoordError::NoJob(_) => tonic::Status::not_found(msg),
            CoordError::NoWorker(_) => CallError::UnknownWorker { message: msg }.into_status(),
            CoordError::Precondition(_) => tonic::Status::failed_precondition(msg),
            CoordError::Full(_) => tonic::Status::resource_exhausted(msg),
            CoordError::Call(c) => c.into_status(),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Job {
    id: JobId,
    config: JobConfig,
    config_toml: String,
    plan: DataPlan,
    state: JobState,
    message: String,
    /// Joined workers in join order (members, joiners waiting, standbys, released ones not yet gone).
    workers: Vec<Worker>,
    /// Position in `workers` by id and by collective address (rebuilt when workers are removed).
    index: HashMap<WorkerId, usize>,
    by_addr: HashMap<String, usize>,
    /// Workers with an offer (waiting in a rendezvous).
    waiting: usize,
    /// Of the latest generation's members: those waiting in a rendezvous, and those gone or leaving
    /// (so a forming generation knows in O(1) whether every member is back).
    members_back: usize,
    members_absent: usize,
    /// The latest sealed generation.
    generation: Option<Generation>,
    /// The generation being formed, once the first has been sealed.
    next: Option<Next>,
    /// Workers of the latest generation's predecessors told to exit (scale-down).
    released: Vec<WorkerId>,
    /// The number of workers the job aims for.
    target: u32,
    /// When `workers.min` workers were first waiting (the settle window starts).
    quorum_since: Option<Instant>,
    committed_steps: u64,
    /// Reports of uncommitted steps: step -> rank -> report.
    pending_reports: BTreeMap<u64, BTreeMap<u32, Report>>,
    latest: Option<StepMetrics>,
    latest_checkpoint: String,
    /// The newest checkpoint whose step is committed: (steps it holds, directory).
    committed_checkpoint: Option<(u64, String)>,
    /// On demand (CheckpointJob): rank 0 writes a checkpoint after this step.
    checkpoint_after: Option<u64>,
    ledger: Ledger,
    events: VecDeque<pb::JobEvent>,
    /// Samples skipped under `data.on_error = "skip"`, all ranks and steps.
    skipped_samples: u64,
    submitted_unix_ms: u64,
    updated_unix_ms: u64,
    changed: watch::Sender<u64>,
    /// Moves when a generation is sealed or opened, or the job ends: what rendezvous polls wait on.
    membership: watch::Sender<u64>,
    /// Bumped by every change to the durable record; `persisted` is the version the store holds.
    durable: u64,
    persisted: u64,
}

/// One rank's report of one step.
#[derive(Debug, Clone)]
struct Report {
    metrics: StepMetrics,
    slots: std::ops::Range<u64>,
    skipped: Vec<u64>,
    checkpoint: Option<String>,
}

impl Job {
    /// A pending job with no workers and nothing committed; the resolved job file is kept as text
    /// (what workers receive).
    fn new(id: JobId, config: JobConfig, plan: DataPlan) -> Job {
        let now = unix_ms();
        Job {
            id,
            config_toml: config.to_toml(),
            target: config.workers.max,
            config,
            plan,
            state: JobState::Pending,
            message: String::new(),
            workers: Vec::new(),
            index: HashMap::new(),
            by_addr: HashMap::new(),
            waiting: 0,
            members_back: 0,
            members_absent: 0,
            generation: None,
            next: None,
            released: Vec::new(),
            quorum_since: None,
            committed_steps: 0,
            pending_reports: BTreeMap::new(),
            latest: None,
            latest_checkpoint: String::new(),
            committed_checkpoint: None,
            checkpoint_after: None,
            ledger: Ledger::default(),
            events: VecDeque::new(),
            skipped_samples: 0,
            submitted_unix_ms: now,
            updated_unix_ms: now,
            changed: watch::channel(0).0,
            membership: watch::channel(0).0,
            durable: 1,
            persisted: 0,
        }
    }

    fn touch(&mut self) {
        self.updated_unix_ms = unix_ms();
        self.changed.send_modify(|v| *v += 1);
    }

    fn membership_changed(&mut self) {
        self.membership.send_modify(|v| *v += 1);
        self.durable += 1;
        self.touch();
    }

    fn event(&mut self, kind: &str, worker: Option<&WorkerId>, reason: impl Into<String>, step: u64) {
        let generation = self.generation.as_ref().map_or(0, |g| g.number);
        let rank = worker.and_then(|w| self.generation.as_ref()?.rank_of(w)).map_or(-1, |r| r as i32);
        let e = pb::JobEvent {
            unix_ms: unix_ms(),
            kind: kind.into(),
            generation,
            worker_id: worker.map(|w| w.0.clone()).unwrap_or_default(),
            rank,
            reason: reason.into(),
            step,
        };
        tracing::info!(job = %self.id, kind, generation, worker = %e.worker_id, rank, step, reason = %e.reason, "membership event");
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
        self.durable += 1;
    }

    /// "job X is cancelled: why" (the reason is left out when there is none).
    fn ended_because(&self) -> String {
        if self.message.is_empty() {
            format!("job {} is {}", self.id, self.state)
        } else {
            format!("job {} is {}: {}", self.id, self.state, self.message)
        }
    }

    fn ended(&self) -> CallError {
        CallError::JobEnded { state: self.state.as_str().into(), message: self.ended_because() }
    }

    fn set_state(&mut self, to: JobState, message: impl Into<String>) -> Result<(), CoordError> {
        self.state =
            self.state.transition(to).map_err(|e| CoordError::Precondition(format!("job {}: {e}", self.id)))?;
        self.message = message.into();
        tracing::info!(job = %self.id, state = %to, message = %self.message, "job state changed");
        self.membership_changed();
        Ok(())
    }

    fn pos(&self, id: &WorkerId) -> Option<usize> {
        self.index.get(id).copied()
    }

    fn worker(&self, id: &WorkerId) -> Option<&Worker> {
        self.pos(id).map(|i| &self.workers[i])
    }

    fn worker_mut(&mut self, id: &WorkerId) -> Result<&mut Worker, CoordError> {
        match self.pos(id) {
            Some(i) => Ok(&mut self.workers[i]),
            None => Err(CoordError::NoWorker(id.clone())),
        }
    }

    fn add_worker(&mut self, w: Worker) {
        let i = self.workers.len();
        self.index.insert(w.id.clone(), i);
        self.by_addr.insert(w.collective_addr.clone(), i);
        self.workers.push(w);
        self.durable += 1;
    }

    fn reindex(&mut self) {
        self.index = self.workers.iter().enumerate().map(|(i, w)| (w.id.clone(), i)).collect();
        self.by_addr = self.workers.iter().enumerate().map(|(i, w)| (w.collective_addr.clone(), i)).collect();
        self.waiting = self.workers.iter().filter(|w| w.offer.is_some()).count();
        self.recount_members();
    }

    /// Recounts the latest generation's members that are back or absent (O(members); on the rare
    /// changes: a seal, a removal, a leave).
    fn recount_members(&mut self) {
        let (mut back, mut absent) = (0, 0);
        if let Some(g) = &self.generation {
            for m in &g.members {
                match self.index.get(m).map(|&i| &self.workers[i]) {
                    None => absent += 1,
                    Some(w) if w.leaving || w.gone => absent += 1,
                    Some(w) if w.offer.is_some() => back += 1,
                    Some(_) => {}
                }
            }
        }
        self.members_back = back;
        self.members_absent = absent;
    }

    /// Sets or clears a worker's rendezvous offer, keeping the count of waiting workers.
    fn set_offer(&mut self, i: usize, offer: Option<Offer>) {
        let counted = !self.workers[i].leaving && self.rank_of(&self.workers[i].id).is_some();
        match (self.workers[i].offer.is_some(), offer.is_some()) {
            (false, true) => {
                self.waiting += 1;
                self.members_back += usize::from(counted);
            }
            (true, false) => {
                self.waiting -= 1;
                self.members_back -= usize::from(counted);
            }
            _ => {}
        }
        self.workers[i].offer = offer;
    }

    fn rank_of(&self, id: &WorkerId) -> Option<u32> {
        self.generation.as_ref()?.rank_of(id)
    }

    fn current_number(&self) -> u64 {
        self.generation.as_ref().map_or(0, |g| g.number)
    }

    /// The generation workers must use now: the next one once the current one is broken.
    fn live_number(&self) -> u64 {
        match &self.next {
            Some(n) if !n.drain() => n.number,
            _ => self.current_number(),
        }
    }

    /// Checks that a worker call belongs to the live generation and returns the caller's rank.
    fn member_rank(&self, call: &WorkerCall) -> Result<u32, CoordError> {
        let generation = self.generation.as_ref().ok_or_else(|| {
            CoordError::Precondition(format!("job {} has no generation yet: call Rendezvous first", self.id))
        })?;
        let live = self.live_number();
        if call.generation != live || live != generation.number {
            return Err(CallError::StaleGeneration {
                current: live,
                message: format!(
                    "stale generation {} for worker {}: the current generation of job {} is {live}; rendezvous again",
                    call.generation, call.worker_id, self.id
                ),
            }
            .into());
        }
        generation.rank_of(&call.worker_id).ok_or_else(|| {
            CoordError::Precondition(format!(
                "worker {} is not a member of generation {}",
                call.worker_id, generation.number
            ))
        })
    }

    /// Removes workers from the job (the caller drops them from the worker index).
    fn remove_workers(&mut self, ids: &[WorkerId]) {
        if ids.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<&WorkerId> = ids.iter().collect();
        self.workers.retain(|w| !gone.contains(&w.id));
        self.reindex();
        self.durable += 1;
    }

    /// Seals the first generation when enough workers wait: at the target at once, else after the
    /// settle window that starts when `workers.min` are present.
    fn maybe_seal_first(&mut self, now: Instant) -> Option<Instant> {
        if self.state != JobState::Pending || self.generation.is_some() {
            return None;
        }
        let present = self.workers.len() as u32;
        if present < self.config.workers.min || (self.waiting as u32) < self.config.workers.min {
            if present < self.config.workers.min {
                self.quorum_since = None;
            }
            return None;
        }
        let since = *self.quorum_since.get_or_insert(now);
        let deadline = since + Duration::from_millis(self.config.rendezvous.settle_ms);
        if (self.waiting as u32) < self.target && now < deadline {
            return Some(deadline);
        }
        let chosen: Vec<usize> =
            (0..self.workers.len()).filter(|&i| self.workers[i].offer.is_some()).take(self.target as usize).collect();
        // A resumed job starts from its checkpoint; a fresh one from rank 0's new model.
        let source = self.committed_checkpoint.clone().map(|(_, dir)| StateSource::Checkpoint(dir));
        self.seal(chosen, self.committed_steps, source);
        // Pending -> Running is always legal here (checked state above).
        let _ = self.set_state(JobState::Running, "");
        None
    }

    /// Seals a generation of the workers at `chosen` (indices into `workers`, in preference order),
    /// starting at `start_step`, with the state taken from `source` (None: decided here).
    fn seal(&mut self, chosen: Vec<usize>, start_step: u64, source: Option<StateSource>) {
        let hosts: Vec<&str> = chosen.iter().map(|&i| self.workers[i].host_id.as_str()).collect();
        let order: Vec<usize> = membership::rank_order(&hosts).into_iter().map(|k| chosen[k]).collect();
        let members: Vec<WorkerId> = order.iter().map(|&i| self.workers[i].id.clone()).collect();
        let ranked_hosts: Vec<&str> = order.iter().map(|&i| self.workers[i].host_id.as_str()).collect();
        let bootstrap = order.first().and_then(|&i| self.workers[i].offer.as_ref()).map(|o| o.bootstrap.clone());
        let number = self.current_number() + 1;
        let source = source.unwrap_or_else(|| {
            // The first rank whose state reaches the start step; rank 0's fresh model otherwise.
            let holder = order.iter().position(|&i| {
                self.workers[i].offer.as_ref().and_then(|o| o.state).is_some_and(|s| s.reaches(start_step))
            });
            StateSource::Rank(holder.unwrap_or(0) as u32)
        });
        let generation =
            Generation::new(number, members.clone(), &ranked_hosts, bootstrap.unwrap_or_default(), start_step, source);
        for &i in &order {
            self.set_offer(i, None);
        }
        for w in &mut self.workers {
            (w.gone, w.probed) = (false, false);
        }
        self.ledger.open(number, members.iter().map(|m| m.0.clone()).collect(), start_step);
        self.pending_reports.clear();
        self.generation = Some(generation);
        self.next = None;
        self.recount_members();
        let world = members.len();
        self.event("generation", None, format!("world {world}"), start_step);
        tracing::info!(job = %self.id, generation = number, world, start_step, "generation sealed");
        self.membership_changed();
    }

    /// Members of the generation being formed after a break that are neither back nor known gone,
    /// once the window has been open for `PROBE_AFTER`: their collective addresses, to probe. Each
    /// is probed once per break.
    fn due_for_probe(&mut self, now: Instant) -> Vec<(WorkerId, String)> {
        let Some(next) = self.next.as_ref().filter(|n| !n.drain()) else { return Vec::new() };
        if next.window_from.is_none_or(|from| now < from + PROBE_AFTER) {
            return Vec::new();
        }
        let Some(g) = &self.generation else { return Vec::new() };
        let mut out = Vec::new();
        for m in &g.members {
            let Some(&i) = self.index.get(m) else { continue };
            let w = &mut self.workers[i];
            if w.offer.is_none() && !w.leaving && !w.gone && !w.probed {
                w.probed = true;
                out.push((w.id.clone(), w.collective_addr.clone()));
            }
        }
        out
    }

    /// Records that `id`'s collective listener refused a connection: its process has exited (a live
    /// worker keeps the listener for life), so the generation being formed does not wait the rejoin
    /// window for it.
    fn mark_gone(&mut self, id: &WorkerId) {
        if self.next.as_ref().is_none_or(|n| n.drain()) {
            return;
        }
        let Some(i) = self.pos(id) else { return };
        if self.workers[i].gone || self.workers[i].offer.is_some() {
            return;
        }
        self.workers[i].gone = true;
        self.recount_members();
        let addr = self.workers[i].collective_addr.clone();
        let step = self.committed_steps;
        self.event("gone", Some(id), format!("nothing listens at its collective address {addr}"), step);
        self.membership_changed();
    }

    /// Opens the next generation (or turns a draining one into a break).
    fn open_next(&mut self, change: Change, reason: String, now: Instant) {
        let Some(g) = &self.generation else { return };
        if self.state != JobState::Running {
            return;
        }
        let boundary = if change.drains() { g.fetched_end.max(self.committed_steps) } else { self.committed_steps };
        match &mut self.next {
            Some(n) if !n.drain() => return, // already broken: the rendezvous is under way
            Some(n) if change.drains() => {
                let _ = n; // a drain is already under way: it picks up this change too
                return;
            }
            Some(n) => {
                // A break during a drain: the old generation stops at once.
                n.change = change;
                n.boundary = boundary;
                n.window_from = Some(now);
                n.reason = reason;
            }
            None => {
                let number = g.number + 1;
                self.next = Some(Next {
                    number,
                    change,
                    boundary,
                    window_from: (!change.drains()).then_some(now),
                    below_min_since: None,
                    reason,
                });
            }
        }
        self.membership_changed();
    }

    /// Tries to seal the next generation; returns when to look again if it is still forming. Workers
    /// removed on the way (leavers) are added to `dropped` (to drop from the index).
    fn maybe_reform(&mut self, now: Instant, dropped: &mut Vec<WorkerId>) -> Option<Instant> {
        if self.state != JobState::Running || self.committed_steps >= self.config.steps {
            return None;
        }
        let (Some(g), Some(next)) = (self.generation.as_ref(), self.next.clone()) else { return None };
        if next.drain() && self.committed_steps < next.boundary {
            return None; // members still train the old generation's steps before the boundary
        }
        let window_from = match self.next.as_mut() {
            Some(n) => *n.window_from.get_or_insert(now),
            None => now,
        };
        let rejoin_deadline = window_from + Duration::from_millis(self.config.rendezvous.rejoin_ms);
        // O(1) while members are still coming back (this runs on every arrival).
        if self.members_back + self.members_absent < g.members.len() && now < rejoin_deadline {
            return Some(rejoin_deadline);
        }
        let g = self.generation.as_ref().expect("checked above");
        // Old members still registered and not leaving, in old rank order; those back in a rendezvous.
        let old: Vec<usize> = g
            .members
            .iter()
            .filter_map(|m| self.pos(m))
            .filter(|&i| !self.workers[i].leaving && !self.workers[i].gone)
            .collect();
        let arrived: Vec<usize> = old.iter().copied().filter(|&i| self.workers[i].offer.is_some()).collect();
        if arrived.len() < old.len() && now < rejoin_deadline {
            return Some(rejoin_deadline);
        }
        let g = self.generation.as_ref().expect("checked above");
        let released_set: std::collections::HashSet<&WorkerId> = self.released.iter().collect();
        let joiners: Vec<usize> = (0..self.workers.len())
            .filter(|&i| {
                let w = &self.workers[i];
                !w.leaving && w.offer.is_some() && g.rank_of(&w.id).is_none() && !released_set.contains(&w.id)
            })
            .collect();
        let arrived_set: std::collections::HashSet<usize> = arrived.iter().copied().collect();
        // Old members not back: leavers (they exit), and members evicted from the generation.
        let missing: Vec<(WorkerId, u32, bool)> = g
            .members
            .iter()
            .filter(|m| self.pos(m).is_none_or(|i| !arrived_set.contains(&i)))
            .map(|m| (m.clone(), g.rank_of(m).unwrap_or(0), self.worker(m).is_some_and(|w| w.leaving)))
            .collect();
        let target = self.target as usize;
        let mut chosen: Vec<usize> = arrived.iter().copied().take(target).collect();
        let released: Vec<usize> = arrived.iter().copied().skip(target).collect();
        chosen.extend(joiners.iter().copied().take(target.saturating_sub(chosen.len())));
        // Where the new generation starts, and whether a member brings its state.
        let start = next.boundary.min(self.committed_steps);
        let holds = |i: usize| self.workers[i].offer.as_ref().and_then(|o| o.state).is_some_and(|s| s.reaches(start));
        let holder = chosen.iter().any(|&i| holds(i));
        // Old members not back, those found gone included: a probe can be wrong (a loopback address
        // probed from another host), and a rollback loses committed steps, so only a lease proves it.
        let absent: Vec<usize> = g
            .members
            .iter()
            .filter_map(|m| self.pos(m))
            .filter(|&i| !self.workers[i].leaving && !arrived_set.contains(&i))
            .collect();
        if !holder && !absent.is_empty() {
            // The state's holders may be old members still working their way to the rendezvous (a
            // long step, a checkpoint being written): never roll back while one holds a live lease.
            // The reaper removes it when its lease runs out.
            let lease = Duration::from_millis(self.config.heartbeat.timeout_ms);
            let expiry = absent.iter().map(|&i| self.workers[i].last_seen + lease).max().unwrap_or(now);
            return Some(expiry.max(now + Duration::from_millis(50)));
        }
        if (chosen.len() as u32) < self.config.workers.min {
            let since = match self.next.as_mut() {
                Some(n) => *n.below_min_since.get_or_insert(now),
                None => now,
            };
            let timeout = Duration::from_millis(self.config.workers.below_min_timeout_ms);
            if now >= since + timeout {
                let names: Vec<String> =
                    missing.iter().filter(|m| !m.2).map(|(w, r, _)| format!("{w} (rank {r})")).collect();
                let msg = format!(
                    "{} of workers.min = {} workers left for generation {} after {} ({}); lost: {}",
                    chosen.len(),
                    self.config.workers.min,
                    next.number,
                    next.reason,
                    if timeout.is_zero() {
                        "workers.below_min_timeout_ms = 0".to_string()
                    } else {
                        format!("waited workers.below_min_timeout_ms = {}", self.config.workers.below_min_timeout_ms)
                    },
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                );
                let _ = self.set_state(JobState::Failed, msg);
                return None;
            }
            if since == now {
                let what = format!("{} of workers.min = {}", chosen.len(), self.config.workers.min);
                self.event("below_min", None, what, next.boundary);
            }
            return Some(since + timeout);
        }
        // Seal: leavers go; members that did not come back are evicted from the generation but stay
        // registered (a slow one rendezvouses later as a joiner; a dead one's lease runs out).
        let mut gone = Vec::new();
        for (w, _, leaving) in &missing {
            if *leaving {
                gone.push(w.clone());
            } else if self.worker(w).is_some() {
                self.event("evicted", Some(w), "did not rendezvous for the next generation", next.boundary);
            }
        }
        for &i in &released {
            let id = self.workers[i].id.clone();
            self.event("released", Some(&id), format!("above the target of {target} workers"), next.boundary);
            self.set_offer(i, None);
            self.released.push(id);
        }
        let mut start = start;
        let source = if holder {
            None // decided by seal (the first holder in rank order)
        } else {
            match self.committed_checkpoint.clone() {
                Some((steps, dir)) if steps <= start => {
                    if steps < start {
                        self.rollback(steps, &format!("no worker holds the state of step {start}: restoring {dir}"));
                    }
                    start = steps;
                    Some(StateSource::Checkpoint(dir))
                }
                _ => {
                    if start > 0 {
                        let why = format!("no worker holds the state of step {start} and no checkpoint is committed");
                        self.rollback(0, &why);
                    }
                    start = 0;
                    Some(StateSource::Rank(0))
                }
            }
        };
        // Indices move with the removal: choose again by id.
        let chosen_ids: Vec<WorkerId> = chosen.iter().map(|&i| self.workers[i].id.clone()).collect();
        gone.retain(|w| self.worker(w).is_some());
        self.remove_workers(&gone);
        dropped.extend(gone);
        let chosen: Vec<usize> = chosen_ids.iter().filter_map(|id| self.pos(id)).collect();
        self.seal(chosen, start, source);
        None
    }

    /// Forgets committed progress from `steps` on: the ledger is truncated and the event recorded.
    fn rollback(&mut self, steps: u64, why: &str) {
        tracing::warn!(job = %self.id, from = self.committed_steps, to = steps, why, "rollback");
        self.event("rollback", None, format!("from step {} to {steps}: {why}", self.committed_steps), steps);
        self.committed_steps = steps;
        self.ledger.truncate(steps);
        self.pending_reports.clear();
        self.skipped_samples = self.ledger.skipped.len() as u64;
        for w in &mut self.workers {
            w.reported_steps = w.reported_steps.min(steps);
        }
    }

    fn commit_ready_steps(&mut self) {
        let world = self.generation.as_ref().map_or(0, |g| g.members.len());
        while let Some(reports) = self.pending_reports.get(&self.committed_steps) {
            if reports.len() < world {
                break;
            }
            let step = self.committed_steps;
            let reports = self.pending_reports.remove(&step).unwrap_or_default();
            // The reported slices must tile the step's global batch, rank after rank.
            let want = self.plan.step(step).slots;
            let mut at = want.start;
            for (rank, r) in &reports {
                if r.slots.start != at {
                    let msg = format!(
                        "ledger: rank {rank} reported slots [{}, {}) of step {step}, but the slices must tile [{}, {}) (expected a slice from {at})",
                        r.slots.start, r.slots.end, want.start, want.end
                    );
                    let _ = self.set_state(JobState::Failed, msg);
                    return;
                }
                at = r.slots.end;
            }
            if at != want.end {
                let msg = format!("ledger: the slices of step {step} end at {at}, not at {}", want.end);
                let _ = self.set_state(JobState::Failed, msg);
                return;
            }
            // Loss terms are global (identical on every rank); throughput adds up across ranks.
            let mut latest = reports.get(&0).map(|r| r.metrics.clone()).unwrap_or_default();
            latest.samples_per_sec = reports.values().map(|r| r.metrics.samples_per_sec).sum();
            latest.local_samples = reports.values().map(|r| r.metrics.local_samples).sum();
            latest.step_ms = reports.values().map(|r| r.metrics.step_ms).fold(0.0, f64::max);
            latest.skipped_samples = reports.values().map(|r| r.metrics.skipped_samples).sum();
            self.skipped_samples += u64::from(latest.skipped_samples);
            self.ledger.commit(step, reports.values().flat_map(|r| r.skipped.iter().copied()));
            // A checkpoint is adopted when the step it follows commits.
            if let Some(dir) = reports.values().find_map(|r| r.checkpoint.clone()) {
                self.latest_checkpoint = dir.clone();
                self.committed_checkpoint = Some((step + 1, dir));
                if self.checkpoint_after.is_some_and(|s| s <= step) {
                    self.checkpoint_after = None;
                }
            }
            self.latest = Some(latest);
            self.committed_steps += 1;
            self.durable += 1;
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
            generation: self.current_number(),
            world_size: self.generation.as_ref().map_or(0, |g| g.world()),
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
            events: self.events.iter().cloned().collect(),
            target_workers: self.target,
        }
    }

    /// The durable record of this job.
    fn record(&self) -> crate::record::JobRecord {
        use crate::record::*;
        JobRecord {
            id: self.id.0.clone(),
            config_toml: self.config_toml.clone(),
            dataset_sizes: self.plan.sizes().to_vec(),
            state: self.state.as_str().into(),
            message: self.message.clone(),
            target: self.target,
            committed_steps: self.committed_steps,
            latest_checkpoint: self.latest_checkpoint.clone(),
            committed_checkpoint: self.committed_checkpoint.clone(),
            skipped_samples: self.skipped_samples,
            submitted_unix_ms: self.submitted_unix_ms,
            workers: self
                .workers
                .iter()
                .map(|w| WorkerRecord {
                    id: w.id.0.clone(),
                    host_id: w.host_id.clone(),
                    collective_addr: w.collective_addr.clone(),
                    device: w.device.clone(),
                    reported_steps: w.reported_steps,
                    leaving: w.leaving,
                })
                .collect(),
            generation: self.generation.as_ref().map(|g| GenerationState {
                number: g.number,
                members: g.members.iter().map(|m| m.0.clone()).collect(),
                bootstrap: g.bootstrap.clone(),
                start_step: g.start_step,
                source_rank: match &g.source {
                    StateSource::Rank(r) => Some(*r),
                    StateSource::Checkpoint(_) => None,
                },
                source_checkpoint: match &g.source {
                    StateSource::Checkpoint(d) => Some(d.clone()),
                    StateSource::Rank(_) => None,
                },
            }),
            ledger_generations: self
                .ledger
                .generations
                .iter()
                .map(|r| LedgerGeneration {
                    generation: r.generation,
                    world: r.world,
                    members: r.members.clone(),
                    first_step: r.first_step,
                    end_step: r.end_step,
                })
                .collect(),
            ledger_skipped: self.ledger.skipped.iter().copied().collect(),
            events: self
                .events
                .iter()
                .map(|e| EventRecord {
                    unix_ms: e.unix_ms,
                    kind: e.kind.clone(),
                    generation: e.generation,
                    worker_id: e.worker_id.clone(),
                    rank: e.rank,
                    reason: e.reason.clone(),
                    step: e.step,
                })
                .collect(),
        }
    }

    /// A job carried on from its record by a new leader: leases are re-armed from now, and a
    /// running job's members rendezvous again into a new generation (same members, the first
    /// uncommitted step).
    fn from_record(r: crate::record::JobRecord, now: Instant) -> Result<Job, String> {
        // Parsed, not validated again: a job stored by an earlier version must not stop a takeover
        // because a later version tightened a limit.
        let config = JobConfig::parse_toml(&r.config_toml).map_err(|e| format!("job {}: config: {e}", r.id))?;
        let weights: Option<Vec<f64>> = config.data.datasets.iter().map(|d| d.weight).collect();
        let plan = DataPlan::new(config.seed, config.global_batch, r.dataset_sizes.clone(), weights.as_deref())
            .map_err(|e| format!("job {}: plan: {e}", r.id))?;
        let state = match r.state.as_str() {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(format!("job {}: unknown state {other:?}", r.id)),
        };
        let mut ledger = Ledger::default();
        ledger.generations = r
            .ledger_generations
            .into_iter()
            .map(|g| crate::ledger::GenerationRecord {
                generation: g.generation,
                world: g.world,
                members: g.members,
                first_step: g.first_step,
                end_step: g.end_step,
            })
            .collect();
        ledger.skipped = r.ledger_skipped.into_iter().collect();
        let mut job = Job::new(JobId(r.id), config, plan);
        job.state = state;
        job.message = r.message;
        job.target = r.target;
        job.committed_steps = r.committed_steps;
        job.latest_checkpoint = r.latest_checkpoint;
        job.committed_checkpoint = r.committed_checkpoint;
        job.ledger = ledger;
        job.events = r
            .events
            .into_iter()
            .map(|e| pb::JobEvent {
                unix_ms: e.unix_ms,
                kind: e.kind,
                generation: e.generation,
                worker_id: e.worker_id,
                rank: e.rank,
                reason: e.reason,
                step: e.step,
            })
            .collect();
        job.skipped_samples = r.skipped_samples;
        job.submitted_unix_ms = r.submitted_unix_ms;
        for w in r.workers {
            job.add_worker(Worker {
                id: WorkerId(w.id),
                host_id: w.host_id,
                collective_addr: w.collective_addr,
                device: w.device,
                last_seen: now,
                last_seen_unix_ms: unix_ms(),
                offer: None,
                reported_steps: w.reported_steps,
                latest: None,
                leaving: w.leaving,
                gone: false,
                probed: false,
            });
        }
        if let Some(g) = r.generation {
            let members: Vec<WorkerId> = g.members.into_iter().map(WorkerId).collect();
            let hosts: Vec<&str> = members.iter().map(|m| job.worker(m).map_or("", |w| w.host_id.as_str())).collect();
            let source = match (g.source_rank, g.source_checkpoint) {
                (_, Some(dir)) => StateSource::Checkpoint(dir),
                (rank, None) => StateSource::Rank(rank.unwrap_or(0)),
            };
            let mut generation = Generation::new(g.number, members.clone(), &hosts, g.bootstrap, g.start_step, source);
            generation.fetched_end = job.committed_steps;
            job.generation = Some(generation);
        }
        job.durable = job.persisted;
        if job.state == JobState::Running {
            let step = job.committed_steps;
            job.event("takeover", None, "a new coordinator leads: every member rendezvouses again", step);
            job.open_next(Change::Takeover, "coordinator takeover".into(), now);
        }
        Ok(job)
    }

    /// The assignment of `id` in the latest generation.
    fn assignment(&self, id: &WorkerId) -> Option<Assignment> {
        let g = self.generation.as_ref()?;
        let rank = g.rank_of(id)?;
        let world = g.world();
        let at = |r: u32| self.worker(&g.members[r as usize]).map(membership::neighbour).unwrap_or_default();
        let (local_rank, local_world) = g.local[rank as usize];
        Some(Assignment::Member(Box::new(Membership {
            generation: g.number,
            rank,
            world,
            left: at((rank + world - 1) % world),
            right: at((rank + 1) % world),
            me: at(rank),
            local_rank,
            local_world,
            bootstrap: g.bootstrap.clone(),
            start_step: g.start_step,
            source: g.source.clone(),
        })))
    }
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<JobId, Job>,
    worker_jobs: HashMap<WorkerId, JobId>,
    next_job: u64,
    next_worker: u64,
}

/// One rendezvous attempt: the assignment, or when to look again (a settle or rejoin deadline, if
/// one runs) and a receiver that fires when membership changes.
type Attempt = Result<Assignment, (Option<Instant>, watch::Receiver<u64>)>;

/// Whether this coordinator serves: the leader does; a standby answers `Unavailable` naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Leader,
    Standby { leader: String },
}

/// The coordinator: shared by every service handler.
#[derive(Debug, Clone)]
pub struct Coordinator {
    inner: Arc<Mutex<Inner>>,
    role: Arc<Mutex<Role>>,
    /// Set once this coordinator leads with a durable store (`serve --etcd`).
    store: Arc<std::sync::OnceLock<Arc<dyn crate::store::StateStore>>>,
    /// Serialises writes to the store, so a newer record is never overwritten by an older one.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled when this coordinator stops leading (a write refused, the lease lost).
    pub deposed: tokio_util::sync::CancellationToken,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            inner: Arc::default(),
            role: Arc::new(Mutex::new(Role::Leader)),
            store: Arc::default(),
            writes: Arc::default(),
            deposed: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// How long one rendezvous long poll waits before answering `ready = false`.
pub const RENDEZVOUS_POLL: Duration = Duration::from_secs(10);

/// How long a break's rejoin window has been open before the members not back are probed (the
/// survivors of a failure are usually back within milliseconds; the probe is for the others).
pub const PROBE_AFTER: Duration = Duration::from_millis(50);
/// How long a probe waits for a connection to be refused; anything slower proves nothing.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A member to probe: its job and collective address.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    job: JobId,
    worker: WorkerId,
    addr: String,
}

/// Whether `path` is a step directory (`step-N`) directly in the job's `checkpoint.dir`, compared by
/// path components (the worker joins the step's name to the same string): what a worker reports as a
/// step's checkpoint. A `..` in `checkpoint.dir` itself is the user's (an absolute path keeps it); one
/// after it has no file name, or another parent, and is refused.
fn is_step_dir_of(dir: &str, path: &str) -> bool {
    let path = std::path::Path::new(path);
    path.parent() == Some(std::path::Path::new(dir))
        && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"))
}

/// Whether nothing listens at `addr`: a refused connection. A timeout or any other error (a host
/// down, a partition, a policy that drops packets) proves nothing and answers false.
async fn refused(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

impl Coordinator {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A coordinator that starts as a standby (`serve --etcd`) until it wins the election.
    pub fn standby() -> Self {
        let c = Self::default();
        c.set_standby("");
        c
    }

    pub fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// While waiting to lead: `leader` is the current leader's address (empty when unknown).
    pub fn set_standby(&self, leader: &str) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Standby { leader: leader.to_string() };
    }

    /// `Ok` when this coordinator serves; a standby's answer names the leader.
    pub fn serving(&self) -> Result<(), tonic::Status> {
        match self.role() {
            Role::Leader => Ok(()),
            Role::Standby { leader } if leader.is_empty() => {
                Err(tonic::Status::unavailable("this coordinator is a standby; no leader is known yet"))
            }
            Role::Standby { leader } => {
                Err(tonic::Status::unavailable(format!("this coordinator is a standby; the leader is at {leader}")))
            }
        }
    }

    /// Takes over as leader with `store`: every stored job is carried on (running jobs rendezvous
    /// again into a new generation with the same members).
    pub fn lead(&self, store: Arc<dyn crate::store::StateStore>, loaded: crate::store::Loaded) -> anyhow::Result<()> {
        let now = Instant::now();
        {
            let mut inner = self.lock();
            inner.next_job = inner.next_job.max(loaded.next_job);
            inner.next_worker = inner.next_worker.max(loaded.next_worker);
            for bytes in loaded.jobs {
                let record: crate::record::JobRecord =
                    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("a stored job record: {e}"))?;
                let job = Job::from_record(record, now).map_err(|e| anyhow::anyhow!("{e}"))?;
                for w in &job.workers {
                    inner.worker_jobs.insert(w.id.clone(), job.id.clone());
                }
                tracing::info!(job = %job.id, state = %job.state, committed = job.committed_steps, "job carried on");
                inner.jobs.insert(job.id.clone(), job);
            }
        }
        let _ = self.store.set(store);
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = Role::Leader;
        Ok(())
    }

    /// Writes every job record changed since its last write (one transaction), when this coordinator
    /// has a store. Called by the service before it answers a call that changed state.
    pub async fn persist(&self) -> Result<(), tonic::Status> {
        let Some(store) = self.store.get() else { return Ok(()) };
        let _serial = self.writes.lock().await;
        let (records, versions, counters) = {
            let inner = self.lock();
            let mut records = Vec::new();
            let mut versions = Vec::new();
            for job in inner.jobs.values().filter(|j| j.durable != j.persisted) {
                let bytes = serde_json::to_vec(&job.record()).map_err(|e| tonic::Status::internal(e.to_string()))?;
                records.push((job.id.0.clone(), bytes));
                versions.push((job.id.clone(), job.durable));
            }
            (records, versions, (inner.next_job, inner.next_worker))
        };
        if records.is_empty() {
            return Ok(());
        }
        match store.put(&records, counters).await {
            Ok(()) => {
                let mut inner = self.lock();
                for (id, v) in versions {
                    if let Some(j) = inner.jobs.get_mut(&id) {
                        j.persisted = j.persisted.max(v);
                    }
                }
                Ok(())
            }
            Err(crate::store::StoreError::Deposed) => {
                tracing::error!("deposed: another coordinator leads; this one stops serving");
                self.set_standby("");
                self.deposed.cancel();
                Err(tonic::Status::unavailable("this coordinator was deposed; another one leads"))
            }
            Err(e) => Err(tonic::Status::unavailable(format!("the state store refused the write: {e}"))),
        }
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
        if config.global_batch > plan.total() {
            return Err(domain::FieldError::new(
                "spec_toml: global_batch",
                format!(
                    "{} is more than an epoch: the job's datasets hold {} samples",
                    config.global_batch,
                    plan.total()
                ),
            )
            .into());
        }
        let mut inner = self.lock();
        inner.next_job += 1;
        let id = JobId(format!("job-{}", inner.next_job));
        let job = Job::new(id.clone(), config, plan);
        tracing::info!(job = %id, name = %job.config.name, steps = job.config.steps, "job submitted");
        inner.jobs.insert(id.clone(), job);
        Ok(id)
    }

    /// Registers a job that starts from a checkpoint directory (`step-N`, written by rank 0): the job
    /// begins at its step, and the first generation restores it (the workers check that its tensors
    /// fit the job's model, naming any that do not).
    pub fn submit_resumed(&self, config: JobConfig, dir: &str) -> Result<JobId, CoordError> {
        let field = |reason: String| domain::FieldError::new("resume_checkpoint", reason);
        let meta_path = Path::new(dir).join("meta.json");
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| field(format!("cannot read {}: {e}", meta_path.display())))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| field(format!("{}: {e}", meta_path.display())))?;
        if !meta["format"].as_str().is_some_and(|f| f.starts_with("hcmoco-checkpoint/")) {
            return Err(field(format!("{} is not an hcmoco checkpoint (no format key)", meta_path.display())).into());
        }
        let steps = meta["step"].as_u64().ok_or_else(|| field(format!("{}: no step", meta_path.display())))?;
        if steps >= config.steps {
            return Err(field(format!(
                "{dir} holds {steps} steps, but the job trains {}: nothing left to train",
                config.steps
            ))
            .into());
        }
        let id = self.submit(config)?;
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(&id) {
            job.committed_steps = steps;
            job.committed_checkpoint = Some((steps, dir.to_string()));
            job.latest_checkpoint = dir.to_string();
            job.event("resume", None, format!("from {dir}"), steps);
        }
        Ok(id)
    }

    /// CheckpointJob: rank 0 writes a checkpoint after the first step no rank has fetched yet.
    /// Returns the steps it will hold.
    pub fn request_checkpoint(&self, id: &JobId) -> Result<u64, CoordError> {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(id).ok_or_else(|| CoordError::NoJob(id.clone()))?;
        if job.state != JobState::Running {
            return Err(CoordError::Precondition(format!("job {id} is {}: only a running job checkpoints", job.state)));
        }
        let step = job.generation.as_ref().map_or(job.committed_steps, |g| g.fetched_end.max(job.committed_steps));
        let step = step.min(job.config.steps - 1);
        let after = *job.checkpoint_after.get_or_insert(step);
        job.event("checkpoint", None, format!("requested after step {after}"), job.committed_steps);
        Ok(after + 1)
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

    /// Sets the job's target number of workers (within [workers.min, workers.max]). Returns the target
    /// and the generation that will carry it.
    pub fn scale(&self, req: domain::ScaleJob) -> Result<(u32, u64), CoordError> {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(&req.job_id).ok_or_else(|| CoordError::NoJob(req.job_id.clone()))?;
        let (min, max) = (job.config.workers.min, job.config.workers.max);
        if !(min..=max).contains(&req.workers) {
            return Err(domain::FieldError::new(
                "workers",
                format!("{} is outside [workers.min, workers.max] = [{min}, {max}] of job {}", req.workers, job.id),
            )
            .into());
        }
        if job.state.is_terminal() {
            return Err(CoordError::Precondition(job.ended_because()));
        }
        let before = job.target;
        job.target = req.workers;
        job.durable += 1;
        if before != req.workers {
            let step = job.committed_steps;
            job.event("scale", None, format!("target {before} -> {}", req.workers), step);
        }
        let world = job.generation.as_ref().map_or(0, Generation::world);
        let standbys = job
            .workers
            .iter()
            .filter(|w| {
                job.rank_of(&w.id).is_none() && !w.leaving && w.offer.is_some() && !job.released.contains(&w.id)
            })
            .count() as u32;
        let change = job.state == JobState::Running && (req.workers < world || (req.workers > world && standbys > 0));
        if change {
            job.open_next(Change::Scale, format!("scale to {} workers", req.workers), Instant::now());
        }
        job.touch();
        let carrying = if change { job.current_number() + 1 } else { job.current_number() };
        Ok((job.target, carrying))
    }

    /// Adds a worker to a job. A running job admits it at the next step boundary when it has room
    /// below the target; otherwise it waits as a standby. A join at the collective address of a known
    /// worker replaces that worker (a restarted pod).
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
        let now = Instant::now();
        let job = inner.jobs.get_mut(&job_id).ok_or_else(|| CoordError::NoJob(job_id.clone()))?;
        if job.state.is_terminal() {
            return Err(CoordError::Precondition(format!("job {job_id} is {}", job.state)));
        }
        let mut replaced = None;
        if let Some(old) = job.by_addr.get(&req.collective_addr).map(|&i| job.workers[i].id.clone()) {
            let step = job.committed_steps;
            job.event(
                "lost",
                Some(&old),
                format!("replaced by a worker joining at its address {}", req.collective_addr),
                step,
            );
            if job.rank_of(&old).is_some() {
                job.open_next(Change::Lost, format!("worker {old} was replaced at {}", req.collective_addr), now);
            }
            job.remove_workers(std::slice::from_ref(&old));
            replaced = Some(old);
        }
        // Standbys are bounded: at most workers.max beyond the target.
        let limit = job.target as usize + job.config.workers.max as usize;
        if job.workers.len() >= limit {
            return Err(CoordError::Full(format!(
                "job {job_id} already has {} workers (target {} plus workers.max = {} standbys)",
                job.workers.len(),
                job.target,
                job.config.workers.max
            )));
        }
        let worker_id = {
            let n = &mut inner.next_worker;
            *n += 1;
            WorkerId(format!("w-{n}"))
        };
        let job = inner.jobs.get_mut(&job_id).ok_or_else(|| CoordError::NoJob(job_id.clone()))?;
        tracing::info!(job = %job_id, worker = %worker_id, host = %req.host_id, addr = %req.collective_addr, "worker joined");
        job.add_worker(Worker {
            id: worker_id.clone(),
            host_id: req.host_id,
            collective_addr: req.collective_addr,
            device: req.device,
            last_seen: now,
            last_seen_unix_ms: unix_ms(),
            offer: None,
            reported_steps: 0,
            latest: None,
            leaving: false,
            gone: false,
            probed: false,
        });
        if job.state == JobState::Running {
            // Admitted at its first rendezvous (a drain opens then), so it is waiting when the
            // generation forms.
            let step = job.committed_steps;
            job.event("join", Some(&worker_id), "", step);
        }
        job.touch();
        let resp = pb::JoinResponse {
            worker_id: worker_id.0.clone(),
            job_id: job_id.0.clone(),
            job_config_toml: job.config_toml.clone(),
            heartbeat_interval_ms: u32::try_from(job.config.heartbeat.interval_ms).unwrap_or(u32::MAX),
        };
        if let Some(old) = replaced {
            inner.worker_jobs.remove(&old);
        }
        inner.worker_jobs.insert(worker_id, job_id);
        Ok(resp)
    }

    /// Runs `f` on the job of `call`'s worker (its lease renewed), after checking the call's generation.
    fn with_worker_job<T>(
        &self,
        call: &WorkerCall,
        f: impl FnOnce(&mut Job, &mut Vec<WorkerId>) -> Result<T, CoordError>,
    ) -> Result<T, CoordError> {
        let worker = &call.worker_id;
        let mut inner = self.lock();
        let job_id = inner.worker_jobs.get(worker).cloned().ok_or_else(|| CoordError::NoWorker(worker.clone()))?;
        let job = inner.jobs.get_mut(&job_id).ok_or(CoordError::NoJob(job_id))?;
        // No worker can hold a generation the job has not opened: a number beyond it is a bad request.
        let live = job.live_number();
        if call.generation > live {
            return Err(domain::FieldError::new(
                "generation",
                format!("{} is beyond job {}'s current generation {live}", call.generation, job.id),
            )
            .into());
        }
        let w = job.worker_mut(worker)?;
        w.last_seen = Instant::now();
        w.last_seen_unix_ms = unix_ms();
        if std::mem::take(&mut w.gone) {
            // It calls, so it lives: the probe was wrong (it reached another host's loopback).
            job.recount_members();
        }
        let mut dropped = Vec::new();
        let r = f(job, &mut dropped);
        for id in dropped {
            inner.worker_jobs.remove(&id);
        }
        r
    }

    /// One rendezvous attempt: the assignment if a generation has taken the worker in, else when to
    /// look again and a receiver that fires on a membership change.
    fn try_rendezvous(&self, req: &domain::Rendezvous, now: Instant) -> Result<Attempt, CoordError> {
        self.with_worker_job(&req.call, |job, dropped| {
            let me = &req.call.worker_id;
            if job.state.is_terminal() {
                return Err(job.ended().into());
            }
            if let Some(pos) = job.released.iter().position(|w| w == me) {
                let generation = job.current_number();
                job.released.remove(pos);
                job.remove_workers(std::slice::from_ref(me));
                dropped.push(me.clone());
                job.touch();
                return Ok(Ok(Assignment::Released { generation }));
            }
            // Already taken into a generation newer than the caller's: answer it.
            if let Some(g) = &job.generation
                && g.number > req.call.generation
                && g.rank_of(me).is_some()
                && job.worker(me).is_some_and(|w| w.offer.is_none())
            {
                return Ok(Ok(job.assignment(me).expect("a member has an assignment")));
            }
            let i = job.pos(me).ok_or_else(|| CoordError::NoWorker(me.clone()))?;
            job.set_offer(i, Some(Offer { bootstrap: req.collective_bootstrap.clone(), state: req.state }));
            let deadline = if job.generation.is_none() {
                job.maybe_seal_first(now)
            } else {
                let is_member = job.rank_of(me).is_some();
                let current = job.current_number();
                if job.next.is_none() {
                    if is_member && req.call.generation == current {
                        // A member asking for a new generation without a failure report (its report was
                        // lost): its generation is broken all the same.
                        job.open_next(Change::Failure, format!("worker {me} left generation {current}"), now);
                    } else if !is_member && job.generation.as_ref().map_or(0, Generation::world) < job.target {
                        job.open_next(Change::Join, format!("worker {me} is waiting"), now);
                    }
                }
                job.maybe_reform(now, dropped)
            };
            if job.state.is_terminal() {
                return Err(job.ended().into());
            }
            if let Some(g) = &job.generation
                && g.number > req.call.generation
                && job.next.is_none()
                && let Some(a) = job.assignment(me)
            {
                return Ok(Ok(a));
            }
            if job.released.contains(me) {
                return Ok(Ok(Assignment::Released { generation: job.current_number() }));
            }
            Ok(Err((deadline, job.membership.subscribe())))
        })
    }

    /// Long poll until a generation takes the worker in or `window` passes (then `Ok(None)`).
    pub async fn rendezvous(
        &self,
        req: domain::Rendezvous,
        window: Duration,
    ) -> Result<Option<Assignment>, CoordError> {
        let give_up = Instant::now() + window;
        loop {
            let now = Instant::now();
            match self.try_rendezvous(&req, now)? {
                Ok(a) => {
                    if let Assignment::Released { .. } = a {
                        // Answered: the worker leaves the job.
                        self.forget_released(&req.call.worker_id);
                    }
                    return Ok(Some(a));
                }
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

    fn forget_released(&self, id: &WorkerId) {
        let mut inner = self.lock();
        if let Some(job_id) = inner.worker_jobs.get(id).cloned()
            && let Some(job) = inner.jobs.get_mut(&job_id)
        {
            job.released.retain(|w| w != id);
            job.remove_workers(std::slice::from_ref(id));
            inner.worker_jobs.remove(id);
        }
    }

    pub fn heartbeat(&self, req: domain::Heartbeat) -> Result<pb::HeartbeatResponse, CoordError> {
        self.with_worker_job(&req.call, |job, _| {
            // Completed jobs end through FetchWork (`done`); a stop is for failed or cancelled ones.
            let stop = matches!(job.state, JobState::Failed | JobState::Cancelled);
            Ok(pb::HeartbeatResponse {
                generation: job.live_number(),
                job_state: pb::JobState::from(job.state) as i32,
                stop,
                message: if stop { job.ended_because() } else { String::new() },
            })
        })
    }

    pub fn fetch_work(&self, req: domain::FetchWork) -> Result<Work, CoordError> {
        self.with_worker_job(&req.call, |job, _| {
            match job.state {
                JobState::Failed | JobState::Cancelled => return Ok(Work::Ended(job.ended_because())),
                JobState::Completed => return Ok(Work::Done),
                _ => {}
            }
            let rank = job.member_rank(&req.call)?;
            if req.step >= job.config.steps {
                // Past the last step, but not every rank has reported it: a failure could still make
                // this generation's survivors train it again, so the worker must not leave yet.
                return Ok(Work::Wait);
            }
            if let Some(n) = &job.next
                && n.drain()
                && req.step >= n.boundary
            {
                return Ok(Work::Rendezvous);
            }
            let g = job.generation.as_mut().expect("member_rank checked the generation");
            let world = g.world();
            if req.step < job.committed_steps || req.step >= job.committed_steps + MAX_INFLIGHT_STEPS {
                return Err(CoordError::Precondition(format!(
                    "step {} is not fetchable: {} steps are committed, at most {} may be in flight",
                    req.step, job.committed_steps, MAX_INFLIGHT_STEPS
                )));
            }
            g.fetched_end = g.fetched_end.max(req.step + 1);
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
            Ok(Work::Step(StepWork {
                step: req.step,
                epoch: sp.epoch,
                step_in_epoch: sp.step_in_epoch,
                global_slots: sp.slots,
                local_slots: local,
                samples,
                learning_rate: lr,
                checkpoint: job.checkpoint_after == Some(req.step),
            }))
        })
    }

    pub fn report_step(&self, req: domain::ReportStep) -> Result<pb::ReportStepResponse, CoordError> {
        self.with_worker_job(&req.call, |job, _| {
            if job.state.is_terminal() {
                return Err(job.ended().into());
            }
            let rank = job.member_rank(&req.call)?;
            let step = req.metrics.step;
            let generation_start = job.generation.as_ref().map_or(0, |g| g.start_step);
            if step < job.committed_steps && step >= generation_start {
                // A repeat (the first answer was lost with a connection): the step is committed.
                return Ok(pb::ReportStepResponse { committed_steps: job.committed_steps });
            }
            if step < job.committed_steps || step >= job.committed_steps + MAX_INFLIGHT_STEPS {
                return Err(CoordError::Precondition(format!(
                    "report of step {step} out of order: {} steps are committed",
                    job.committed_steps
                )));
            }
            if let Some(n) = &job.next
                && step >= n.boundary
            {
                return Err(CoordError::Precondition(format!(
                    "report of step {step}: generation {} ends before step {}",
                    job.current_number(),
                    n.boundary
                )));
            }
            if let Some(ckpt) = &req.checkpoint
                && !is_step_dir_of(&job.config.checkpoint.dir, ckpt)
            {
                return Err(domain::FieldError::new(
                    "checkpoint",
                    format!("{ckpt:?} is not a step directory of checkpoint.dir {:?}", job.config.checkpoint.dir),
                )
                .into());
            }
            let w = job.worker_mut(&req.call.worker_id)?;
            w.reported_steps = w.reported_steps.max(step + 1);
            if !req.metrics.device.is_empty() {
                w.device = req.metrics.device.clone();
            }
            w.latest = Some(req.metrics.clone());
            let report = Report {
                metrics: req.metrics,
                slots: req.slots,
                skipped: req.skipped_slots,
                checkpoint: req.checkpoint,
            };
            job.pending_reports.entry(step).or_default().insert(rank, report);
            let before = job.committed_steps;
            job.commit_ready_steps();
            if job.committed_steps != before && job.next.as_ref().is_some_and(|n| n.drain()) {
                // A drain may be complete: wake the members waiting in their rendezvous.
                job.membership_changed();
            }
            job.touch();
            Ok(pb::ReportStepResponse { committed_steps: job.committed_steps })
        })
    }

    pub fn report_failure(&self, req: domain::ReportFailure) -> Result<(), CoordError> {
        self.with_worker_job(&req.call, |job, _| {
            // A report from an earlier generation must not touch the current one (0: before any).
            let current = job.current_number();
            if req.call.generation != 0 && req.call.generation != current {
                return Err(CoordError::Precondition(format!(
                    "failure report from stale generation {} (current {current}) ignored",
                    req.call.generation
                )));
            }
            let rank = job.rank_of(&req.call.worker_id).map_or("-".to_string(), |r| r.to_string());
            let blame = req.failed_rank.map(|r| format!(" (attributed to rank {r})")).unwrap_or_default();
            tracing::warn!(job = %job.id, worker = %req.call.worker_id, step = req.step, message = %req.message, "worker reported a failure");
            if job.state.is_terminal() {
                return Ok(());
            }
            let msg = format!("worker {} (rank {rank}) failed at step {}{blame}: {}", req.call.worker_id, req.step, req.message);
            let already_broken = job.next.as_ref().is_some_and(|n| !n.drain());
            let step = job.committed_steps;
            job.event("failure", Some(&req.call.worker_id), msg.clone(), step);
            let member = job.rank_of(&req.call.worker_id).is_some();
            match job.state {
                JobState::Running if req.fatal && member => job.set_state(JobState::Failed, msg)?,
                JobState::Running if req.call.generation == current && !already_broken => {
                    job.open_next(Change::Failure, msg, Instant::now());
                }
                JobState::Running => job.touch(),
                _ => job.set_state(JobState::Failed, msg)?,
            }
            Ok(())
        })
    }

    /// A member leaving on purpose: it trains the steps before the answer, then exits.
    pub fn leave(&self, req: domain::Leave) -> Result<pb::LeaveResponse, CoordError> {
        self.with_worker_job(&req.call, |job, dropped| {
            let me = req.call.worker_id.clone();
            let step = job.committed_steps;
            if job.rank_of(&me).is_none() || job.state != JobState::Running {
                // Not training: it simply goes.
                job.event("leave", Some(&me), "not a member", step);
                job.remove_workers(std::slice::from_ref(&me));
                dropped.push(me);
                job.membership_changed();
                return Ok(pb::LeaveResponse { until_step: step });
            }
            job.worker_mut(&me)?.leaving = true;
            job.durable += 1;
            job.recount_members();
            job.event("leave", Some(&me), "leaving (SIGTERM)", step);
            let now = Instant::now();
            job.open_next(Change::Leave, format!("worker {me} is leaving"), now);
            let until = match &job.next {
                Some(n) if n.drain() => n.boundary,
                _ => job.committed_steps,
            };
            // The others may all be waiting already: the generation can form without the leaver.
            job.maybe_reform(now, dropped);
            job.membership_changed();
            Ok(pb::LeaveResponse { until_step: until })
        })
    }

    /// Every slot of the committed steps of `epoch`: who trained it, and whether it was skipped.
    pub fn ledger(&self, req: &domain::LedgerRef) -> Result<Vec<pb::LedgerEntry>, CoordError> {
        let inner = self.lock();
        let job = inner.jobs.get(&req.job_id).ok_or_else(|| CoordError::NoJob(req.job_id.clone()))?;
        Ok(job.ledger.entries(&job.plan, req.epoch, job.committed_steps))
    }

    /// Members to probe: after a break, those not back once the rejoin window has been open for
    /// `PROBE_AFTER`, each once per break (`Job::due_for_probe`).
    pub fn probe_targets(&self, now: Instant) -> Vec<ProbeTarget> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for job in inner.jobs.values_mut().filter(|j| j.state == JobState::Running) {
            for (worker, addr) in job.due_for_probe(now) {
                out.push(ProbeTarget { job: job.id.clone(), worker, addr });
            }
        }
        out
    }

    /// Connects to each target's collective address (a kill -9 closes a worker's listener, and its
    /// host then refuses the connection) and marks the refused ones gone, so the next generation
    /// forms without waiting the rejoin window for them. A live worker's listener takes the
    /// connection and drops it as one without a hello.
    pub async fn probe(&self, targets: Vec<ProbeTarget>) {
        let mut probes = tokio::task::JoinSet::new();
        for t in targets {
            probes.spawn(async move { refused(&t.addr).await.then_some(t) });
        }
        while let Some(done) = probes.join_next().await {
            if let Ok(Some(t)) = done {
                self.mark_gone(&t.job, &t.worker);
            }
        }
    }

    /// Marks `worker` of `job` gone (`Job::mark_gone`).
    pub fn mark_gone(&self, job: &JobId, worker: &WorkerId) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(job) {
            job.mark_gone(worker);
        }
    }

    /// Applies heartbeat leases and rendezvous deadlines: a silent member of a running generation is
    /// lost (a new generation forms without it); a silent worker outside the generation is dropped;
    /// a generation whose rejoin window or below-min wait has passed is sealed or fails the job.
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
                let step = job.committed_steps;
                match job.rank_of(&id) {
                    Some(rank) if job.state == JobState::Running => {
                        let msg = format!(
                            "worker {id} (rank {rank}, host {host}) lost: no heartbeat for {:.1}s",
                            quiet.as_secs_f64()
                        );
                        tracing::warn!(job = %job.id, worker = %id, rank, "worker lost");
                        job.event("lost", Some(&id), msg.clone(), step);
                        job.open_next(Change::Lost, msg, now);
                    }
                    _ => {
                        tracing::warn!(job = %job.id, worker = %id, "silent worker outside the generation dropped");
                        job.event("lost", Some(&id), format!("no heartbeat for {:.1}s", quiet.as_secs_f64()), step);
                    }
                }
                job.remove_workers(std::slice::from_ref(&id));
                job.released.retain(|w| w != &id);
                dropped.push(id);
                job.touch();
            }
            if job.next.is_some() {
                job.maybe_reform(now, &mut dropped);
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
    use hcmoco_proto::domain::{FetchWork, Heartbeat, HeldState, Join, Leave, Rendezvous, ReportFailure, ReportStep};

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

    fn join_at(c: &Coordinator, job: &JobId, host: &str, port: u16) -> Result<WorkerId, CoordError> {
        c.join(Join {
            job_id: Some(job.clone()),
            host_id: host.into(),
            collective_addr: format!("127.0.0.1:{port}"),
            device: "cpu".into(),
            pid: 1,
        })
        .map(|r| WorkerId(r.worker_id))
    }

    fn join(c: &Coordinator, job: &JobId, host: &str, port: u16) -> WorkerId {
        join_at(c, job, host, port).expect("join")
    }

    fn rdv_with(w: &WorkerId, generation: u64, state: Option<HeldState>) -> Rendezvous {
        Rendezvous {
            call: WorkerCall { worker_id: w.clone(), generation },
            collective_bootstrap: w.0.as_bytes().to_vec(),
            state,
        }
    }

    fn rdv(w: &WorkerId) -> Rendezvous {
        rdv_with(w, 0, None)
    }

    fn member(a: Option<Assignment>) -> Membership {
        match a {
            Some(Assignment::Member(m)) => *m,
            other => panic!("expected a membership, got {other:?}"),
        }
    }

    fn state(c: &Coordinator, job: &JobId) -> pb::JobState {
        pb::JobState::try_from(c.status(job).expect("status").state).expect("state")
    }

    /// Rendezvous calls running concurrently (as workers make them), answered when sealed.
    fn spawn_rdv(c: &Coordinator, r: Rendezvous) -> tokio::task::JoinHandle<Result<Option<Assignment>, CoordError>> {
        let c = c.clone();
        tokio::spawn(async move { c.rendezvous(r, Duration::from_secs(30)).await })
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
        let pending_b = spawn_rdv(&c, rdv(&b));
        let pending_a2 = spawn_rdv(&c, rdv(&a2));
        tokio::task::yield_now().await;
        // Two of the three wait: the settle window runs, nothing is sealed yet.
        assert_eq!(state(&c, &job), pb::JobState::Pending);
        let got_a = member(c.rendezvous(rdv(&a), Duration::from_secs(5)).await.expect("rdv"));
        assert_eq!(state(&c, &job), pb::JobState::Running, "sealed at max at once");
        assert_eq!((got_a.rank, got_a.generation, got_a.world), (0, 1, 3));
        let got_b = member(pending_b.await.expect("task").expect("rdv"));
        let got_a2 = member(pending_a2.await.expect("task").expect("rdv"));
        assert_eq!(got_b.bootstrap, a.0.as_bytes(), "rank 0's offer reaches every member");
        // Ranks: host-a's two workers first (host order by first arrival), then host-b; a rank learns
        // its neighbours and its place on its host, not the world.
        assert_eq!((got_a2.rank, got_b.rank), (1, 2));
        assert_eq!((got_a2.local_rank, got_a2.local_world, got_b.local_rank, got_b.local_world), (1, 2, 0, 1));
        assert_eq!((got_b.left.worker_id.as_str(), got_b.right.worker_id.as_str()), (a2.0.as_str(), a.0.as_str()));
        assert_eq!(got_a.source, StateSource::Rank(0));
    }

    #[tokio::test(start_paused = true)]
    async fn generation_seals_after_the_settle_window_with_min_workers() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 1, 2)).expect("submit");
        let a = join(&c, &job, "h", 1001);
        let t0 = Instant::now();
        let got = member(c.rendezvous(rdv(&a), Duration::from_secs(10)).await.expect("rdv"));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(1_000) && waited < Duration::from_millis(1_100), "{waited:?}");
        assert_eq!((got.generation, got.rank, got.world), (1, 0, 1));
        assert_eq!(got.bootstrap, a.0.as_bytes());
    }

    #[tokio::test(start_paused = true)]
    async fn rendezvous_below_min_answers_not_ready_and_joins_are_bounded() {
        let f = fixture(20);
        let c = Coordinator::new();
        let job = c.submit(config(&f, 2, 2)).expect("submit");
        let _a = join(&c, &job, "h", 1001);
        assert_eq!(c.rendezvous(rdv(&_a), Duration::from_secs(3)).await.expect("rdv"), None);
        // Up to workers.max standbys beyond the target of 2; the fifth is refused.
        for port in 1002..1005 {
            join(&c, &job, "h", port);
        }
        assert!(matches!(join_at(&c, &job, "h", 1005), Err(CoordError::Full(_))));
        // A join at a known collective address replaces that worker (a restarted pod).
        let again = join(&c, &job, "h", 1001);
        let ids: Vec<String> = c.status(&job).expect("status").workers.iter().map(|w| w.worker_id.clone()).collect();
        assert!(ids.contains(&again.0) && !ids.contains(&_a.0), "{ids:?}");
        assert!(matches!(
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: _a, generation: 0 }, step: 0 }),
            Err(CoordError::NoWorker(_))
        ));
    }

    async fn running(c: &Coordinator, f: &Fixture, n: u32) -> (JobId, Vec<WorkerId>) {
        let mut cfg = config(f, n.min(2), n);
        cfg.steps = 12;
        let job = c.submit(cfg).expect("submit");
        let ws = first_generation(c, &job, n).await;
        (job, ws)
    }

    /// `n` workers join `job` (one host) and rendezvous at once into its first generation.
    async fn first_generation(c: &Coordinator, job: &JobId, n: u32) -> Vec<WorkerId> {
        let ws: Vec<WorkerId> = (0..n).map(|i| join(c, job, "h", 1001 + i as u16)).collect();
        let polls: Vec<_> = ws.iter().map(|w| spawn_rdv(c, rdv(w))).collect();
        for p in polls {
            member(p.await.expect("task").expect("rdv"));
        }
        ws
    }

    async fn first_pair(c: &Coordinator, job: &JobId) -> (WorkerId, WorkerId) {
        let ws = first_generation(c, job, 2).await;
        (ws[0].clone(), ws[1].clone())
    }

    async fn running_pair(c: &Coordinator, f: &Fixture) -> (JobId, WorkerId, WorkerId) {
        let (job, ws) = running(c, f, 2).await;
        (job, ws[0].clone(), ws[1].clone())
    }

    fn fetch(c: &Coordinator, w: &WorkerId, generation: u64, step: u64) -> Result<Work, CoordError> {
        c.fetch_work(FetchWork { call: WorkerCall { worker_id: w.clone(), generation }, step })
    }

    fn work(c: &Coordinator, w: &WorkerId, generation: u64, step: u64) -> StepWork {
        match fetch(c, w, generation, step) {
            Ok(Work::Step(s)) => s,
            other => panic!("expected work for step {step}, got {other:?}"),
        }
    }

    /// Fetches and reports `step` for `w`, with the slice the coordinator gave it.
    fn train(c: &Coordinator, w: &WorkerId, generation: u64, step: u64) -> Result<pb::ReportStepResponse, CoordError> {
        let s = work(c, w, generation, step);
        report_slice(c, w, generation, step, s.local_slots, None)
    }

    fn report_slice(
        c: &Coordinator,
        w: &WorkerId,
        generation: u64,
        step: u64,
        slots: std::ops::Range<u64>,
        checkpoint: Option<String>,
    ) -> Result<pb::ReportStepResponse, CoordError> {
        let metrics = StepMetrics { step, loss_total: 1.0, samples_per_sec: 10.0, ..Default::default() };
        c.report_step(ReportStep {
            call: WorkerCall { worker_id: w.clone(), generation },
            metrics,
            checkpoint,
            slots,
            skipped_slots: vec![],
        })
    }

    #[tokio::test(start_paused = true)]
    async fn steps_are_sliced_committed_by_all_ranks_and_the_job_completes() {
        let f = fixture(12); // 12 samples, global batch 5: steps of 5, 5, 2 per epoch
        let c = Coordinator::new();
        let job = c.submit(config(&f, 2, 2)).expect("submit");
        let (a, b) = first_pair(&c, &job).await;
        let wa = work(&c, &a, 1, 0);
        let wb = work(&c, &b, 1, 0);
        assert_eq!(wa.global_slots, 0..5);
        assert_eq!((wa.local_slots.clone(), wb.local_slots.clone()), (0..2, 2..5));
        assert_eq!(wa.samples.len() + wb.samples.len(), 5);
        // A generation never opened, out-of-window steps: refused (the first as an invalid field).
        assert!(matches!(fetch(&c, &a, 2, 0), Err(CoordError::Invalid(e)) if e.field == "generation"));
        assert!(fetch(&c, &a, 1, 2).is_ok(), "a loader may prefetch");
        assert!(matches!(fetch(&c, &a, 1, 3), Err(CoordError::Precondition(_))));
        // A step commits only when both ranks reported it, with slices that tile its batch.
        assert_eq!(report_slice(&c, &a, 1, 0, 0..2, None).expect("report").committed_steps, 0);
        assert_eq!(report_slice(&c, &b, 1, 0, 2..5, None).expect("report").committed_steps, 1);
        // The device a step ran on replaces the one named at Join (with NCCL it is chosen later).
        let on_gpu = StepMetrics { step: 1, loss_total: 1.0, device: "cuda:0".into(), ..Default::default() };
        let call = WorkerCall { worker_id: a.clone(), generation: 1 };
        c.report_step(ReportStep { call, metrics: on_gpu, slots: 5..7, ..Default::default() })
            .expect("report on cuda:0");
        let devices: Vec<String> = c.status(&job).expect("status").workers.iter().map(|w| w.device.clone()).collect();
        assert_eq!(devices, ["cuda:0", "cpu"]);
        train(&c, &b, 1, 1).expect("report");
        for s in 2..4 {
            let w = work(&c, &a, 1, s);
            if s == 2 {
                assert_eq!(w.global_slots, 10..12, "last step of the epoch is smaller");
            }
            if s == 3 {
                assert_eq!((w.epoch, w.step_in_epoch), (1, 0));
            }
            train(&c, &a, 1, s).expect("report");
            train(&c, &b, 1, s).expect("report");
        }
        assert_eq!(state(&c, &job), pb::JobState::Completed);
        // Completion ends through FetchWork's `done`, never as a heartbeat stop (which means failure).
        let hb =
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 1 }, step: 4 }).expect("hb");
        assert!(!hb.stop);
        assert_eq!(fetch(&c, &a, 1, 4).expect("done"), Work::Done);
        let st = c.status(&job).expect("status");
        assert_eq!(st.committed_steps, 4);
        assert_eq!(st.latest.expect("latest").samples_per_sec, 20.0, "throughput adds up across ranks");
        // The ledger names every slot of epoch 0 once.
        let ledger = c.ledger(&domain::LedgerRef { job_id: job, epoch: 0 }).expect("ledger");
        let slots: Vec<u64> = ledger.iter().map(|e| e.slot).collect();
        assert_eq!(slots, (0..12).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn slices_that_do_not_tile_the_batch_fail_the_job() {
        let f = fixture(20);
        let c = Coordinator::new();
        let (job, a, b) = running_pair(&c, &f).await;
        report_slice(&c, &a, 1, 0, 0..2, None).expect("report");
        report_slice(&c, &b, 1, 0, 3..5, None).expect("report");
        let st = c.status(&job).expect("status");
        assert_eq!(state(&c, &job), pb::JobState::Failed);
        assert!(st.message.contains("tile") && st.message.contains("rank 1"), "{}", st.message);
    }

    /// A silent member is lost: the survivors form the next generation at the first uncommitted step;
    /// with too few left and no wait allowed, the job fails naming the lost worker.
    #[tokio::test(start_paused = true)]
    async fn a_silent_member_is_lost_and_below_min_fails_naming_it() {
        let f = fixture(20);
        let c = Coordinator::new();
        let mut cfg = config(&f, 2, 2);
        cfg.workers.below_min_timeout_ms = 0;
        let job = c.submit(cfg).expect("submit");
        let (a, b) = first_pair(&c, &job).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 1 }, step: 0 }).expect("hb");
        c.reap(Instant::now());
        assert_eq!(state(&c, &job), pb::JobState::Running, "within the 15 s lease");
        tokio::time::advance(Duration::from_secs(6)).await;
        c.reap(Instant::now());
        // b is lost: the survivor is told to rendezvous for generation 2.
        let hb =
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 1 }, step: 0 }).expect("hb");
        assert_eq!((hb.generation, hb.stop), (2, false));
        // Every remaining member is back at once, and one is below workers.min = 2: with no wait
        // allowed, the job fails.
        let end = c.rendezvous(rdv_with(&a, 1, None), Duration::from_millis(500)).await;
        assert!(matches!(end, Err(CoordError::Call(CallError::JobEnded { .. }))), "{end:?}");
        let st = c.status(&job).expect("status");
        assert_eq!(state(&c, &job), pb::JobState::Failed);
        assert!(st.message.contains(&b.0) && st.message.contains("rank 1"), "{}", st.message);
        assert!(st.events.iter().any(|e| e.kind == "lost" && e.worker_id == b.0), "{:?}", st.events);
        let hb = c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a, generation: 1 }, step: 0 }).expect("hb");
        assert!(hb.stop);
    }

    /// kill -9 of one of three: the survivors report, rendezvous, and form generation 2 at the first
    /// uncommitted step after the rejoin window; the rank that already applied that step undoes it
    /// and still serves as the state source; nothing committed is redone or lost.
    #[tokio::test(start_paused = true)]
    async fn a_failure_reforms_at_the_first_uncommitted_step() {
        let f = fixture(40);
        let c = Coordinator::new();
        let (job, ws) = running(&c, &f, 3).await;
        for s in 0..2 {
            for w in &ws {
                train(&c, w, 1, s).expect("report");
            }
        }
        // Step 2: ranks 0 and 1 report, rank 2 dies before reporting.
        train(&c, &ws[0], 1, 2).expect("report");
        train(&c, &ws[1], 1, 2).expect("report");
        c.report_failure(ReportFailure {
            call: WorkerCall { worker_id: ws[0].clone(), generation: 1 },
            step: 3,
            message: "peer rank 2 closed the connection".into(),
            failed_rank: Some(2),
            fatal: false,
        })
        .expect("report failure");
        // Generation 1 is broken: its calls are refused with the generation to rendezvous for.
        assert!(matches!(
            fetch(&c, &ws[1], 1, 3),
            Err(CoordError::Call(CallError::StaleGeneration { current: 2, .. }))
        ));
        let t0 = Instant::now();
        let r0 = spawn_rdv(&c, rdv_with(&ws[0], 1, Some(HeldState { applied_steps: 3, can_undo: true })));
        let r1 = spawn_rdv(&c, rdv_with(&ws[1], 1, Some(HeldState { applied_steps: 3, can_undo: true })));
        let m0 = member(r0.await.expect("task").expect("rdv"));
        let m1 = member(r1.await.expect("task").expect("rdv"));
        assert!(t0.elapsed() >= Duration::from_millis(2_000), "waited the rejoin window for rank 2");
        assert_eq!((m0.generation, m0.world, m0.rank, m1.rank), (2, 2, 0, 1));
        assert_eq!(m0.start_step, 2, "the first uncommitted step is trained again");
        assert_eq!(m0.source, StateSource::Rank(0));
        assert_eq!(m0.bootstrap, ws[0].0.as_bytes(), "the new rank 0's fresh offer");
        let st = c.status(&job).expect("status");
        assert_eq!((st.generation, st.world_size, st.committed_steps), (2, 2, 2));
        assert!(st.events.iter().any(|e| e.kind == "evicted" && e.worker_id == ws[2].0), "{:?}", st.events);
        for s in 2..12 {
            for w in &ws[..2] {
                train(&c, w, 2, s).expect("report");
            }
        }
        assert_eq!(state(&c, &job), pb::JobState::Completed);
        // Every slot of epoch 0 (40 samples, batch 5: steps 0..8) exactly once, steps 2.. by generation 2.
        let ledger = c.ledger(&domain::LedgerRef { job_id: job, epoch: 0 }).expect("ledger");
        let mut slots: Vec<u64> = ledger.iter().map(|e| e.slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..40).collect::<Vec<_>>());
        assert!(ledger.iter().all(|e| (e.step < 2) == (e.generation == 1)));
    }

    /// A member whose collective address refuses connections (its process has exited) is probed
    /// once the window has been open a moment, found gone, and not waited for: the survivors form
    /// the next generation as soon as they are back. A false finding costs the worker one generation:
    /// it comes back in through the next one, and nothing is lost.
    #[tokio::test(start_paused = true)]
    async fn a_member_found_gone_is_not_waited_for() {
        let f = fixture(40);
        let c = Coordinator::new();
        let (job, ws) = running(&c, &f, 3).await;
        for w in &ws {
            train(&c, w, 1, 0).expect("report");
        }
        c.report_failure(ReportFailure {
            call: WorkerCall { worker_id: ws[0].clone(), generation: 1 },
            step: 1,
            message: "peer rank 2 closed the connection".into(),
            failed_rank: Some(2),
            fatal: false,
        })
        .expect("report failure");
        let t0 = Instant::now();
        let held = Some(HeldState { applied_steps: 1, can_undo: true });
        let r0 = spawn_rdv(&c, rdv_with(&ws[0], 1, held));
        let r1 = spawn_rdv(&c, rdv_with(&ws[1], 1, held));
        tokio::task::yield_now().await;
        assert!(c.probe_targets(Instant::now()).is_empty(), "too early to probe");
        tokio::time::advance(PROBE_AFTER).await;
        let targets = c.probe_targets(Instant::now());
        let probed: Vec<(&WorkerId, &str)> = targets.iter().map(|t| (&t.worker, t.addr.as_str())).collect();
        assert_eq!(probed, [(&ws[2], "127.0.0.1:1003")], "only the member not back");
        assert!(c.probe_targets(Instant::now()).is_empty(), "once per break");
        c.mark_gone(&job, &ws[2]);
        let m0 = member(r0.await.expect("task").expect("rdv"));
        let m1 = member(r1.await.expect("task").expect("rdv"));
        assert!(t0.elapsed() < Duration::from_millis(100), "sealed at once, not after the rejoin window");
        assert_eq!((m0.generation, m0.world, m0.rank, m1.rank, m0.start_step), (2, 2, 0, 1, 1));
        let st = c.status(&job).expect("status");
        assert!(st.events.iter().any(|e| e.kind == "gone" && e.worker_id == ws[2].0), "{:?}", st.events);
        // Rank 2 was alive after all: its rendezvous makes it a joiner of generation 3.
        let r2 = spawn_rdv(&c, rdv_with(&ws[2], 1, Some(HeldState { applied_steps: 1, can_undo: true })));
        tokio::task::yield_now().await;
        // Nobody fetched a step of generation 2 yet: the drain boundary is its first step.
        assert_eq!(fetch(&c, &ws[0], 2, 1).expect("answer"), Work::Rendezvous);
        assert_eq!(fetch(&c, &ws[1], 2, 1).expect("answer"), Work::Rendezvous);
        let r0 = spawn_rdv(&c, rdv_with(&ws[0], 2, held));
        let m1 = member(c.rendezvous(rdv_with(&ws[1], 2, held), Duration::from_secs(5)).await.expect("rdv"));
        let m0 = member(r0.await.expect("task").expect("rdv"));
        let m2 = member(r2.await.expect("task").expect("rdv"));
        assert_eq!((m0.generation, m0.world, m1.generation, m2.generation, m2.start_step), (3, 3, 3, 3, 1));
        train(&c, &ws[2], 3, 1).expect("the worker once found gone trains again");
    }

    /// The probe's evidence: a refused connection where nothing listens; a live listener is not gone.
    #[tokio::test]
    async fn a_probe_tells_a_closed_address_from_a_live_listener() {
        let live = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        assert!(refused(&closed_addr).await);
        assert!(!refused(&live.local_addr().expect("addr").to_string()).await);
    }

    /// A joiner while running: the members train on to the first step none of them fetched, then form
    /// generation 2 with it; nothing is redone. A leave works the same way from the other side.
    #[tokio::test(start_paused = true)]
    async fn a_join_and_a_leave_drain_to_a_step_boundary() {
        let f = fixture(40);
        let c = Coordinator::new();
        let mut cfg = config(&f, 1, 3);
        cfg.steps = 12;
        let job = c.submit(cfg).expect("submit");
        let (a, b) = first_pair(&c, &job).await;
        train(&c, &a, 1, 0).expect("report");
        work(&c, &a, 1, 1); // a prefetched step 1
        let j = join(&c, &job, "h2", 2001);
        let pj = spawn_rdv(&c, rdv(&j));
        tokio::task::yield_now().await;
        // The boundary is step 2: step 1 is still trained by generation 1, step 2 is not.
        train(&c, &b, 1, 0).expect("report");
        assert_eq!(fetch(&c, &b, 1, 2).expect("answer"), Work::Rendezvous);
        train(&c, &a, 1, 1).expect("report");
        train(&c, &b, 1, 1).expect("report");
        assert_eq!(fetch(&c, &a, 1, 2).expect("answer"), Work::Rendezvous);
        let held = Some(HeldState { applied_steps: 2, can_undo: true });
        let pa = spawn_rdv(&c, rdv_with(&a, 1, held));
        let mb = member(c.rendezvous(rdv_with(&b, 1, held), Duration::from_secs(5)).await.expect("rdv"));
        let ma = member(pa.await.expect("task").expect("rdv"));
        let mj = member(pj.await.expect("task").expect("rdv"));
        assert_eq!((ma.generation, ma.world, ma.start_step), (2, 3, 2));
        assert_eq!((ma.rank, mb.rank, mj.rank), (0, 1, 2));
        assert_eq!(mj.source, StateSource::Rank(0), "the joiner takes rank 0's state");
        // b leaves: it trains up to the boundary, the others go on without it.
        train(&c, &a, 2, 2).expect("report");
        let until = c.leave(Leave { call: WorkerCall { worker_id: b.clone(), generation: 2 } }).expect("leave");
        assert_eq!(until.until_step, 3);
        train(&c, &b, 2, 2).expect("report");
        train(&c, &j, 2, 2).expect("report");
        assert_eq!(fetch(&c, &a, 2, 3).expect("answer"), Work::Rendezvous);
        let held = Some(HeldState { applied_steps: 3, can_undo: true });
        let pj = spawn_rdv(&c, rdv_with(&j, 2, held));
        let ma = member(c.rendezvous(rdv_with(&a, 2, held), Duration::from_secs(5)).await.expect("rdv"));
        let mj = member(pj.await.expect("task").expect("rdv"));
        assert_eq!((ma.generation, ma.world, ma.start_step, mj.rank), (3, 2, 3, 1));
        let st = c.status(&job).expect("status");
        assert!(!st.workers.iter().any(|w| w.worker_id == b.0), "the leaver is gone");
        assert_eq!(st.committed_steps, 3);
    }

    /// Past the last step a worker is told to wait, not that the job is done, until every rank has
    /// reported it: a failure could still make it train the last step again.
    #[tokio::test(start_paused = true)]
    async fn past_the_last_step_a_worker_waits_until_it_commits() {
        let f = fixture(40);
        let c = Coordinator::new();
        let (job, ws) = running(&c, &f, 2).await;
        for s in 0..11 {
            for w in &ws {
                train(&c, w, 1, s).expect("report");
            }
        }
        train(&c, &ws[0], 1, 11).expect("report");
        assert_eq!(fetch(&c, &ws[0], 1, 12).expect("answer"), Work::Wait);
        train(&c, &ws[1], 1, 11).expect("report");
        assert_eq!(state(&c, &job), pb::JobState::Completed);
        assert_eq!(fetch(&c, &ws[0], 1, 12).expect("answer"), Work::Done);
    }

    /// A member already sealed into the new generation gets its assignment even when another change
    /// opened before it polled again.
    #[tokio::test(start_paused = true)]
    async fn a_sealed_member_is_not_stranded_by_a_change_before_its_poll() {
        let f = fixture(40);
        let c = Coordinator::new();
        let (job, ws) = running(&c, &f, 3).await;
        train(&c, &ws[0], 1, 0).expect("report");
        c.report_failure(ReportFailure {
            call: WorkerCall { worker_id: ws[0].clone(), generation: 1 },
            step: 0,
            message: "peer gone".into(),
            failed_rank: Some(2),
            fatal: false,
        })
        .expect("report");
        let held = Some(HeldState { applied_steps: 1, can_undo: true });
        // b waits (its poll ends), a seals generation 2 after the rejoin window without rank 2.
        assert_eq!(c.rendezvous(rdv_with(&ws[1], 1, held), Duration::from_millis(10)).await.expect("rdv"), None);
        let ma = member(c.rendezvous(rdv_with(&ws[0], 1, held), Duration::from_secs(5)).await.expect("rdv"));
        assert_eq!((ma.generation, ma.world, ma.start_step), (2, 2, 0));
        // Before b polls again, a joiner opens a drain for generation 3.
        c.scale(domain::ScaleJob { job_id: job.clone(), workers: 3 }).expect("scale");
        let j = join(&c, &job, "h", 3001);
        assert_eq!(c.rendezvous(rdv(&j), Duration::from_millis(10)).await.expect("rdv"), None);
        let mb = member(c.rendezvous(rdv_with(&ws[1], 1, held), Duration::from_secs(1)).await.expect("rdv"));
        assert_eq!((mb.generation, mb.rank), (2, 1), "b gets generation 2");
        assert!(!c.status(&job).expect("status").events.iter().any(|e| e.kind == "evicted" && e.worker_id == ws[1].0));
    }

    /// Joiners alone never form a generation that rolls back while an old member holding the state
    /// is alive but slow to rendezvous.
    #[tokio::test(start_paused = true)]
    async fn joiners_wait_for_a_live_holder_instead_of_rolling_back() {
        let f = fixture(40);
        let c = Coordinator::new();
        let mut cfg = config(&f, 1, 2);
        cfg.steps = 12;
        let job = c.submit(cfg).expect("submit");
        let (a, b) = first_pair(&c, &job).await;
        for s in 0..3 {
            train(&c, &a, 1, s).expect("report");
            train(&c, &b, 1, s).expect("report");
        }
        let standby = join(&c, &job, "h", 1003);
        assert_eq!(c.rendezvous(rdv(&standby), Duration::from_millis(10)).await.expect("rdv"), None);
        c.report_failure(ReportFailure {
            call: WorkerCall { worker_id: b.clone(), generation: 1 },
            step: 3,
            message: "peer gone".into(),
            failed_rank: None,
            fatal: false,
        })
        .expect("report");
        // Past the rejoin window, a and b (alive: they heartbeat) have not come back.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_millis(500)).await;
            for w in [&a, &b] {
                c.heartbeat(Heartbeat { call: WorkerCall { worker_id: w.clone(), generation: 1 }, step: 3 })
                    .expect("hb");
            }
            c.reap(Instant::now());
        }
        assert_eq!(c.status(&job).expect("status").generation, 1, "no generation without the state");
        let held = Some(HeldState { applied_steps: 3, can_undo: true });
        let m = member(c.rendezvous(rdv_with(&a, 1, held), Duration::from_secs(1)).await.expect("rdv"));
        assert_eq!((m.generation, m.start_step, m.source.clone()), (2, 3, StateSource::Rank(m.rank)));
        let st = c.status(&job).expect("status");
        assert_eq!(st.committed_steps, 3);
        assert!(!st.events.iter().any(|e| e.kind == "rollback"), "{:?}", st.events);
    }

    #[tokio::test(start_paused = true)]
    async fn scale_down_releases_the_highest_rank_and_scale_is_bounded() {
        let f = fixture(40);
        let c = Coordinator::new();
        let (job, ws) = running(&c, &f, 3).await;
        let bad = c.scale(domain::ScaleJob { job_id: job.clone(), workers: 4 }).expect_err("above max");
        let status: tonic::Status = bad.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("workers"), "{}", status.message());
        assert!(matches!(
            c.scale(domain::ScaleJob { job_id: JobId("job-9".into()), workers: 2 }),
            Err(CoordError::NoJob(_))
        ));
        assert_eq!(c.scale(domain::ScaleJob { job_id: job.clone(), workers: 2 }).expect("scale"), (2, 2));
        for w in &ws {
            assert_eq!(fetch(&c, w, 1, 0).expect("answer"), Work::Rendezvous, "nothing was fetched: boundary 0");
        }
        let polls: Vec<_> = ws.iter().map(|w| spawn_rdv(&c, rdv_with(w, 1, None))).collect();
        let mut got = Vec::new();
        for p in polls {
            got.push(p.await.expect("task").expect("rdv").expect("ready"));
        }
        assert!(matches!(got[2], Assignment::Released { .. }), "{:?}", got[2]);
        assert_eq!(member(Some(got[0].clone())).world, 2);
        assert_eq!(c.status(&job).expect("status").workers.len(), 2, "the released worker is gone");
    }

    /// The wire is untrusted: a generation the job never opened, and a checkpoint outside the job's
    /// `checkpoint.dir`, are refused naming the field; the job is untouched.
    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_generation_or_outside_the_checkpoint_dir_are_invalid() {
        let f = fixture(40);
        let c = Coordinator::new();
        let mut cfg = config(&f, 1, 1);
        // A `..` in checkpoint.dir is the user's (`submit ../job.toml` makes one): still accepted.
        cfg.checkpoint.dir = "/runs/y/../x/checkpoints".into();
        let job = c.submit(cfg).expect("submit");
        let a = join(&c, &job, "h", 1001);
        member(c.rendezvous(rdv(&a), Duration::from_secs(5)).await.expect("rdv"));
        let invalid = |r: Result<_, CoordError>, field: &str| match r {
            Err(CoordError::Invalid(e)) => assert_eq!(e.field, field, "{e}"),
            other => panic!("expected an invalid {field}, got {other:?}"),
        };
        invalid(c.rendezvous(rdv_with(&a, u64::MAX, None), Duration::from_secs(1)).await.map(|_| ()), "generation");
        invalid(
            c.heartbeat(Heartbeat { call: WorkerCall { worker_id: a.clone(), generation: 2 }, step: 0 }).map(|_| ()),
            "generation",
        );
        let w = work(&c, &a, 1, 0);
        for bad in [
            "/etc/passwd",
            "/runs/y/../x/checkpoints/../../etc",
            "/runs/y/../x/checkpoints/..",
            "/runs/x/checkpoints/step-00000001",
            "checkpoints/step-1",
        ] {
            invalid(report_slice(&c, &a, 1, 0, w.local_slots.clone(), Some(bad.into())).map(|_| ()), "checkpoint");
        }
        let st = c.status(&job).expect("status");
        assert_eq!((st.committed_steps, st.latest_checkpoint.as_str()), (0, ""));
        let good = "/runs/y/../x/checkpoints/step-00000001";
        report_slice(&c, &a, 1, 0, w.local_slots, Some(good.into())).expect("a step directory of checkpoint.dir");
        assert_eq!(c.status(&job).expect("status").latest_checkpoint, good);
    }

    /// A global batch larger than an epoch is refused at submission, naming the key.
    #[test]
    fn a_global_batch_beyond_the_epoch_is_refused() {
        let f = fixture(12);
        let mut cfg = config(&f, 1, 1);
        cfg.global_batch = 13;
        match Coordinator::new().submit(cfg) {
            Err(CoordError::Invalid(e)) => {
                assert!(e.field.contains("global_batch") && e.reason.contains("12 samples"), "{e}")
            }
            other => panic!("expected an invalid global_batch, got {other:?}"),
        }
    }

    /// With no survivor holding the committed state, the committed checkpoint is restored and the
    /// steps after it are rolled back (ledger truncated).
    #[tokio::test(start_paused = true)]
    async fn without_survivors_the_committed_checkpoint_is_restored() {
        let f = fixture(40);
        let c = Coordinator::new();
        let mut cfg = config(&f, 1, 1);
        cfg.steps = 12;
        cfg.heartbeat.timeout_ms = 1_000;
        cfg.checkpoint.dir = "/ckpt".into();
        let job = c.submit(cfg).expect("submit");
        let a = join(&c, &job, "h", 1001);
        member(c.rendezvous(rdv(&a), Duration::from_secs(5)).await.expect("rdv"));
        for s in 0..3 {
            let w = work(&c, &a, 1, s);
            let ckpt = (s == 1).then(|| "/ckpt/step-00000002".to_string());
            report_slice(&c, &a, 1, s, w.local_slots, ckpt).expect("report");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        c.reap(Instant::now());
        let n = join(&c, &job, "h", 1002);
        let m = member(c.rendezvous(rdv(&n), Duration::from_secs(5)).await.expect("rdv"));
        assert_eq!(m.source, StateSource::Checkpoint("/ckpt/step-00000002".into()));
        assert_eq!((m.generation, m.start_step), (2, 2));
        let st = c.status(&job).expect("status");
        assert_eq!(st.committed_steps, 2);
        assert!(st.events.iter().any(|e| e.kind == "rollback"), "{:?}", st.events);
        let ledger = c.ledger(&domain::LedgerRef { job_id: job, epoch: 0 }).expect("ledger");
        assert_eq!(ledger.len(), 10, "steps 0 and 1 remain");
    }

    /// A takeover from the durable records (what a standby reads from etcd): the job is carried on at
    /// its committed step, its members rendezvous again into a new generation with the state they
    /// hold, and ids never repeat.
    #[tokio::test(start_paused = true)]
    async fn a_new_leader_carries_a_job_on_from_its_records() {
        let f = fixture(40);
        let store: Arc<dyn crate::store::StateStore> = Arc::new(crate::store::MemoryStore::default());
        let c = Coordinator::new();
        c.lead(store.clone(), crate::store::Loaded::default()).expect("lead");
        let (job, a, b) = running_pair(&c, &f).await;
        for s in 0..2 {
            train(&c, &a, 1, s).expect("report");
            train(&c, &b, 1, s).expect("report");
        }
        c.persist().await.expect("persist");
        // The old leader is gone; a new one reads the records.
        let d = Coordinator::new();
        d.lead(store.clone(), store.load().await.expect("load")).expect("lead");
        let st = d.status(&job).expect("status");
        assert_eq!((st.committed_steps, st.generation, st.world_size), (2, 1, 2));
        assert!(st.events.iter().any(|e| e.kind == "takeover"), "{:?}", st.events);
        // Generation 1's calls are stale: its members rendezvous again.
        assert!(matches!(fetch(&d, &a, 1, 2), Err(CoordError::Call(CallError::StaleGeneration { current: 2, .. }))));
        let held = Some(HeldState { applied_steps: 2, can_undo: true });
        let pb_ = spawn_rdv(&d, rdv_with(&b, 1, held));
        let ma = member(d.rendezvous(rdv_with(&a, 1, held), Duration::from_secs(5)).await.expect("rdv"));
        let mb = member(pb_.await.expect("task").expect("rdv"));
        assert_eq!((ma.generation, ma.start_step, ma.rank, mb.rank), (2, 2, 0, 1));
        assert_eq!(ma.source, StateSource::Rank(0));
        train(&d, &a, 2, 2).expect("report");
        train(&d, &b, 2, 2).expect("report");
        assert_eq!(d.status(&job).expect("status").committed_steps, 3);
        // Ids continue where the old leader left off.
        let n = join(&d, &job, "h", 1999);
        assert_eq!(n.0, "w-3");
        let ledger = d.ledger(&domain::LedgerRef { job_id: job, epoch: 0 }).expect("ledger");
        assert_eq!(ledger.len(), 15, "steps 0..3 of batch 5: the old leader's steps and the new one's");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_workers_and_is_final() {
        let f = fixture(20);
        let c = Coordinator::new();
        let (job, a, _b) = running_pair(&c, &f).await;
        assert_eq!(c.cancel(&job, "user said so").expect("cancel"), JobState::Cancelled);
        match fetch(&c, &a, 1, 0).expect("answer") {
            Work::Ended(m) => assert!(m.contains("user said so"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.cancel(&job, "again").expect("idempotent"), JobState::Cancelled);
        assert!(matches!(c.status(&JobId("job-99".into())), Err(CoordError::NoJob(_))));
        // A rendezvous after the end is a typed JobEnded.
        assert!(matches!(
            c.rendezvous(rdv_with(&a, 1, None), Duration::from_secs(1)).await,
            Err(CoordError::Call(CallError::JobEnded { .. }))
        ));
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
