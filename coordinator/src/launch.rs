//! `hcmoco launch --local`: one command for a whole run on this machine.
//!
//! Starts an in-process coordinator on loopback, generates a small synthetic dataset under the output
//! directory unless one is given, submits the job, spawns N `hcmoco-worker run` processes (logs under
//! `OUT/logs/`), shows live progress, and prints a final summary. A worker process that dies fails the
//! run at once (its log tail is shown); Ctrl-C cancels the job and stops the workers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hcmoco_proto::config::DatasetConfig;
use hcmoco_proto::domain::JobId;
use hcmoco_proto::{JobConfig, pb};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::client::resolve_paths;
use crate::job::wire_state_name;
use crate::state::Coordinator;
use crate::status;

/// What `launch` needs to know.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub workers: u32,
    pub steps: Option<u64>,
    pub out: PathBuf,
    /// An existing dataset manifest; a synthetic one is generated under `out/data` when absent.
    pub data: Option<PathBuf>,
    /// A job file to start from instead of the embedded default.
    pub job_file: Option<PathBuf>,
    pub worker_bin: Option<PathBuf>,
    /// Samples of the generated dataset.
    pub synth_samples: u64,
    pub synth_image_size: u32,
    /// Extra arguments for every worker process.
    pub worker_args: Vec<String>,
    /// `loss.stage` override.
    pub stage: Option<u32>,
    /// `model.init_checkpoint` override (stage 2 from a stage-1 run).
    pub init_checkpoint: Option<PathBuf>,
}

/// Result of a finished launch.
#[derive(Debug)]
pub struct LaunchOutcome {
    pub job_id: String,
    pub status: pb::JobStatus,
    /// The earliest step whose loss the launcher observed, and that loss.
    pub first_loss: Option<(u64, f64)>,
}

/// Finds the `hcmoco-worker` binary: the explicit path, then `HCMOCO_WORKER_BIN`, then next to this
/// executable (and one directory up, for test binaries under `deps/`).
pub fn find_worker_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { bail!("worker binary {} does not exist", p.display()) };
    }
    if let Some(p) = std::env::var_os("HCMOCO_WORKER_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { bail!("HCMOCO_WORKER_BIN={} does not exist", p.display()) };
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("hcmoco-worker");
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    bail!(
        "cannot find the hcmoco-worker binary (tried {}); build it with `cargo build --workspace --bins` or pass --worker-bin",
        tried.join(", ")
    )
}

/// Whether the job file sets `checkpoint.dir` itself (rather than leaving the default).
fn job_file_sets_checkpoint_dir(path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read job file {}", path.display()))?;
    let value: toml::Value = toml::from_str(&text).with_context(|| format!("job file {}", path.display()))?;
    Ok(value.get("checkpoint").and_then(|c| c.get("dir")).is_some())
}

/// Builds the job config of a local launch. The job file (or the embedded default) is the base;
/// `--data` replaces its datasets (a default job with no `--data` trains on `manifest`, the generated
/// set); `--workers` and `--steps` override; checkpoints go under the output directory unless the job
/// file sets `checkpoint.dir`.
pub fn local_config(opts: &LaunchOptions, generated: Option<&Path>) -> anyhow::Result<JobConfig> {
    if let Some(0) = opts.steps {
        bail!("--steps must be at least 1");
    }
    let data = opts.data.as_deref().or(generated);
    let mut cfg = match &opts.job_file {
        Some(path) => crate::client::read_job_file(path)?,
        None => {
            let manifest = data.context("the default job needs a dataset: --data, or a generated one")?;
            JobConfig::from_toml(&format!(
                "{}\n[[data.datasets]]\nmanifest = {:?}\n",
                crate::DEFAULT_JOB_TOML,
                manifest.display().to_string()
            ))
            .context("embedded default job file")?
        }
    };
    if let Some(m) = data {
        cfg.data.datasets = vec![DatasetConfig { manifest: m.display().to_string(), weight: None }];
    }
    cfg.workers.min = opts.workers;
    cfg.workers.max = opts.workers;
    if let Some(steps) = opts.steps {
        cfg.steps = steps;
    }
    if let Some(stage) = opts.stage {
        cfg.loss.stage = stage;
    }
    if let Some(init) = &opts.init_checkpoint {
        let init = std::path::absolute(init).with_context(|| format!("--init-checkpoint {}", init.display()))?;
        cfg.model.init_checkpoint = init.display().to_string();
    }
    // Checkpoints go under the output directory unless the job file names a place: two runs from one
    // job file (stage 1, then stage 2) must not write into, and replace, each other's checkpoints.
    let file_names_dir = match &opts.job_file {
        Some(path) => job_file_sets_checkpoint_dir(path)?,
        None => false,
    };
    if !file_names_dir {
        cfg.checkpoint.dir = opts.out.join("checkpoints").display().to_string();
    }
    resolve_paths(&mut cfg, &opts.out);
    cfg.validate().context("launch configuration")?;
    Ok(cfg)
}

pub struct WorkerProc {
    index: u32,
    child: Child,
    log: PathBuf,
    /// How many times this worker slot was restarted.
    restarts: u32,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn progress_message(s: &pb::JobStatus) -> String {
    match &s.latest {
        Some(m) => format!(
            "loss {:.4}  {:.1} samples/s  step {:.0} ms (data {:.0} / compute {:.0} / comm {:.0})  gen {}  world {}",
            m.loss_total, m.samples_per_sec, m.step_ms, m.data_ms, m.compute_ms, m.comm_ms, s.generation, s.world_size
        ),
        None => format!("{}: {} of {} workers joined", wire_state_name(s.state), s.workers.len(), s.min_workers),
    }
}

/// Runs a local job to its end.
pub async fn launch_local(opts: LaunchOptions, interrupt: CancellationToken) -> anyhow::Result<LaunchOutcome> {
    if opts.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let out = std::path::absolute(&opts.out).with_context(|| format!("output directory {}", opts.out.display()))?;
    let opts = LaunchOptions { out: out.clone(), ..opts };
    std::fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.join("logs").display()))?;
    let worker_bin = find_worker_bin(opts.worker_bin.as_deref())?;

    // Data: --data, else the job file's datasets, else a synthetic set generated under OUT/data.
    let opts = LaunchOptions { data: opts.data.as_deref().map(std::path::absolute).transpose()?, ..opts };
    let job_file_has_data = match &opts.job_file {
        Some(path) => !crate::client::read_job_file(path)?.data.datasets.is_empty(),
        None => false,
    };
    let generated = match (&opts.data, job_file_has_data) {
        (Some(_), _) | (None, true) => None,
        (None, false) => Some({
            let dir = out.join("data");
            let manifest = dir.join("manifest.json");
            if manifest.is_file() {
                eprintln!("using the synthetic dataset already at {}", dir.display());
            } else {
                let cfg = hcmoco_data::SynthConfig {
                    samples: opts.synth_samples,
                    image_size: opts.synth_image_size,
                    name: "synthetic-humans".into(),
                    ..Default::default()
                };
                let t = Instant::now();
                eprintln!(
                    "generating {} synthetic samples ({}x{}) under {}",
                    cfg.samples,
                    cfg.image_size,
                    cfg.image_size,
                    dir.display()
                );
                let m = tokio::task::spawn_blocking(move || hcmoco_data::generate(&cfg, &dir)).await??;
                let with_depth: u64 = m.shards.iter().map(|s| s.with_depth).sum();
                eprintln!("  {} samples ({} with depth) in {:.1}s", m.samples, with_depth, t.elapsed().as_secs_f64());
            }
            manifest
        }),
    };
    let cfg = local_config(&opts, generated.as_deref())?;
    std::fs::write(out.join("job.toml"), cfg.to_toml())
        .with_context(|| format!("cannot write {}", out.join("job.toml").display()))?;

    let coordinator = Coordinator::new();
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind the coordinator on loopback")?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::server::run(listener, coordinator.clone(), shutdown.clone()));
    let job_id = coordinator.submit(cfg.clone())?;
    let mut changed = coordinator.subscribe(&job_id)?;
    eprintln!(
        "coordinator on {addr}, job {job_id}: {} steps, {} workers, global batch {}",
        cfg.steps, opts.workers, cfg.global_batch
    );

    let spawn = |index: u32, restart: u32| -> anyhow::Result<WorkerProc> {
        let log = out.join("logs").join(format!("worker-{index}.log"));
        // A restarted worker appends to its log, after a line saying so.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(restart > 0)
            .truncate(restart == 0)
            .open(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        if restart > 0 {
            use std::io::Write;
            let _ = writeln!(file, "--- restarted by the launcher (restart {restart}) ---");
        }
        let child = Command::new(&worker_bin)
            .arg("run")
            .arg("--coordinator")
            .arg(format!("http://{addr}"))
            .arg("--job")
            .arg(&job_id.0)
            .args(&opts.worker_args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", worker_bin.display()))?;
        Ok(WorkerProc { index, child, log, restarts: restart })
    };
    let mut procs = Vec::new();
    for index in 0..opts.workers {
        procs.push(spawn(index, 0)?);
    }

    let result = supervise(&coordinator, &job_id, &mut procs, &mut changed, &interrupt, cfg.steps, &spawn).await;
    // Whatever happened, no worker outlives the launcher.
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in &mut procs {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline && result.is_ok() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
            }
        }
    }
    shutdown.cancel();
    let _ = server.await;
    let (status, first_loss) = result?;
    Ok(LaunchOutcome { job_id: job_id.0, status, first_loss })
}

async fn supervise(
    coordinator: &Coordinator,
    job_id: &JobId,
    procs: &mut [WorkerProc],
    changed: &mut tokio::sync::watch::Receiver<u64>,
    interrupt: &CancellationToken,
    steps: u64,
    respawn: &dyn Fn(u32, u32) -> anyhow::Result<WorkerProc>,
) -> anyhow::Result<(pb::JobStatus, Option<(u64, f64)>)> {
    let tty = std::io::stderr().is_terminal();
    let bar = if tty { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut first_loss = None;
    let mut last_printed = u64::MAX;
    loop {
        let s = coordinator.status(job_id)?;
        if first_loss.is_none() {
            first_loss = s.latest.as_ref().map(|m| (m.step, m.loss_total));
        }
        bar.set_position(s.committed_steps);
        bar.set_message(progress_message(&s));
        if !tty && s.committed_steps != last_printed && (s.committed_steps % 10 == 0 || s.committed_steps == steps) {
            last_printed = s.committed_steps;
            eprintln!("step {}/{}  {}", s.committed_steps, steps, progress_message(&s));
        }
        match pb::JobState::try_from(s.state) {
            Ok(pb::JobState::Completed) => {
                bar.finish_and_clear();
                return Ok((s, first_loss));
            }
            Ok(pb::JobState::Failed | pb::JobState::Cancelled) => {
                bar.finish_and_clear();
                let logs: Vec<String> =
                    procs.iter().map(|p| format!("--- {} ---\n{}", p.log.display(), tail(&p.log, 8))).collect();
                bail!("job {job_id} {}: {}\n{}", wire_state_name(s.state), s.message, logs.join("\n"));
            }
            _ => {}
        }
        // A worker that dies does not end the job: the others form a new generation without it, and
        // the launcher starts a replacement that joins it (as a restarted pod would), a few times.
        for p in procs.iter_mut() {
            if let Some(code) = p.child.try_wait()?
                && !code.success()
            {
                let what = format!("worker process {} (pid {}) exited with {code}", p.index, p.child.id());
                if p.restarts >= MAX_RESTARTS {
                    let reason = format!("{what}, after {MAX_RESTARTS} restarts");
                    let _ = coordinator.cancel(job_id, &reason);
                    bar.finish_and_clear();
                    bail!("{reason}; last lines of {}:\n{}", p.log.display(), tail(&p.log, 15));
                }
                bar.suspend(|| {
                    eprintln!(
                        "{what}; starting a replacement (last lines of {}):\n{}",
                        p.log.display(),
                        tail(&p.log, 4)
                    )
                });
                *p = respawn(p.index, p.restarts + 1)?;
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = interrupt.cancelled() => {
                let _ = coordinator.cancel(job_id, "interrupted (Ctrl-C) at the launcher");
                bar.finish_and_clear();
                bail!("interrupted: job {job_id} cancelled");
            }
        }
    }
}

/// How many times the launcher replaces one worker process that died.
const MAX_RESTARTS: u32 = 3;

/// Samples in the first `steps` steps of a plan with global batch `g` over `n` samples per epoch (the
/// last step of an epoch may be smaller).
pub fn samples_trained(steps: u64, g: u64, n: u64) -> u64 {
    if g == 0 || n == 0 {
        return 0;
    }
    let per_epoch = n.div_ceil(g);
    (steps / per_epoch) * n + ((steps % per_epoch) * g).min(n)
}

/// The final summary printed by `hcmoco launch`.
pub fn summary(outcome: &LaunchOutcome, elapsed: Duration) -> String {
    let s = &outcome.status;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let samples = samples_trained(s.committed_steps, s.global_batch, s.dataset_samples);
    let mut out = format!(
        "run complete: job {} trained {} steps ({samples} samples) in {secs:.1}s, {:.1} samples/s overall\n",
        s.job_id,
        s.committed_steps,
        samples as f64 / secs
    );
    if let (Some((first_step, first)), Some(last)) = (outcome.first_loss, s.latest.as_ref()) {
        out.push_str(&format!(
            "loss {first:.4} (step {}) -> {:.4} (step {})\n",
            first_step + 1,
            last.loss_total,
            last.step + 1
        ));
    }
    out.push_str(&status::render(s));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_trained_counts_short_last_steps() {
        // 10 samples, batch 4: steps of 4, 4, 2 per epoch.
        assert_eq!(samples_trained(2, 4, 10), 8);
        assert_eq!(samples_trained(3, 4, 10), 10);
        assert_eq!(samples_trained(4, 4, 10), 14);
        assert_eq!(samples_trained(0, 4, 10), 0);
    }

    fn opts(job_file: Option<PathBuf>, data: Option<PathBuf>) -> LaunchOptions {
        LaunchOptions {
            workers: 3,
            steps: Some(7),
            out: PathBuf::from("/runs/x"),
            data,
            job_file,
            worker_bin: None,
            synth_samples: 8,
            synth_image_size: 16,
            worker_args: Vec::new(),
            stage: None,
            init_checkpoint: None,
        }
    }

    #[test]
    fn data_flag_overrides_the_job_file_and_flags_override_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = dir.path().join("job.toml");
        std::fs::write(&job, "steps = 100\n[[data.datasets]]\nmanifest = \"from-file/manifest.json\"\n")
            .expect("write");
        let cfg = local_config(&opts(Some(job.clone()), None), None).expect("job file alone");
        assert!(cfg.data.datasets[0].manifest.ends_with("from-file/manifest.json"));
        assert_eq!((cfg.steps, cfg.workers.min, cfg.workers.max), (7, 3, 3));
        // A job file without checkpoint.dir checkpoints under --out; one that names it keeps it.
        assert_eq!(cfg.checkpoint.dir, "/runs/x/checkpoints");
        let named = dir.path().join("named.toml");
        std::fs::write(&named, "[checkpoint]\ndir = \"ck\"\n[[data.datasets]]\nmanifest = \"m.json\"\n")
            .expect("write");
        let cfg = local_config(&opts(Some(named), None), None).expect("named dir");
        assert_eq!(cfg.checkpoint.dir, dir.path().join("ck").display().to_string());
        let cfg = local_config(&opts(Some(job), Some(PathBuf::from("/d/manifest.json"))), None).expect("with --data");
        assert_eq!(cfg.data.datasets.len(), 1);
        assert_eq!(cfg.data.datasets[0].manifest, "/d/manifest.json");
        let cfg = local_config(&opts(None, None), Some(Path::new("/gen/manifest.json"))).expect("default job");
        assert_eq!(cfg.data.datasets[0].manifest, "/gen/manifest.json");
        assert_eq!(cfg.checkpoint.dir, "/runs/x/checkpoints");
        // A job file without datasets trains on the generated set; without one either, the error names the key.
        let bare = dir.path().join("bare.toml");
        std::fs::write(&bare, "steps = 100\n[model]\nembed_dim = 8\n").expect("write");
        let cfg = local_config(&opts(Some(bare.clone()), None), Some(Path::new("/gen/manifest.json"))).expect("bare");
        assert_eq!((cfg.data.datasets[0].manifest.as_str(), cfg.model.embed_dim), ("/gen/manifest.json", 8));
        let err = local_config(&opts(Some(bare), None), None).expect_err("no data at all");
        assert!(format!("{err:#}").contains("data.datasets"), "{err:#}");
        // Stage 2 from a stage-1 run: the flags set loss.stage and model.init_checkpoint (made absolute).
        let two = LaunchOptions {
            stage: Some(2),
            init_checkpoint: Some(PathBuf::from("/runs/s1/checkpoints")),
            ..opts(None, None)
        };
        let cfg = local_config(&two, Some(Path::new("/gen/manifest.json"))).expect("stage 2");
        assert_eq!((cfg.loss.stage, cfg.model.init_checkpoint.as_str()), (2, "/runs/s1/checkpoints"));
        let err = local_config(&LaunchOptions { stage: Some(3), ..opts(None, None) }, Some(Path::new("/g/m.json")))
            .expect_err("stage 3");
        assert!(format!("{err:#}").contains("loss.stage"), "{err:#}");
        let err = local_config(&LaunchOptions { steps: Some(0), ..opts(None, None) }, None).expect_err("--steps 0");
        assert!(err.to_string().contains("--steps"), "{err}");
    }
}
