//! `hcmoco-worker bench`: collective benchmarks with one OS process per rank, like the peers they are
//! compared with (torch.distributed spawns a process per rank too).
//!
//! The parent spawns `world` copies of this binary in the hidden `bench rank` mode. Each binds a
//! collective listener on loopback and prints its address; the parent hands every rank the full
//! address list (a local stand-in for the coordinator's rendezvous), and the ranks form the ring. Rank 0
//! prints one result line per size; the parent relays it. If any rank fails, the parent stops the others
//! and exits non-zero; each rank's pid is printed to stderr (`rank R pid P`), which the fault tests use.
//!
//! Reported figures follow nccl-tests: `algbw = bytes / time`, `busbw = algbw * 2(n-1)/n` for
//! all-reduce, the time being the slowest rank's mean over the timed iterations.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tch::{Device, Kind, Tensor};

use crate::comm::{Communicator, CpuOptions, PeerInfo, connect_cpu_with};

/// What one benchmark run measures.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// `allreduce` or `grads` (a model's gradients, fused into buckets or reduced per tensor).
    pub op: String,
    pub world: usize,
    pub backend: String,
    pub sizes: Vec<usize>,
    pub iters: usize,
    pub warmup: usize,
    pub dtype: String,
    pub timeout: Duration,
    /// For `grads`: bucket size in MiB (0 = one all-reduce per tensor).
    pub bucket_mb: f64,
    /// `auto`, `tcp` or `shm` (all ranks of a benchmark share this host).
    pub transport: String,
}

impl BenchSpec {
    fn to_args(&self) -> Vec<String> {
        let sizes: Vec<String> = self.sizes.iter().map(|s| s.to_string()).collect();
        vec![
            "--op".into(),
            self.op.clone(),
            "--world".into(),
            self.world.to_string(),
            "--backend".into(),
            self.backend.clone(),
            "--sizes".into(),
            sizes.join(","),
            "--iters".into(),
            self.iters.to_string(),
            "--warmup".into(),
            self.warmup.to_string(),
            "--dtype".into(),
            self.dtype.clone(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string(),
            "--bucket-mb".into(),
            self.bucket_mb.to_string(),
            "--transport".into(),
            self.transport.clone(),
        ]
    }
}

/// Parses `16777216,67108864` (byte counts; `K`, `M` suffixes allowed: `16M`).
pub fn parse_sizes(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            let (num, mult) = match s.chars().last() {
                Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
                Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
                Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
                _ => (s, 1),
            };
            num.parse::<usize>().map(|n| n * mult).with_context(|| format!("--sizes: {s:?} is not a byte count"))
        })
        .collect()
}

fn kind_of(dtype: &str) -> anyhow::Result<(Kind, usize)> {
    Ok(match dtype {
        "f32" => (Kind::Float, 4),
        "f64" => (Kind::Double, 8),
        "bf16" => (Kind::BFloat16, 2),
        other => bail!("--dtype {other:?}: expected f32, f64 or bf16"),
    })
}

/// Runs a benchmark: spawns the ranks, relays rank 0's result lines to stdout.
pub fn run_parent(spec: &BenchSpec) -> anyhow::Result<()> {
    if spec.world == 0 {
        bail!("--world must be at least 1");
    }
    kind_of(&spec.dtype)?;
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let mut children: Vec<Child> = Vec::new();
    let mut outs = Vec::new();
    for rank in 0..spec.world {
        let mut child = Command::new(&exe)
            .args(["bench", "rank", "--rank", &rank.to_string()])
            .args(spec.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        eprintln!("rank {rank} pid {}", child.id());
        outs.push(BufReader::new(child.stdout.take().context("rank stdout")?));
        children.push(child);
    }
    let result = (|| -> anyhow::Result<()> {
        let mut addrs = Vec::new();
        for (rank, out) in outs.iter_mut().enumerate() {
            let mut line = String::new();
            out.read_line(&mut line).with_context(|| format!("rank {rank} did not report its address"))?;
            let addr = line.trim().strip_prefix("listening ").with_context(|| format!("rank {rank} said {line:?}"))?;
            addrs.push(addr.to_string());
        }
        let peers = format!("{}\n", addrs.join(","));
        for (rank, child) in children.iter_mut().enumerate() {
            let stdin = child.stdin.as_mut().context("rank stdin")?;
            stdin.write_all(peers.as_bytes()).with_context(|| format!("cannot reach rank {rank}"))?;
        }
        for line in (&mut outs[0]).lines() {
            println!("{}", line?);
        }
        Ok(())
    })();
    let mut failed = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("rank {rank} exited with {status}"));
        }
    }
    if !failed.is_empty() {
        for c in &mut children {
            let _ = c.kill();
        }
        bail!("benchmark failed: {}", failed.join("; "));
    }
    result
}

/// One rank of a benchmark (the hidden `bench rank` mode).
pub fn run_rank(spec: &BenchSpec, rank: usize) -> anyhow::Result<()> {
    // A rank never outlives its parent (a killed or crashed benchmark leaves no orphans spinning).
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).context("prctl")?;
    tch::set_num_threads(1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind")?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("read the peer list")?;
    let peers: Vec<String> = line.trim().split(',').map(str::to_string).collect();
    if peers.len() != spec.world {
        bail!("rank {rank}: got {} peers for world {}", peers.len(), spec.world);
    }
    let mut comm: Box<dyn Communicator> = match spec.backend.as_str() {
        "cpu" => {
            let peers: Vec<PeerInfo> =
                peers.iter().map(|a| PeerInfo { addr: a.clone(), host_id: "localhost".into() }).collect();
            let opts =
                CpuOptions { transport: spec.transport.parse()?, timeout: spec.timeout, ..CpuOptions::default() };
            Box::new(connect_cpu_with(listener, rank, &peers, 1, &opts)?)
        }
        other => bail!("--backend {other:?}: this build benchmarks \"cpu\" (nccl: see hcmoco-worker nccl-check)"),
    };
    // One write per line: the ranks share the parent's stderr.
    std::io::stderr().write_all(format!("rank {rank}: ring formed\n").as_bytes())?;
    let (kind, elem) = kind_of(&spec.dtype)?;
    match spec.op.as_str() {
        "allreduce" => bench_allreduce(comm.as_mut(), spec, kind, elem),
        "grads" => bench_grads(comm.as_mut(), spec, kind),
        other => bail!("unknown benchmark {other:?}"),
    }
    .with_context(|| format!("rank {rank}"))
}

/// Mean seconds per iteration of `f`, the slowest rank's, after `warmup` untimed iterations.
fn timed(
    comm: &mut dyn Communicator,
    spec: &BenchSpec,
    mut f: impl FnMut(&mut dyn Communicator) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..spec.warmup {
        f(comm)?;
    }
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..spec.iters.max(1) {
        f(comm)?;
    }
    let mine = t.elapsed().as_secs_f64() / spec.iters.max(1) as f64;
    let all = comm.all_gather_cat(&Tensor::from_slice(&[mine]))?;
    Ok(all.max().double_value(&[]))
}

fn bench_allreduce(comm: &mut dyn Communicator, spec: &BenchSpec, kind: Kind, elem: usize) -> anyhow::Result<()> {
    let n = comm.world_size() as f64;
    for &bytes in &spec.sizes {
        let numel = (bytes / elem).max(1) as i64;
        let mut t = Tensor::ones([numel], (kind, Device::Cpu));
        let secs = timed(comm, spec, |c| Ok(c.all_reduce_sum(&mut t)?))?;
        if comm.rank() == 0 {
            let algbw = (numel as usize * elem) as f64 / secs / 1e9;
            let busbw = algbw * 2.0 * (n - 1.0) / n;
            println!(
                "bytes={} time_ms={:.4} algbw_GBps={algbw:.3} busbw_GBps={busbw:.3}",
                numel as usize * elem,
                secs * 1e3
            );
        }
    }
    Ok(())
}

/// Reduces a model's worth of gradients (the demo job's encoders: `hrnet_small`), fused into buckets
/// of `bucket_mb` MiB, or one all-reduce per tensor when `bucket_mb` is 0.
fn bench_grads(comm: &mut dyn Communicator, spec: &BenchSpec, kind: Kind) -> anyhow::Result<()> {
    let cfg = hcmoco_proto::config::ModelConfig { backbone: "hrnet_small".into(), ..Default::default() };
    let model = crate::model::Model::new(&cfg, hcmoco_data::KeypointLayout::Mpii16, 0, Device::Cpu)?;
    let grads: Vec<Option<Tensor>> =
        model.parameters().iter().map(|(_, p)| Some(p.detach().to_kind(kind).ones_like())).collect();
    let shapes: Vec<Vec<i64>> = grads.iter().flatten().map(Tensor::size).collect();
    let bytes: usize = grads.iter().flatten().map(|g| g.numel() * g.kind().elt_size_in_bytes()).sum();
    let plan = crate::buckets::BucketPlan::new(&shapes, kind, Device::Cpu, (spec.bucket_mb * 1048576.0) as usize);
    let secs = timed(comm, spec, |c| {
        if spec.bucket_mb <= 0.0 {
            for g in grads.iter().flatten() {
                let mut g = g.shallow_clone();
                c.all_reduce_sum(&mut g)?;
            }
        } else {
            let _summed = plan.all_reduce_flat(c, &grads)?;
        }
        Ok(())
    })?;
    if comm.rank() == 0 {
        println!(
            "tensors={} bytes={bytes} buckets={} time_ms={:.4} algbw_GBps={:.3}",
            grads.len(),
            if spec.bucket_mb <= 0.0 { grads.len() } else { plan.len() },
            secs * 1e3,
            bytes as f64 / secs / 1e9
        );
    }
    Ok(())
}

/// `bench loader`: decode + augment `samples` samples of a dataset with the loader pool (`threads`),
/// submitted in steps of `batch`, the way training consumes them. Prints `samples=... secs=...
/// samples_per_s=...`.
pub fn run_loader(
    manifest: &std::path::Path,
    threads: usize,
    samples: u64,
    batch: u64,
    image_size: u32,
) -> anyhow::Result<()> {
    use crate::loader::{Loader, Request};
    let dataset = hcmoco_data::Dataset::open(manifest)?;
    let n = dataset.len();
    let augment =
        (image_size > 0).then(|| hcmoco_data::augment::AugmentConfig { size: image_size, ..Default::default() });
    let mut loader = Loader::new(std::sync::Arc::new(vec![dataset]), augment, 0, threads);
    let steps = samples.div_ceil(batch.max(1));
    let requests = |step: u64| -> Vec<Request> {
        (0..batch)
            .map(|p| {
                let slot = step * batch + p;
                Request { step, position: p as usize, dataset: 0, index: slot % n, epoch: slot / n, slot, ticket: 0 }
            })
            .collect()
    };
    let started = Instant::now();
    loader.submit(0, requests(0))?;
    let mut loaded = 0u64;
    for step in 0..steps {
        if step + 1 < steps {
            loader.submit(step + 1, requests(step + 1))?;
        }
        for s in loader.take(step)? {
            s?;
            loaded += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("samples={loaded} secs={secs:.3} samples_per_s={:.1}", loaded as f64 / secs);
    Ok(())
}
