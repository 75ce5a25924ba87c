//! The hcmoco coordinator: owns jobs, membership, rendezvous and the data plan. No libtorch here.
//!
//! Layout:
//! - [`job`]: the job state machine (pending, running, completed, failed, cancelled).
//! - [`plan`]: the data plan: seeded epochs of slots, a step's global batch, each rank's fixed slice.
//! - [`state`]: [`Coordinator`], the in-memory state every handler shares: jobs, workers,
//!   generations, heartbeat leases, committed steps.
//! - [`membership`]: workers, sealed generations, and the rules that form the next one.
//! - [`ledger`]: which rank of which generation trained every slot of every committed step.
//! - [`record`], [`store`]: a job's durable record, and etcd (election, transactional writes) for
//!   coordinator failover.
//! - [`service`]: the gRPC handlers (JobService, WorkerService): validate once, call the state.
//! - [`server`]: [`server::run`] serves them plus gRPC health and reflection on a caller-bound listener.
//! - [`client`], [`status`]: connecting to a coordinator and rendering job status for the CLI.
//! - [`launch`]: `hcmoco launch --local`: an in-process coordinator plus worker processes.
//! - [`bench`]: `hcmoco bench`: rendezvous and heartbeats of many simulated workers over gRPC.

pub mod bench;
pub mod client;
pub mod job;
pub mod launch;
pub mod ledger;
pub mod membership;
pub mod plan;
pub mod record;
pub mod server;
pub mod service;
pub mod state;
pub mod status;
pub mod store;

pub use state::Coordinator;

/// The embedded default job file of `hcmoco launch --local`.
pub const DEFAULT_JOB_TOML: &str = include_str!("../default-job.toml");
