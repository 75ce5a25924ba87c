//! `hcmoco bench rendezvous` and `hcmoco bench heartbeats`: the coordinator under many simulated
//! workers, over real gRPC on loopback (a served coordinator, tonic clients multiplexed over a few
//! HTTP/2 connections, as workers on many hosts would be over many).
//!
//! - rendezvous: N workers join, then all long-poll `Rendezvous` at once; the time from the first
//!   rendezvous call to the last assignment received (generation 1 sealed at N = target).
//! - heartbeats: N joined workers heartbeat as fast as the coordinator answers for a fixed time;
//!   heartbeats answered per second, and the coordinator process's CPU time over that window.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hcmoco_proto::JobConfig;
use hcmoco_proto::pb;
use hcmoco_proto::pb::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;

use crate::state::Coordinator;

/// A coordinator served on loopback with one job for `workers` workers, and `connections` client
/// channels to it.
struct Bench {
    coordinator: Coordinator,
    clients: Vec<WorkerServiceClient<tonic::transport::Channel>>,
    job: String,
    shutdown: CancellationToken,
    _data: tempfile::TempDir,
}

async fn setup(workers: u32, connections: usize, heartbeat_timeout_ms: u64) -> anyhow::Result<Bench> {
    let data = tempfile::tempdir()?;
    // The global batch must give every simulated worker a sample (`global_batch >= workers.max`).
    let samples = u64::from(workers).max(8);
    let cfg = hcmoco_data::SynthConfig { samples, image_size: 16, ..Default::default() };
    hcmoco_data::generate(&cfg, data.path())?;
    let manifest = data.path().join("manifest.json");
    let mut job =
        JobConfig::from_toml(&format!("[[data.datasets]]\nmanifest = {:?}\n", manifest.display().to_string()))?;
    job.workers.min = workers;
    job.workers.max = workers;
    job.global_batch = samples;
    job.heartbeat.timeout_ms = heartbeat_timeout_ms;
    job.rendezvous.settle_ms = 60_000;
    let coordinator = Coordinator::new();
    let id = coordinator.submit(job)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::server::run(listener, coordinator.clone(), shutdown.clone()));
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = crate::client::connect(&addr.to_string()).await?;
        clients.push(WorkerServiceClient::new(channel));
    }
    Ok(Bench { coordinator, clients, job: id.0, shutdown, _data: data })
}

async fn join_all(b: &Bench, workers: u32) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(workers as usize);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..workers {
        let mut c = b.clients[i as usize % b.clients.len()].clone();
        let job = b.job.clone();
        tasks.spawn(async move {
            let req = pb::JoinRequest {
                job_id: job,
                host_id: format!("host-{}", i / 8),
                collective_addr: format!("10.{}.{}.{}:7000", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                device: "cpu".into(),
                pid: i,
            };
            c.join(req).await.map(|r| r.into_inner().worker_id)
        });
    }
    while let Some(r) = tasks.join_next().await {
        ids.push(r?.context("join")?);
    }
    Ok(ids)
}

/// Seconds from the first rendezvous call to the last assignment, and the bytes of the largest
/// assignment a worker received.
pub async fn rendezvous(workers: u32, connections: usize) -> anyhow::Result<(f64, usize)> {
    let b = setup(workers, connections, 600_000).await?;
    let ids = join_all(&b, workers).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut c = b.clients[i % b.clients.len()].clone();
        tasks.spawn(async move {
            loop {
                let req = pb::RendezvousRequest { worker_id: id.clone(), ..Default::default() };
                let r = c.rendezvous(req).await?.into_inner();
                if r.ready {
                    return Ok::<usize, tonic::Status>(prost::Message::encoded_len(&r));
                }
            }
        });
    }
    let mut largest = 0;
    while let Some(r) = tasks.join_next().await {
        largest = largest.max(r?.map_err(|s| anyhow::anyhow!("rendezvous: {}", s.message()))?);
    }
    let took = started.elapsed().as_secs_f64();
    let st = b.coordinator.status(&hcmoco_proto::domain::JobId(b.job.clone()))?;
    anyhow::ensure!(st.world_size == workers, "sealed a world of {}, not {workers}", st.world_size);
    b.shutdown.cancel();
    Ok((took, largest))
}

/// Seconds for a break to re-form: after generation 1 is sealed, one member reports a failure and
/// all N rendezvous again; from the report to the last assignment of generation 2.
pub async fn reform(workers: u32, connections: usize) -> anyhow::Result<f64> {
    let b = setup(workers, connections, 600_000).await?;
    let ids = join_all(&b, workers).await?;
    let poll = |ids: Vec<String>, generation: u64| {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in ids.into_iter().enumerate() {
            let mut c = b.clients[i % b.clients.len()].clone();
            tasks.spawn(async move {
                loop {
                    let req = pb::RendezvousRequest {
                        worker_id: id.clone(),
                        generation,
                        has_state: generation > 0,
                        ..Default::default()
                    };
                    if c.rendezvous(req).await?.into_inner().ready {
                        return Ok::<(), tonic::Status>(());
                    }
                }
            });
        }
        tasks
    };
    let mut first = poll(ids.clone(), 0);
    while let Some(r) = first.join_next().await {
        r?.map_err(|s| anyhow::anyhow!("rendezvous: {}", s.message()))?;
    }
    let started = Instant::now();
    let mut c = b.clients[0].clone();
    c.report_failure(pb::ReportFailureRequest {
        worker_id: ids[0].clone(),
        generation: 1,
        message: "bench: a peer failed".into(),
        failed_rank: -1,
        ..Default::default()
    })
    .await?;
    let mut second = poll(ids, 1);
    while let Some(r) = second.join_next().await {
        r?.map_err(|s| anyhow::anyhow!("rendezvous: {}", s.message()))?;
    }
    let took = started.elapsed().as_secs_f64();
    let st = b.coordinator.status(&hcmoco_proto::domain::JobId(b.job.clone()))?;
    anyhow::ensure!(
        st.generation == 2 && st.world_size == workers,
        "generation {} of {}",
        st.generation,
        st.world_size
    );
    b.shutdown.cancel();
    Ok(took)
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (fields 14 and 15 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Heartbeats answered per second by one coordinator for `workers` workers over `secs`, and the
/// CPU seconds per wall second the process (coordinator and clients together) used.
pub async fn heartbeats(workers: u32, connections: usize, secs: f64) -> anyhow::Result<(f64, f64)> {
    let b = setup(workers, connections, 600_000).await?;
    let ids = join_all(&b, workers).await?;
    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut c = b.clients[i % b.clients.len()].clone();
        let (count, stop) = (count.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let req = pb::HeartbeatRequest { worker_id: id.clone(), generation: 0, step: 0 };
                if c.heartbeat(req).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (n, wall, cpu) = (count.load(Ordering::Relaxed), t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    b.shutdown.cancel();
    Ok((n as f64 / wall, cpu / wall))
}

/// Latency of the coordinator's durable write as a commit makes it: one etcd transaction (guarded
/// by the leader key) holding the record of a job with `workers` workers. Returns the sorted
/// latencies in milliseconds and the record's size in bytes.
pub async fn etcd_writes(endpoints: &[String], workers: u32, writes: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    use crate::record::*;
    let client = crate::store::connect(endpoints, crate::store::CONNECT_TIMEOUT).await?;
    let prefix = format!("/hcmoco-bench-{}", std::process::id());
    let deposed = CancellationToken::new();
    let store = crate::store::campaign(client, &prefix, "bench", 10, deposed, |_| {}).await?;
    let mut record = JobRecord {
        id: "job-1".into(),
        config_toml: JobConfig::default().to_toml(),
        dataset_sizes: vec![1_000_000],
        state: "running".into(),
        message: String::new(),
        target: workers,
        committed_steps: 0,
        latest_checkpoint: String::new(),
        committed_checkpoint: None,
        skipped_samples: 0,
        submitted_unix_ms: 0,
        workers: (0..workers)
            .map(|i| WorkerRecord {
                id: format!("w-{i}"),
                host_id: format!("node-{}", i / 8),
                collective_addr: format!("10.0.{}.{}:7000", i / 256, i % 256),
                device: format!("cuda:{}", i % 8),
                reported_steps: 0,
                leaving: false,
            })
            .collect(),
        generation: Some(GenerationState {
            number: 1,
            members: (0..workers).map(|i| format!("w-{i}")).collect(),
            bootstrap: vec![0; 128],
            start_step: 0,
            source_rank: Some(0),
            source_checkpoint: None,
        }),
        ledger_generations: Vec::new(),
        ledger_skipped: Vec::new(),
        events: Vec::new(),
    };
    let mut times = Vec::with_capacity(writes);
    let mut size = 0;
    for step in 0..writes as u64 {
        record.committed_steps = step + 1;
        let bytes = serde_json::to_vec(&record)?;
        size = bytes.len();
        let t = Instant::now();
        store.put(&[("job-1".into(), bytes)], (1, u64::from(workers))).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times, size))
}
