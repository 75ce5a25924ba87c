//! `hcmoco`: the coordinator and the user's command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hcmoco_coordinator::client::{self, DEFAULT_ADDR};
use hcmoco_coordinator::launch::{self, LaunchOptions};
use hcmoco_coordinator::{Coordinator, server, status};
use hcmoco_proto::pb;
use hcmoco_proto::pb::job_service_client::JobServiceClient;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hcmoco",
    version,
    about = "Distributed multi-modal contrastive pre-training (HCMoCo): coordinator and CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a coordinator.
    Serve {
        /// Address to listen on. Loopback by default: pass an explicit address to serve a cluster.
        #[arg(long, env = "HCMOCO_LISTEN", default_value = DEFAULT_ADDR)]
        listen: String,
        /// etcd endpoints (comma-separated): keep the state there and elect one leader among the
        /// coordinators started with the same endpoints and prefix; the others stand by.
        #[arg(long, env = "HCMOCO_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix of this coordinator group in etcd.
        #[arg(long, env = "HCMOCO_ETCD_PREFIX", default_value = "/hcmoco")]
        etcd_prefix: String,
        /// The address workers and clients reach this coordinator at (a standby names the leader's);
        /// default: --listen.
        #[arg(long, env = "HCMOCO_ADVERTISE")]
        advertise: Option<String>,
        /// The leader's lease in seconds: a standby takes over this long after the leader dies.
        #[arg(long, default_value_t = 3)]
        election_ttl_secs: i64,
        /// Keep trying to reach etcd at start for this long, then exit non-zero naming the endpoints.
        #[arg(long, default_value_t = 20.0)]
        etcd_connect_timeout_secs: f64,
    },
    /// Submit a job file (TOML) and print the job id.
    Submit {
        job_file: PathBuf,
        /// Start from this checkpoint (a `step-N` directory, or a directory with `latest`): its
        /// step, model, momentum, buffers and memory banks.
        #[arg(long)]
        resume: Option<PathBuf>,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Show jobs, or one job in detail.
    Status {
        #[arg(long)]
        job: Option<String>,
        /// Keep printing the job's status on every change until it ends.
        #[arg(long, requires = "job")]
        watch: bool,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Cancel a job.
    Cancel {
        job: String,
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Ask rank 0 to write a checkpoint at the next step boundary; with --wait, print it once the
    /// step it follows is committed.
    Checkpoint {
        #[arg(long)]
        job: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Set a running job's number of workers (within workers.min..=workers.max): growing admits
    /// standbys, shrinking releases the highest ranks at the next step boundary.
    Scale {
        #[arg(long)]
        job: String,
        #[arg(long)]
        workers: u32,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Print which rank of which generation trained every slot of an epoch's committed steps, one
    /// JSON object per line: epoch, slot, dataset, index, step, generation, rank, skipped.
    Ledger {
        #[arg(long)]
        job: String,
        #[arg(long)]
        epoch: u64,
        #[arg(long, env = "HCMOCO_COORDINATOR", default_value = DEFAULT_ADDR)]
        coordinator: String,
    },
    /// Measure the coordinator with simulated workers over gRPC on loopback (docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Run a whole job on this machine: in-process coordinator plus N worker processes.
    Launch {
        /// Required: the only mode so far (cluster runs use `serve` and Kubernetes).
        #[arg(long, required = true)]
        local: bool,
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Steps to train (default: the job file's `steps`).
        #[arg(long)]
        steps: Option<u64>,
        /// Output directory: data (if generated), logs, checkpoints, the resolved job file.
        #[arg(long)]
        out: PathBuf,
        /// A dataset manifest to train on instead of generated synthetic humans.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Start from this job file instead of the embedded default.
        #[arg(long)]
        job_file: Option<PathBuf>,
        #[arg(long, env = "HCMOCO_WORKER_BIN")]
        worker_bin: Option<PathBuf>,
        /// Samples of the generated synthetic dataset.
        #[arg(long, default_value_t = 256)]
        synth_samples: u64,
        #[arg(long, default_value_t = 64)]
        synth_image_size: u32,
        /// Loss stage: 1 (the six sample-level terms) or 2 (all terms; start it from a stage-1 run
        /// with --init-checkpoint).
        #[arg(long)]
        stage: Option<u32>,
        /// A stage-1 checkpoint (a `step-N` directory, or a checkpoint directory with `latest`) to
        /// start from: its weights (not the dense heads) and memory banks.
        #[arg(long)]
        init_checkpoint: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// N workers join, then rendezvous at once: seconds until the last has its assignment.
    Rendezvous {
        #[arg(long)]
        workers: u32,
        /// HTTP/2 connections the simulated workers share.
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// N workers in generation 1; one reports a failure and all rendezvous again: seconds until the
    /// last has its generation-2 assignment.
    Reform {
        #[arg(long)]
        workers: u32,
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// The durable write a commit makes under `serve --etcd`: latency of K writes of a job record
    /// with N workers.
    EtcdWrites {
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        #[arg(long, default_value_t = 8)]
        workers: u32,
        #[arg(long, default_value_t = 200)]
        writes: usize,
    },
    /// N joined workers heartbeat back to back: heartbeats answered per second, CPU used.
    Heartbeats {
        #[arg(long)]
        workers: u32,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
}

/// `serve --etcd`: serve as a standby at once (answering `Unavailable` with the leader's address),
/// campaign, and lead once elected; exit non-zero if deposed, so a supervisor restarts it as a
/// standby.
async fn serve_with_etcd(
    listener: tokio::net::TcpListener,
    endpoints: Vec<String>,
    prefix: String,
    advertise: String,
    ttl: i64,
    patience: std::time::Duration,
) -> anyhow::Result<()> {
    let client = hcmoco_coordinator::store::connect(&endpoints, patience).await?;
    let coordinator = Coordinator::standby();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let mut server = tokio::spawn(server::run(listener, coordinator.clone(), shutdown.clone()));
    let deposed = coordinator.deposed.clone();
    let standby = coordinator.clone();
    let elected = tokio::select! {
        r = hcmoco_coordinator::store::campaign(client, &prefix, &advertise, ttl, deposed.clone(), |leader| standby.set_standby(leader)) => r?,
        _ = shutdown.cancelled() => return Ok(()),
        r = &mut server => return r?,
    };
    let loaded = elected.load().await?;
    eprintln!("elected leader at {advertise} (etcd prefix {prefix}); carrying on {} stored jobs", loaded.jobs.len());
    coordinator.lead(std::sync::Arc::new(elected), loaded)?;
    coordinator.persist().await.map_err(|s| anyhow::anyhow!("first write as leader: {}", s.message()))?;
    tokio::select! {
        _ = deposed.cancelled() => {
            shutdown.cancel();
            let _ = server.await;
            anyhow::bail!("deposed: another coordinator leads now (lease lost or a write refused)")
        }
        r = &mut server => r?,
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HCMOCO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() {
    init_tracing();
    if let Err(e) = real_main(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { listen, etcd, etcd_prefix, advertise, election_ttl_secs, etcd_connect_timeout_secs } => {
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let local = listener.local_addr()?;
            eprintln!("hcmoco coordinator listening on {local}");
            if !etcd.is_empty() {
                anyhow::ensure!(election_ttl_secs >= 1, "--election-ttl-secs must be at least 1");
                let advertise = advertise.unwrap_or_else(|| local.to_string());
                let patience = std::time::Duration::try_from_secs_f64(etcd_connect_timeout_secs).map_err(|_| {
                    anyhow::anyhow!("--etcd-connect-timeout-secs {etcd_connect_timeout_secs}: expected seconds >= 0")
                })?;
                return serve_with_etcd(listener, etcd, etcd_prefix, advertise, election_ttl_secs, patience).await;
            }
            let shutdown = CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("shutting down (Ctrl-C again to exit at once)");
                on_signal.cancel();
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(130);
            });
            server::run(listener, Coordinator::new(), shutdown).await
        }
        Cmd::Submit { job_file, resume, coordinator } => {
            let cfg = client::load_job_file(&job_file)?;
            let resume = match resume {
                None => String::new(),
                Some(dir) => {
                    let dir = std::path::absolute(&dir).unwrap_or(dir);
                    let dir = if dir.join("meta.json").is_file() {
                        dir
                    } else {
                        let latest = std::fs::read_to_string(dir.join("latest")).with_context(|| {
                            format!("--resume {}: neither a checkpoint nor holds a `latest` one", dir.display())
                        })?;
                        dir.join(latest.trim())
                    };
                    dir.display().to_string()
                }
            };
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            let resp = c
                .submit_job(pb::SubmitJobRequest { spec_toml: cfg.to_toml(), resume_checkpoint: resume })
                .await
                .context("submit refused")?;
            println!("{}", resp.into_inner().job_id);
            Ok(())
        }
        Cmd::Status { job, watch, coordinator } => {
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            match job {
                None => {
                    let jobs = c.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs;
                    if jobs.is_empty() {
                        println!("no jobs");
                    }
                    for j in &jobs {
                        println!("{}", status::render_line(j));
                    }
                }
                Some(job_id) if watch => {
                    let mut stream = c.watch_job(pb::WatchJobRequest { job_id }).await?.into_inner();
                    while let Some(s) = stream.message().await? {
                        println!("{}", status::render(&s));
                    }
                }
                Some(job_id) => {
                    let s = c.get_job(pb::GetJobRequest { job_id }).await?.into_inner();
                    print!("{}", status::render(&s));
                }
            }
            Ok(())
        }
        Cmd::Cancel { job, reason, coordinator } => {
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            let r = c.cancel_job(pb::CancelJobRequest { job_id: job.clone(), reason }).await?.into_inner();
            println!("{job}: {}", hcmoco_coordinator::job::wire_state_name(r.state));
            Ok(())
        }
        Cmd::Bench { what } => match what {
            BenchCmd::Rendezvous { workers, connections } => {
                let (secs, bytes) = hcmoco_coordinator::bench::rendezvous(workers, connections).await?;
                println!(
                    "rendezvous workers={workers} connections={connections} secs={secs:.3} largest_assignment_bytes={bytes}"
                );
                Ok(())
            }
            BenchCmd::Reform { workers, connections } => {
                let secs = hcmoco_coordinator::bench::reform(workers, connections).await?;
                println!("reform workers={workers} connections={connections} secs={secs:.3}");
                Ok(())
            }
            BenchCmd::EtcdWrites { etcd, workers, writes } => {
                let (t, size) = hcmoco_coordinator::bench::etcd_writes(&etcd, workers, writes).await?;
                let q = |p: f64| t[((t.len() - 1) as f64 * p) as usize];
                println!(
                    "etcd_writes workers={workers} record_bytes={size} writes={writes} median_ms={:.2} p90_ms={:.2} min_ms={:.2} max_ms={:.2}",
                    q(0.5),
                    q(0.9),
                    q(0.0),
                    q(1.0)
                );
                Ok(())
            }
            BenchCmd::Heartbeats { workers, connections, secs } => {
                let (per_sec, cpu) = hcmoco_coordinator::bench::heartbeats(workers, connections, secs).await?;
                println!(
                    "heartbeats workers={workers} connections={connections} per_sec={per_sec:.0} cpu_cores={cpu:.2}"
                );
                Ok(())
            }
        },
        Cmd::Checkpoint { job, wait, coordinator } => {
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            let steps = c
                .checkpoint_job(pb::CheckpointJobRequest { job_id: job.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("checkpoint refused: {}", s.message()))?
                .into_inner()
                .steps;
            let name = format!("step-{steps:08}");
            if !wait {
                println!("{job}: rank 0 writes {name} after step {}", steps.saturating_sub(1));
                return Ok(());
            }
            loop {
                let s = c.get_job(pb::GetJobRequest { job_id: job.clone() }).await?.into_inner();
                if s.latest_checkpoint.ends_with(&name) {
                    println!("{}", s.latest_checkpoint);
                    return Ok(());
                }
                if matches!(
                    pb::JobState::try_from(s.state),
                    Ok(pb::JobState::Failed | pb::JobState::Cancelled | pb::JobState::Completed)
                ) {
                    anyhow::bail!(
                        "job {job} ended ({}) before {name} was committed",
                        hcmoco_coordinator::job::wire_state_name(s.state)
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Cmd::Scale { job, workers, coordinator } => {
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            let r = c
                .scale_job(pb::ScaleJobRequest { job_id: job.clone(), workers })
                .await
                .map_err(|s| anyhow::anyhow!("scale refused: {}", s.message()))?
                .into_inner();
            println!("{job}: target {} workers (generation {})", r.workers, r.generation);
            Ok(())
        }
        Cmd::Ledger { job, epoch, coordinator } => {
            let mut c = JobServiceClient::new(client::connect(&coordinator).await?);
            let mut stream = c
                .get_ledger(pb::GetLedgerRequest { job_id: job.clone(), epoch })
                .await
                .map_err(|s| anyhow::anyhow!("ledger refused: {}", s.message()))?
                .into_inner();
            let mut lines = 0u64;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            while let Some(chunk) = stream.message().await? {
                for e in chunk.entries {
                    use std::io::Write;
                    writeln!(out, "{}", status::ledger_line(&e))?;
                    lines += 1;
                }
            }
            if lines == 0 {
                eprintln!("job {job}: epoch {epoch} has no committed step");
            }
            Ok(())
        }
        Cmd::Launch {
            local: _,
            workers,
            steps,
            out,
            data,
            job_file,
            worker_bin,
            synth_samples,
            synth_image_size,
            stage,
            init_checkpoint,
        } => {
            let interrupt = CancellationToken::new();
            let on_signal = interrupt.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_signal.cancel();
            });
            let started = Instant::now();
            let opts = LaunchOptions {
                workers,
                steps,
                out,
                data,
                job_file,
                worker_bin,
                synth_samples,
                synth_image_size,
                worker_args: Vec::new(),
                stage,
                init_checkpoint,
            };
            let outcome = launch::launch_local(opts, interrupt).await?;
            print!("{}", launch::summary(&outcome, started.elapsed()));
            Ok(())
        }
    }
}
