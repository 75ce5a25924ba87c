//! Connecting to a coordinator from the CLI, and resolving a job file's paths.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hcmoco_proto::JobConfig;
use tonic::transport::{Channel, Endpoint};

/// Default coordinator address (loopback: the coordinator binds loopback unless told otherwise).
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(hcmoco_proto::endpoint_uri(addr))
        .with_context(|| format!("bad coordinator address {addr:?}"))?;
    endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {addr}"))
}

/// Reads and validates a job file, resolving relative dataset and checkpoint paths against the file's
/// directory (so the coordinator and workers see absolute paths).
pub fn load_job_file(path: &Path) -> anyhow::Result<JobConfig> {
    let cfg = read_job_file(path)?;
    cfg.validate().with_context(|| format!("job file {}", path.display()))?;
    Ok(cfg)
}

/// [`load_job_file`] without validation, for `launch`, which may still fill in the datasets.
pub fn read_job_file(path: &Path) -> anyhow::Result<JobConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job file {}", path.display()))?;
    let mut cfg = JobConfig::parse_toml(&text).with_context(|| format!("job file {}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = std::path::absolute(&base).unwrap_or(base);
    resolve_paths(&mut cfg, &base);
    Ok(cfg)
}

/// Makes the config's relative paths absolute against `base`.
pub fn resolve_paths(cfg: &mut JobConfig, base: &Path) {
    let abs = |p: &str| -> String {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }.display().to_string()
    };
    for d in &mut cfg.data.datasets {
        d.manifest = abs(&d.manifest);
    }
    cfg.checkpoint.dir = abs(&cfg.checkpoint.dir);
    let m = &mut cfg.model;
    for path in [&mut m.init_checkpoint, &mut m.init_rgb_backbone, &mut m.init_depth_backbone] {
        if !path.is_empty() {
            *path = abs(path);
        }
    }
}
