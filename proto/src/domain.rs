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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
}

impl TryFrom<pb::SubmitJobRequest> for SubmitJob {
    type Error = FieldError;
    fn try_from(r: pb::SubmitJobRequest) -> Result<Self, FieldError> {
        if r.spec_toml.trim().is_empty() {
            return Err(FieldError::new("spec_toml", "must not be empty"));
        }
        let config = JobConfig::from_toml(&r.spec_toml).map_err(|e| FieldError::new("spec_toml", e.to_string()))?;
        Ok(SubmitJob { config })
    }
}

/// A request that names one job (`GetJob`, `WatchJob`).
#[derive(Debug, Clone)]
pub struct JobRef {
    pub job_id: JobId,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCall {
    pub worker_id: WorkerId,
    pub generation: u64,
}

/// Validated `Rendezvous`.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub call: WorkerCall,
    pub collective_bootstrap: Vec<u8>,
}

/// Largest accepted collective bootstrap (an NCCL unique id is 128 bytes).
pub const MAX_BOOTSTRAP_BYTES: usize = 4096;

impl TryFrom<pb::RendezvousRequest> for Rendezvous {
    type Error = FieldError;
    fn try_from(r: pb::RendezvousRequest) -> Result<Self, FieldError> {
        if r.collective_bootstrap.len() > MAX_BOOTSTRAP_BYTES {
            return Err(FieldError::new("collective_bootstrap", format!("at most {MAX_BOOTSTRAP_BYTES} bytes")));
        }
        Ok(Rendezvous {
            call: WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation },
            collective_bootstrap: r.collective_bootstrap,
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
        let finite = |field: &str, v: f64| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(FieldError::new(format!("metrics.{field}"), format!("{v} is not finite")))
            }
        };
        let time = |field: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(FieldError::new(format!("metrics.{field}"), format!("{v} is not a non-negative number")))
            }
        };
        let mut loss_terms = BTreeMap::new();
        for (k, v) in m.loss_terms {
            if k.is_empty() {
                return Err(FieldError::new("metrics.loss_terms", "term names must not be empty"));
            }
            let v = finite(&format!("loss_terms.{k}"), v)?;
            loss_terms.insert(k, v);
        }
        let device = m.device.trim().to_string();
        if !device.is_empty() && !valid_device(&device) {
            return Err(FieldError::new("metrics.device", format!("{device:?} is not \"cpu\" or \"cuda:N\"")));
        }
        Ok(StepMetrics {
            step: m.step,
            loss_total: finite("loss_total", m.loss_total)?,
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
#[derive(Debug, Clone)]
pub struct ReportStep {
    pub call: WorkerCall,
    pub metrics: StepMetrics,
    pub checkpoint: Option<String>,
}

impl TryFrom<pb::ReportStepRequest> for ReportStep {
    type Error = FieldError;
    fn try_from(r: pb::ReportStepRequest) -> Result<Self, FieldError> {
        let call = WorkerCall { worker_id: worker_id(&r.worker_id)?, generation: r.generation };
        let metrics = r.metrics.ok_or_else(|| FieldError::new("metrics", "is required"))?.try_into()?;
        let checkpoint = if r.checkpoint.is_empty() { None } else { Some(r.checkpoint) };
        Ok(ReportStep { call, metrics, checkpoint })
    }
}

/// Validated `ReportFailure`.
#[derive(Debug, Clone)]
pub struct ReportFailure {
    pub call: WorkerCall,
    pub step: u64,
    pub message: String,
    pub failed_rank: Option<u32>,
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
        Ok(ReportFailure { call, step: r.step, message: r.message, failed_rank })
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
        };
        assert_eq!(field_of(Rendezvous::try_from(rdv)), "collective_bootstrap");
        let report =
            pb::ReportStepRequest { worker_id: "w-1".into(), generation: 1, metrics: None, checkpoint: String::new() };
        assert_eq!(field_of(ReportStep::try_from(report)), "metrics");
        let nan = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { loss_total: f64::NAN, ..Default::default() }),
            checkpoint: String::new(),
        };
        assert_eq!(field_of(ReportStep::try_from(nan)), "metrics.loss_total");
        let neg = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { step_ms: -1.0, ..Default::default() }),
            checkpoint: String::new(),
        };
        assert_eq!(field_of(ReportStep::try_from(neg)), "metrics.step_ms");
        let gpu = pb::ReportStepRequest {
            worker_id: "w-1".into(),
            generation: 1,
            metrics: Some(pb::StepMetrics { device: "gpu0".into(), ..Default::default() }),
            checkpoint: String::new(),
        };
        assert_eq!(field_of(ReportStep::try_from(gpu)), "metrics.device");
        let fail = pb::ReportFailureRequest {
            worker_id: "w-1".into(),
            generation: 1,
            step: 0,
            message: " ".into(),
            failed_rank: -1,
        };
        assert_eq!(field_of(ReportFailure::try_from(fail)), "message");
        let fail = pb::ReportFailureRequest {
            worker_id: "w-1".into(),
            generation: 1,
            step: 0,
            message: "x".into(),
            failed_rank: -5,
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
        assert_eq!(field_of(SubmitJob::try_from(pb::SubmitJobRequest { spec_toml: String::new() })), "spec_toml");
        let e = SubmitJob::try_from(pb::SubmitJobRequest { spec_toml: "stepz = 1".into() }).expect_err("unknown key");
        assert_eq!(e.field, "spec_toml");
        assert!(e.reason.contains("stepz"), "{}", e.reason);
    }
}
