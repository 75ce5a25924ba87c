//! Elastic training with real processes: workers killed, added, terminated and scaled while a job
//! runs. Every run ends with an audit: what the workers really trained (`--trace-slots`, applied
//! minus undone steps) against the coordinator's ledger, and every slot of every epoch exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcmoco_proto::domain::{JobId, LedgerRef, ScaleJob};
use hcmoco_proto::pb;
use hcmoco_tests::*;

const LIMIT: Duration = Duration::from_secs(300);

/// One worker process with its trace file.
struct Traced {
    proc: WorkerProc,
    trace: PathBuf,
}

fn spawn(c: &TestCoordinator, job: &JobId, dir: &Path, name: &str) -> Traced {
    let trace = dir.join(format!("{name}.trace.jsonl"));
    let dump = dir.join("state").display().to_string();
    let proc = WorkerProc::spawn(
        &c.url(),
        job,
        dir.join(format!("{name}.log")),
        &["--trace-slots", &trace.display().to_string(), "--dump-state", &dump],
    );
    Traced { proc, trace }
}

/// (epoch, slot, step, generation, rank) of a trained slot.
type Trained = (u64, u64, u64, u64, u32);

/// What one worker's trace says it trained, applied minus undone, in order.
fn net_trace(path: &Path) -> Vec<Trained> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut applied: Vec<(u64, Vec<Trained>)> = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON trace line");
        let get = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {line}"));
        let (epoch, step, generation, rank) = (get("epoch"), get("step"), get("generation"), get("rank") as u32);
        let slots: Vec<Trained> = v["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .map(|s| (epoch, s.as_u64().expect("slot"), step, generation, rank))
            .collect();
        match v["event"].as_str() {
            Some("apply") => applied.push((step, slots)),
            Some("undo") => {
                let (last, _) = applied.pop().expect("an undo follows an apply");
                assert_eq!(last, step, "{}: the undo names the last applied step", path.display());
            }
            other => panic!("unknown event {other:?}"),
        }
    }
    applied.into_iter().flat_map(|(_, s)| s).collect()
}

/// The audit: the ledger of every epoch touched equals what the workers trained, and every full epoch
/// trains each slot once. A killed worker may also have applied steps the ledger does not hold: one
/// step nobody committed, or, after a rollback to a checkpoint, up to `killed_extra` steps.
fn audit(c: &TestCoordinator, job: &JobId, workers: &[Traced], killed: &[usize], killed_extra: usize) {
    let status = c.status(job);
    let epochs = status.committed_steps.div_ceil(status.dataset_samples.div_ceil(status.global_batch));
    let mut ledger: BTreeSet<Trained> = BTreeSet::new();
    for epoch in 0..epochs {
        let entries = c.coordinator.ledger(&LedgerRef { job_id: job.clone(), epoch }).expect("ledger of a known job");
        let mut slots: Vec<u64> = entries.iter().map(|e| e.slot).collect();
        slots.sort_unstable();
        let full = epoch + 1 < epochs
            || status.committed_steps.is_multiple_of(status.dataset_samples.div_ceil(status.global_batch));
        if full {
            assert_eq!(slots, (0..status.dataset_samples).collect::<Vec<_>>(), "epoch {epoch}: every slot once");
        } else {
            let distinct: BTreeSet<u64> = slots.iter().copied().collect();
            assert_eq!(distinct.len(), slots.len(), "epoch {epoch}: no slot twice");
        }
        ledger.extend(entries.iter().filter(|e| !e.skipped).map(|e| (e.epoch, e.slot, e.step, e.generation, e.rank)));
    }
    let mut traced: BTreeMap<Trained, usize> = BTreeMap::new();
    let mut uncommitted_by_killed: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        for t in net_trace(&w.trace) {
            if !ledger.contains(&t) {
                assert!(
                    killed.contains(&i),
                    "worker {i} trained {t:?}, which the ledger does not hold\n{}",
                    w.proc.log_text()
                );
                uncommitted_by_killed.entry(i).or_default().insert(t.2);
                continue;
            }
            *traced.entry(t).or_default() += 1;
        }
    }
    for (i, steps) in &uncommitted_by_killed {
        assert!(steps.len() <= killed_extra, "killed worker {i} applied {steps:?}, which the ledger does not hold");
    }
    let missing: Vec<&Trained> = ledger.iter().filter(|t| !traced.contains_key(t)).collect();
    assert!(missing.is_empty(), "ledger entries no worker trained: {:?}", &missing[..missing.len().min(10)]);
    let twice: Vec<(&Trained, &usize)> = traced.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "slots trained twice: {twice:?}");
}

/// The final states dumped by the workers that finished are bit-identical.
fn assert_identical(dir: &Path, ranks: &[u32]) {
    let first = read_tensors(&dir.join(format!("state/rank-{}.safetensors", ranks[0]))).expect("dump");
    for r in &ranks[1..] {
        let other = read_tensors(&dir.join(format!("state/rank-{r}.safetensors"))).expect("dump");
        assert_eq!(
            max_diffs(&first, &other).expect("same tensors"),
            (0.0, 0.0),
            "rank {r} differs from rank {}",
            ranks[0]
        );
    }
}

fn elastic_job(manifest: &Path, out: &Path, min: u32, max: u32, steps: u64) -> hcmoco_proto::JobConfig {
    let mut cfg = small_job(manifest, out, max, steps, 6);
    cfg.workers.min = min;
    cfg.workers.max = max;
    cfg.collective.timeout_ms = 10_000;
    cfg.heartbeat.interval_ms = 200;
    cfg.heartbeat.timeout_ms = 3_000;
    cfg.rendezvous.settle_ms = 2_000;
    cfg
}

fn kill(w: &mut Traced) {
    w.proc.child.kill().expect("kill -9");
    let _ = w.proc.child.wait();
}

fn sigterm(w: &Traced) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &w.proc.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(ok.success());
}

fn worker_of_rank(workers: &[Traced], s: &pb::JobStatus, rank: i32) -> usize {
    let id = &s.workers.iter().find(|w| w.rank == rank).expect("rank present").worker_id;
    workers.iter().position(|w| w.proc.log_text().contains(&format!("worker {id} joined"))).expect("the rank's process")
}

/// kill -9 of one of three workers mid-epoch: the job completes with two; the survivors end
/// bit-identical; the ledger equals what the workers trained; every slot of every epoch exactly once.
#[test]
fn a_killed_worker_of_three_is_survived_and_nothing_is_lost_or_repeated() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 24, 32, 5);
    let c = TestCoordinator::start();
    let job = c.submit(elastic_job(&manifest, tmp.path(), 2, 3, 24));
    let mut workers: Vec<Traced> = (0..3).map(|i| spawn(&c, &job, tmp.path(), &format!("w{i}"))).collect();
    let s = c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 6).expect("training");
    let victim = worker_of_rank(&workers, &s, 1);
    kill(&mut workers[victim]);
    let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    assert_eq!((end.committed_steps, end.world_size), (24, 2));
    assert!(end.generation >= 2, "a second generation formed");
    assert!(end.events.iter().any(|e| e.kind == "evicted" || e.kind == "lost"), "{:?}", end.events);
    // Its closed listener proved it dead: the survivors did not wait out the rejoin window.
    assert!(end.events.iter().any(|e| e.kind == "gone"), "{:?}", end.events);
    for (i, w) in workers.iter_mut().enumerate() {
        if i != victim {
            let code = w.proc.wait(Duration::from_secs(60)).expect("exits");
            assert!(code.success(), "survivor {i} failed:\n{}", w.proc.log_text());
        }
    }
    audit(&c, &job, &workers, &[victim], 1);
    assert_identical(tmp.path(), &[0, 1]);
}

/// A worker joins a running job and ends bit-identical with the others; SIGTERM makes a worker leave
/// (exit 0) while the job goes on; `scale` down releases a worker (exit 0), `scale` up admits a standby.
#[test]
fn join_sigterm_and_scale_while_training() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 24, 32, 6);
    let c = TestCoordinator::start();
    let mut cfg = elastic_job(&manifest, tmp.path(), 1, 3, 400);
    cfg.rendezvous.settle_ms = 100;
    let job = c.submit(cfg);
    let mut workers: Vec<Traced> = (0..2).map(|i| spawn(&c, &job, tmp.path(), &format!("w{i}"))).collect();
    c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 3).expect("training");
    // A third worker joins: a new generation of three.
    workers.push(spawn(&c, &job, tmp.path(), "w2"));
    let s = c.wait_until(&job, LIMIT, |_| {}, |s| s.world_size == 3).expect("joined");
    let g3 = s.generation;
    c.wait_until(&job, LIMIT, |_| {}, |t| t.committed_steps >= s.committed_steps + 3).expect("three train");
    // SIGTERM rank 0's process: it leaves at a step boundary and exits 0.
    let s = c.status(&job);
    let leaver = worker_of_rank(&workers, &s, 0);
    sigterm(&workers[leaver]);
    let code = workers[leaver].proc.wait(Duration::from_secs(60)).expect("the leaver exits");
    assert!(code.success(), "a SIGTERM leave exits 0:\n{}", workers[leaver].proc.log_text());
    let s = c.wait_until(&job, LIMIT, |_| {}, |s| s.world_size == 2 && s.generation > g3).expect("two remain");
    assert_eq!(state_of(&s), pb::JobState::Running);
    // Scale down to 1: the highest rank is released and exits 0.
    c.coordinator.scale(ScaleJob { job_id: job.clone(), workers: 1 }).expect("scale down");
    let s = c.wait_until(&job, LIMIT, |_| {}, |s| s.world_size == 1).expect("scaled down");
    let member = |i: usize| {
        s.workers
            .iter()
            .any(|w| w.rank >= 0 && workers[i].proc.log_text().contains(&format!("worker {} joined", w.worker_id)))
    };
    let released: Vec<usize> = (0..workers.len()).filter(|&i| i != leaver && !member(i)).collect();
    assert_eq!(released.len(), 1, "one worker released: {:?}", s.workers);
    let code = workers[released[0]].proc.wait(Duration::from_secs(60)).expect("released exits");
    assert!(code.success(), "a released worker exits 0:\n{}", workers[released[0]].proc.log_text());
    // A standby waits at the target of 1, then scale up to 2 admits it.
    workers.push(spawn(&c, &job, tmp.path(), "w3"));
    c.wait_until(&job, LIMIT, |_| {}, |s| s.workers.len() == 2).expect("standby joined");
    let before = c.status(&job).generation;
    c.coordinator.scale(ScaleJob { job_id: job.clone(), workers: 2 }).expect("scale up");
    c.wait_until(&job, LIMIT, |_| {}, |s| s.world_size == 2 && s.generation > before).expect("scaled up");
    let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    for (i, w) in workers.iter_mut().enumerate() {
        let code = w.proc.wait(Duration::from_secs(60)).expect("exits");
        assert!(code.success(), "worker {i}:\n{}", w.proc.log_text());
    }
    audit(&c, &job, &workers, &[], 0);
    // The standby that joined last finished beside an original worker, bit-identical.
    assert_identical(tmp.path(), &[0, 1]);
    let kinds: BTreeSet<&str> = end.events.iter().map(|e| e.kind.as_str()).collect();
    for k in ["join", "leave", "released", "scale", "generation"] {
        assert!(kinds.contains(k), "{k} missing from {kinds:?}");
    }
}

/// Every worker killed: a newcomer restores the committed checkpoint, the steps after it are rolled
/// back (the ledger truncated there), and the job completes.
#[test]
fn after_every_worker_dies_a_newcomer_restores_the_committed_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 24, 32, 7);
    let c = TestCoordinator::start();
    let mut cfg = elastic_job(&manifest, tmp.path(), 1, 2, 30);
    cfg.checkpoint.every_steps = 4;
    let job = c.submit(cfg);
    let mut workers: Vec<Traced> = (0..2).map(|i| spawn(&c, &job, tmp.path(), &format!("w{i}"))).collect();
    c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 6 && !s.latest_checkpoint.is_empty())
        .expect("a checkpoint committed");
    for w in &mut workers {
        kill(w);
    }
    let before = c.status(&job);
    // The leases run out (3 s); then one newcomer is enough (workers.min = 1).
    workers.push(spawn(&c, &job, tmp.path(), "w2"));
    let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    let log = workers[2].proc.log_text();
    assert!(log.contains("restored") && log.contains("step-0000000"), "the newcomer restores:\n{log}");
    let rollback = end.events.iter().find(|e| e.kind == "rollback");
    if !before.committed_steps.is_multiple_of(4) {
        let r = rollback.unwrap_or_else(|| panic!("a rollback event: {:?}", end.events));
        assert_eq!(r.step % 4, 0, "rolled back to a checkpoint: {r:?}");
    }
    let code = workers[2].proc.wait(Duration::from_secs(60)).expect("exits");
    assert!(code.success(), "{}", workers[2].proc.log_text());
    // Steps after the checkpoint were trained by the killed workers, then rolled back.
    let restored = end.events.iter().find(|e| e.kind == "rollback").map_or(before.committed_steps, |e| e.step);
    audit(&c, &job, &workers, &[0, 1], (before.committed_steps - restored) as usize + 1);
}

/// A coordinator process (`hcmoco serve --etcd`), killed on drop.
struct Serve {
    child: std::process::Child,
    addr: String,
    log: PathBuf,
}

impl Serve {
    fn start(etcd: &Etcd, dir: &Path, name: &str) -> Serve {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = std::process::Command::new(bin("hcmoco"))
            .args(["serve", "--listen", &addr, "--advertise", &addr, "--etcd", &etcd.endpoint])
            .args(["--etcd-prefix", "/itest", "--election-ttl-secs", "2"])
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("hcmoco serve");
        Serve { child, addr, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JobService call to one coordinator: its answer, or its error status.
fn job_call<T>(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    f: impl AsyncFnOnce(
        pb::job_service_client::JobServiceClient<tonic::transport::Channel>,
    ) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, tonic::Status> {
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        f(pb::job_service_client::JobServiceClient::new(channel)).await.map(tonic::Response::into_inner)
    })
}

fn job_status(rt: &tokio::runtime::Runtime, addr: &str, job: &str) -> Result<pb::JobStatus, tonic::Status> {
    job_call(rt, addr, async |mut c| c.get_job(pb::GetJobRequest { job_id: job.into() }).await)
}

/// Two coordinators on one etcd: the standby answers `Unavailable` naming the leader; kill -9 of the
/// leader mid-run: the standby takes over, the workers (`--coordinator A,B`) follow it, nothing
/// committed is lost, and the job completes.
#[test]
fn the_standby_takes_over_when_the_leader_dies_and_nothing_committed_is_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 24, 32, 8);
    let etcd = Etcd::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut a = Serve::start(&etcd, tmp.path(), "coordinator-a");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while job_call(&rt, &a.addr, async |mut c| c.list_jobs(pb::ListJobsRequest {}).await).is_err() {
        assert!(std::time::Instant::now() < deadline, "a never led:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = Serve::start(&etcd, tmp.path(), "coordinator-b");
    // The standby refuses, naming the leader.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match job_call(&rt, &b.addr, async |mut c| c.list_jobs(pb::ListJobsRequest {}).await) {
            Err(s) if s.message().contains("standby") => break s,
            other => {
                assert!(std::time::Instant::now() < deadline, "b: {other:?}\n{}", b.log_text());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains(&a.addr), "names the leader: {}", refused.message());

    let mut cfg = elastic_job(&manifest, tmp.path(), 2, 2, 150);
    cfg.heartbeat.timeout_ms = 10_000;
    let job = job_call(&rt, &a.addr, async |mut c| {
        c.submit_job(pb::SubmitJobRequest { spec_toml: cfg.to_toml(), ..Default::default() }).await
    })
    .expect("submitted")
    .job_id;
    let both = format!("{},{}", a.addr, b.addr);
    let mut workers: Vec<WorkerProc> = (0..2)
        .map(|i| {
            let log = tmp.path().join(format!("w{i}.log"));
            let file = std::fs::File::create(&log).expect("log");
            let child = std::process::Command::new(bin("hcmoco-worker"))
                .args(["run", "--coordinator", &both, "--job", &job, "--host-id", "itest"])
                .env("OMP_NUM_THREADS", "1")
                .stdin(std::process::Stdio::null())
                .stdout(file.try_clone().expect("log"))
                .stderr(file)
                .spawn()
                .expect("worker");
            WorkerProc { child, log }
        })
        .collect();
    let deadline = std::time::Instant::now() + LIMIT;
    let before = loop {
        let s = job_status(&rt, &a.addr, &job).expect("the leader answers");
        if s.committed_steps >= 20 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    a.child.kill().expect("kill -9 the leader");
    let _ = a.child.wait();
    let killed_at = std::time::Instant::now();
    // The standby takes over within the election TTL and carries the job on from what was committed.
    let taken = loop {
        match job_status(&rt, &b.addr, &job) {
            Ok(s) => break s,
            Err(_) => {
                assert!(killed_at.elapsed() < Duration::from_secs(30), "no takeover:\n{}", b.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let takeover_secs = killed_at.elapsed().as_secs_f64();
    assert!(
        taken.committed_steps >= before.committed_steps,
        "committed {} after {}",
        taken.committed_steps,
        before.committed_steps
    );
    let end = loop {
        let s = job_status(&rt, &b.addr, &job).expect("the new leader answers");
        if is_terminal(&s) {
            break s;
        }
        assert!(killed_at.elapsed() < LIMIT, "not done: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}\n{}", end.message, b.log_text());
    assert_eq!(end.committed_steps, 150);
    assert!(end.events.iter().any(|e| e.kind == "takeover"), "{:?}", end.events);
    assert!(end.generation > before.generation, "a new generation after the takeover");
    for w in &mut workers {
        let code = w.wait(Duration::from_secs(60)).expect("exits");
        assert!(code.success(), "{}", w.log_text());
    }
    eprintln!("takeover answered {takeover_secs:.2}s after the kill");
}

/// A checkpoint on demand, then a new job resumed from it: it starts at the checkpoint's step with
/// its state; a job of another architecture is refused, naming a tensor.
#[test]
fn a_checkpoint_on_demand_resumes_a_new_job_and_another_architecture_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 24, 32, 9);
    let c = TestCoordinator::start();
    let cfg = elastic_job(&manifest, tmp.path(), 2, 2, 400);
    let job = c.submit(cfg.clone());
    let workers: Vec<Traced> = (0..2).map(|i| spawn(&c, &job, tmp.path(), &format!("a{i}"))).collect();
    c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 5).expect("training");
    let steps = c.coordinator.request_checkpoint(&job).expect("checkpoint");
    let name = format!("step-{steps:08}");
    let s = c.wait_until(&job, LIMIT, |_| {}, |s| s.latest_checkpoint.ends_with(&name)).expect("written, committed");
    let dir = s.latest_checkpoint.clone();
    c.coordinator.cancel(&job, "done with it").expect("cancel");
    drop(workers);

    let resumed = c.coordinator.submit_resumed(cfg.clone(), &dir).expect("resume accepted");
    assert_eq!(c.status(&resumed).committed_steps, steps);
    let mut ws: Vec<Traced> = (0..2).map(|i| spawn(&c, &resumed, tmp.path(), &format!("b{i}"))).collect();
    let end = c.wait_until(&resumed, LIMIT, |_| {}, is_terminal).expect("resumed job ends");
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    for w in &mut ws {
        let code = w.proc.wait(Duration::from_secs(60)).expect("exits");
        assert!(code.success(), "{}", w.proc.log_text());
        let log = w.proc.log_text();
        assert!(log.contains(&format!("restored {dir}")), "{log}");
        assert!(log.contains(&format!("from step {steps}")), "{log}");
    }
    let ledger = c.coordinator.ledger(&LedgerRef { job_id: resumed.clone(), epoch: 0 }).expect("ledger");
    assert!(ledger.iter().all(|e| e.step >= steps), "the resumed job's ledger starts at its checkpoint");

    // Another architecture: refused by the workers, naming a tensor; the job fails.
    let mut other = cfg;
    other.model.embed_dim = 16;
    let bad = c.coordinator.submit_resumed(other, &dir).expect("accepted (the workers check the tensors)");
    let _ws: Vec<Traced> = (0..2).map(|i| spawn(&c, &bad, tmp.path(), &format!("c{i}"))).collect();
    let end = c.wait_until(&bad, LIMIT, |_| {}, is_terminal).expect("refused");
    assert_eq!(state_of(&end), pb::JobState::Failed);
    assert!(end.message.contains("model.safetensors") && end.message.contains("shape"), "{}", end.message);
    // And a directory that is no checkpoint is refused at submission, naming the field.
    let err = c.coordinator.submit_resumed(elastic_job(&manifest, tmp.path(), 1, 1, 10), "/nowhere").expect_err("no");
    let status: tonic::Status = err.into();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("resume_checkpoint"), "{}", status.message());
}

/// The indices of the worker processes still running.
fn running(workers: &mut [Traced]) -> Vec<usize> {
    let mut alive = Vec::new();
    for (i, w) in workers.iter_mut().enumerate() {
        if matches!(w.proc.child.try_wait(), Ok(None)) {
            alive.push(i);
        }
    }
    alive
}

/// A seeded chaos run (about two minutes): kill -9, SIGTERM, new workers and scale changes at random
/// moments while the job trains; then the job completes and the audit holds: the ledger equals what
/// the workers trained, every slot of every full epoch exactly once, the final replicas identical.
/// `HCMOCO_CHAOS_SEED` replays a run.
#[test]
fn a_seeded_chaos_run_loses_and_repeats_nothing() {
    let seed: u64 = std::env::var("HCMOCO_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261204);
    let mut rng = seed;
    let mut next = move |n: u64| {
        // xorshift64*: deterministic, seeded.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n.max(1)
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 36, 32, 10);
    let c = TestCoordinator::start();
    let mut cfg = elastic_job(&manifest, tmp.path(), 1, 4, 1600);
    cfg.rendezvous.settle_ms = 200;
    let job = c.submit(cfg);
    let mut workers: Vec<Traced> = (0..3).map(|i| spawn(&c, &job, tmp.path(), &format!("w{i}"))).collect();
    let mut killed = Vec::new();
    let mut terminated = Vec::new();
    let mut log = Vec::new();
    c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 5).expect("training");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(100) {
        std::thread::sleep(Duration::from_millis(1500 + next(3000)));
        let s = c.status(&job);
        if is_terminal(&s) || s.committed_steps > 1400 {
            break;
        }
        let alive = running(&mut workers);
        match next(4) {
            0 if alive.len() >= 2 => {
                let i = alive[next(alive.len() as u64) as usize];
                kill(&mut workers[i]);
                killed.push(i);
                log.push(format!("step {}: kill -9 w{i}", s.committed_steps));
            }
            1 if alive.len() >= 2 => {
                let i = alive[next(alive.len() as u64) as usize];
                sigterm(&workers[i]);
                terminated.push(i);
                log.push(format!("step {}: SIGTERM w{i}", s.committed_steps));
            }
            2 => {
                let target = 1 + next(4) as u32;
                c.coordinator.scale(ScaleJob { job_id: job.clone(), workers: target }).expect("scale");
                log.push(format!("step {}: scale to {target}", s.committed_steps));
            }
            _ => {
                let name = format!("w{}", workers.len());
                workers.push(spawn(&c, &job, tmp.path(), &name));
                log.push(format!("step {}: start {name}", s.committed_steps));
            }
        }
        // Never leave the job without a worker (the audit then needs no rollback).
        let alive = running(&mut workers).len();
        let s = c.status(&job);
        if alive < 2 || s.target_workers as usize > alive {
            let name = format!("w{}", workers.len());
            workers.push(spawn(&c, &job, tmp.path(), &name));
            log.push(format!("step {}: start {name} (keep the job staffed)", s.committed_steps));
        }
    }
    let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
    let history = log.join("\n");
    assert_eq!(state_of(&end), pb::JobState::Completed, "seed {seed}: {}\n{history}", end.message);
    for (i, w) in workers.iter_mut().enumerate() {
        if killed.contains(&i) {
            continue;
        }
        let code = w.proc.wait(Duration::from_secs(60)).expect("exits");
        assert!(code.success(), "seed {seed}: worker {i} failed\n{history}\n{}", w.proc.log_text());
    }
    audit(&c, &job, &workers, &killed, 1);
    let ranks: Vec<u32> = (0..end.world_size).collect();
    assert_identical(tmp.path(), &ranks);
    eprintln!("seed {seed}: {} events, {} generations\n{history}", log.len(), end.generation);
}
