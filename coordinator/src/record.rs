//! A job's durable record: what a new leader needs to carry a job on after a failover, and nothing
//! that it re-arms itself (heartbeat leases, rendezvous offers, reports of uncommitted steps).
//!
//! The plan's inputs are stored (the resolved job file and each dataset's sample count), so a new
//! leader never re-reads a manifest; the ledger is stored as it is (it grows with generations and
//! skipped samples, never with the dataset).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub config_toml: String,
    pub dataset_sizes: Vec<u64>,
    pub state: String,
    pub message: String,
    pub target: u32,
    pub committed_steps: u64,
    pub latest_checkpoint: String,
    /// (steps it holds, directory) of the newest checkpoint whose step is committed.
    pub committed_checkpoint: Option<(u64, String)>,
    pub skipped_samples: u64,
    pub submitted_unix_ms: u64,
    pub workers: Vec<WorkerRecord>,
    pub generation: Option<GenerationState>,
    pub ledger_generations: Vec<LedgerGeneration>,
    /// (step, slot) pairs skipped.
    pub ledger_skipped: Vec<(u64, u64)>,
    pub events: Vec<EventRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub host_id: String,
    pub collective_addr: String,
    pub device: String,
    pub reported_steps: u64,
    pub leaving: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationState {
    pub number: u64,
    pub members: Vec<String>,
    pub bootstrap: Vec<u8>,
    pub start_step: u64,
    /// The state source: a rank, or a checkpoint directory.
    pub source_rank: Option<u32>,
    pub source_checkpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerGeneration {
    pub generation: u64,
    pub world: u32,
    pub members: Vec<String>,
    pub first_step: u64,
    pub end_step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub unix_ms: u64,
    pub kind: String,
    pub generation: u64,
    pub worker_id: String,
    pub rank: i32,
    pub reason: String,
    pub step: u64,
}
