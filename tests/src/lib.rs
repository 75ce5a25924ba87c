//! Harness for the multi-process integration tests: a real coordinator served on loopback in this
//! process, real `hcmoco-worker` processes, synthetic datasets in temporary directories.
//!
//! The binaries are found next to the test executable's directory (`target/<profile>/`), or through
//! `HCMOCO_WORKER_BIN` / `HCMOCO_BIN`; build them first with `cargo build --workspace --bins`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hcmoco_coordinator::Coordinator;
use hcmoco_proto::domain::JobId;
use hcmoco_proto::{JobConfig, pb};
use tokio_util::sync::CancellationToken;

/// The python of the project's venv (`$HCMOCO_VENV`, else `~/.cache/hcmoco/venv-torch-2.11.0`), which
/// `scripts/setup.sh` builds with torch, webdataset and timm. Tests that compare with Python fail
/// without it (a missing venv is a broken set-up, not a reason to pass).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HCMOCO_VENV").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache/hcmoco/venv-torch-2.11.0")
    });
    let python = venv.join("bin/python");
    assert!(python.is_file(), "python venv not found at {} (set HCMOCO_VENV or run scripts/setup.sh)", venv.display());
    python
}

/// A file of this test crate (`python/...`). The directory comes from the environment cargo sets when
/// it runs the test, not from the path compiled in: a target directory shared between checkouts (CI's
/// cache) may hold a test binary built in another, since deleted, checkout.
pub fn crate_file(relative: &str) -> PathBuf {
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join(relative)
}

/// Locates a workspace binary (`hcmoco` or `hcmoco-worker`).
pub fn bin(name: &str) -> PathBuf {
    let var = if name == "hcmoco-worker" { "HCMOCO_WORKER_BIN" } else { "HCMOCO_BIN" };
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("cannot find the {name} binary near {}: run `cargo build --workspace --bins` first", exe.display());
}

/// Generates a synthetic dataset and returns its manifest path.
pub fn synth(dir: &Path, samples: u64, image_size: u32, seed: u64) -> PathBuf {
    let cfg = hcmoco_data::SynthConfig { samples, image_size, seed, shard_size: 32, ..Default::default() };
    hcmoco_data::generate(&cfg, dir).expect("synthetic dataset");
    dir.join("manifest.json")
}

/// A coordinator serving on 127.0.0.1:0 from a runtime owned by this handle.
pub struct TestCoordinator {
    pub coordinator: Coordinator,
    pub addr: std::net::SocketAddr,
    pub rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
}

impl TestCoordinator {
    pub fn start() -> TestCoordinator {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let coordinator = Coordinator::new();
        let shutdown = CancellationToken::new();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(hcmoco_coordinator::server::run(listener, coordinator.clone(), shutdown.clone()));
        TestCoordinator { coordinator, addr, rt, shutdown }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn submit(&self, cfg: JobConfig) -> JobId {
        self.coordinator.submit(cfg).expect("job accepted")
    }

    pub fn status(&self, job: &JobId) -> pb::JobStatus {
        self.coordinator.status(job).expect("job exists")
    }

    /// Waits (on change notifications, bounded by `limit`) until `pred` holds for the job's status;
    /// calls `seen` on every status observed.
    pub fn wait_until(
        &self,
        job: &JobId,
        limit: Duration,
        mut seen: impl FnMut(&pb::JobStatus),
        pred: impl Fn(&pb::JobStatus) -> bool,
    ) -> anyhow::Result<pb::JobStatus> {
        let mut rx = self.coordinator.subscribe(job)?;
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(job);
            seen(&s);
            if pred(&s) {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {limit:?} waiting on job {job}; last status:\n{}",
                    hcmoco_coordinator::status::render(&s)
                );
            }
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(left.min(Duration::from_millis(500)), rx.changed()).await });
        }
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn is_terminal(s: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(s.state),
        Ok(pb::JobState::Completed | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

pub fn state_of(s: &pb::JobStatus) -> pb::JobState {
    pb::JobState::try_from(s.state).unwrap_or(pb::JobState::Unspecified)
}

/// A small job on `manifest`: `workers` ranks, one torch thread each.
pub fn small_job(manifest: &Path, out: &Path, workers: u32, steps: u64, global_batch: u64) -> JobConfig {
    let mut cfg =
        JobConfig::from_toml(&format!("[[data.datasets]]\nmanifest = {:?}\n", manifest.display().to_string()))
            .expect("base job");
    cfg.name = "itest".into();
    cfg.steps = steps;
    cfg.global_batch = global_batch;
    cfg.workers.min = workers;
    cfg.workers.max = workers;
    cfg.model.backbone = "hrnet_small".into();
    cfg.model.embed_dim = 32;
    cfg.model.keypoint_hidden = 32;
    cfg.model.keypoint_blocks = 1;
    cfg.checkpoint.dir = out.join("checkpoints").display().to_string();
    cfg.checkpoint.every_steps = 0;
    cfg.collective.timeout_ms = 20_000;
    cfg.rendezvous.settle_ms = 100;
    cfg.runtime.torch_threads = 1;
    // Images as stored (tests that exercise augmentation set a crop size).
    cfg.data.image_size = 0;
    cfg
}

/// A worker process whose output goes to a log file; killed on drop if still running.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProc {
    pub fn spawn(coordinator_url: &str, job: &JobId, log: PathBuf, extra: &[&str]) -> WorkerProc {
        let file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(bin("hcmoco-worker"))
            .args(["run", "--coordinator", coordinator_url, "--job", &job.0, "--host-id", "itest"])
            .args(extra)
            .env("OMP_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("spawn hcmoco-worker");
        WorkerProc { child, log }
    }

    /// Waits for the process to exit (bounded), returning its exit status.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("worker did not exit within {limit:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port (bound then released: another process could take it in between, which the
/// callers' start-up checks would notice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A single-member etcd (Debian's `etcd-server`, v3 API) on free loopback ports with its own data
/// directory; killed on drop.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("etcd data dir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "itest", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("itest=http://127.0.0.1:{peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian package etcd-server; scripts/setup.sh installs it)");
        let etcd = Etcd { child, _dir: dir, endpoint };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !etcd.healthy() {
            assert!(Instant::now() < deadline, "etcd did not become healthy within 20 s at {}", etcd.endpoint);
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    /// `GET /health` answers `"health":"true"`.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let addr = self.endpoint.trim_start_matches("http://");
        let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a safetensors file of named tensors.
pub fn read_tensors(path: &Path) -> anyhow::Result<Vec<(String, tch::Tensor)>> {
    let mut v = tch::Tensor::read_safetensors(path).with_context(|| format!("read {}", path.display()))?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// The model's tensors of a `--dump-state` file (which also holds the momentum buffers, named
/// `momentum.*`, and the memory banks).
pub fn without_momentum(v: Vec<(String, tch::Tensor)>) -> Vec<(String, tch::Tensor)> {
    v.into_iter().filter(|(n, _)| !n.starts_with("momentum.")).collect()
}

/// Largest absolute and largest relative difference between two sets of named tensors (same names).
pub fn max_diffs(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> anyhow::Result<(f64, f64)> {
    if a.len() != b.len() {
        bail!("{} tensors vs {}", a.len(), b.len());
    }
    let (mut abs, mut rel) = (0.0f64, 0.0f64);
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        if na != nb {
            bail!("tensor names differ: {na} vs {nb}");
        }
        let (ta, tb) = (ta.to_kind(tch::Kind::Double), tb.to_kind(tch::Kind::Double));
        let d = (&ta - &tb).abs().max().double_value(&[]);
        let scale = ta.abs().max().double_value(&[]).max(tb.abs().max().double_value(&[])).max(1e-12);
        abs = abs.max(d);
        rel = rel.max(d / scale);
    }
    Ok((abs, rel))
}
