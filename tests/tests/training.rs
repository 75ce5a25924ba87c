//! Real multi-process training: a coordinator and worker processes on loopback.

use std::time::Duration;

use hcmoco_proto::config::{Dtype, Norm, Schedule};
use hcmoco_proto::pb;
use hcmoco_tests::*;

const LIMIT: Duration = Duration::from_secs(240);

/// Coordinator + 2 worker processes train 30 steps: the loss falls, a checkpoint is written, and both
/// ranks end with identical parameters and BatchNorm buffers.
#[test]
fn two_workers_train_30_steps_and_stay_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 48, 32, 1);
    let c = TestCoordinator::start();
    let mut cfg = small_job(&manifest, tmp.path(), 2, 30, 16);
    cfg.model.norm = Norm::Batch;
    cfg.optimizer.lr = 0.1;
    cfg.optimizer.schedule = Schedule::Constant;
    cfg.checkpoint.every_steps = 10;
    let job = c.submit(cfg);
    let dump = tmp.path().join("state");
    let dump_arg = dump.display().to_string();
    let mut workers: Vec<WorkerProc> = (0..2)
        .map(|i| WorkerProc::spawn(&c.url(), &job, tmp.path().join(format!("w{i}.log")), &["--dump-state", &dump_arg]))
        .collect();

    let mut losses = std::collections::BTreeMap::new();
    let end = c
        .wait_until(
            &job,
            LIMIT,
            |s| {
                if let Some(m) = &s.latest {
                    losses.insert(m.step, m.loss_total);
                }
            },
            is_terminal,
        )
        .expect("job ends");
    for w in &mut workers {
        let code = w.wait(Duration::from_secs(60)).expect("worker exits");
        assert!(code.success(), "worker failed: {code}\n{}", w.log_text());
    }
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    assert_eq!(end.committed_steps, 30);
    assert_eq!(end.world_size, 2);

    // The loss falls: the mean of the last observed steps is below the first observed steps'.
    let v: Vec<f64> = losses.values().copied().collect();
    assert!(v.len() >= 6, "too few observations: {losses:?}");
    let head = v[..3].iter().sum::<f64>() / 3.0;
    let tail = v[v.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < head * 0.9, "loss did not fall: first {head:.3}, last {tail:.3} ({losses:?})");

    // Checkpoints every 10 steps and at the end, the last named in the status.
    let ckpt = std::path::PathBuf::from(&end.latest_checkpoint);
    assert!(ckpt.ends_with("step-00000030"), "{}", end.latest_checkpoint);
    for f in ["model.safetensors", "optimizer.safetensors", "meta.json", "job.toml"] {
        assert!(ckpt.join(f).is_file(), "missing {f} in {}", ckpt.display());
    }
    assert!(tmp.path().join("checkpoints/step-00000010").is_dir());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("meta.json")).expect("meta")).expect("json");
    assert_eq!(meta["step"], 30);
    assert_eq!(meta["world_size"], 2);

    // Replicas agree: parameters, momentum and buffers (BatchNorm running statistics) alike.
    let r0 = read_tensors(&dump.join("rank-0.safetensors")).expect("rank 0 state");
    let r1 = read_tensors(&dump.join("rank-1.safetensors")).expect("rank 1 state");
    assert!(r0.iter().any(|(n, _)| n.ends_with("running_var")), "BatchNorm buffers present");
    let (abs, _) = max_diffs(&r0, &r1).expect("same tensors");
    assert_eq!(abs, 0.0, "replicas must be bit-identical");
    // And the checkpoint holds rank 0's final state.
    let saved = read_tensors(&ckpt.join("model.safetensors")).expect("checkpoint weights");
    let (abs, _) = max_diffs(&saved, &without_momentum(r0)).expect("same tensors");
    assert_eq!(abs, 0.0);
}

/// Which objective an equivalence run trains.
#[derive(Debug, Clone, Copy)]
struct Objective {
    stage: u32,
    memory_bank: bool,
}

const STAGE1: Objective = Objective { stage: 1, memory_bank: false };

fn equivalence_config(
    manifest: &std::path::Path,
    out: &std::path::Path,
    dtype: Dtype,
    workers: u32,
    global_batch: u64,
    objective: Objective,
) -> hcmoco_proto::JobConfig {
    let mut cfg = small_job(manifest, out, workers, 3, global_batch);
    cfg.seed = 11;
    cfg.model.norm = Norm::Group;
    cfg.model.groups = 4;
    cfg.model.dtype = dtype;
    cfg.optimizer.lr = 0.05;
    // Augmented crops: seeded by (seed, epoch, slot), they must not depend on which rank loads a sample.
    cfg.data.image_size = 24;
    cfg.loss.stage = objective.stage;
    cfg.loss.dicl_points = 40;
    if objective.memory_bank {
        cfg.loss.variant = "memory_bank".into();
        cfg.loss.negatives = 24;
    }
    cfg
}

/// Final state of rank 0 (and, with two ranks, of rank 1) and the last step's loss.
struct RunResult {
    state: Vec<(String, tch::Tensor)>,
    other_rank: Option<Vec<(String, tch::Tensor)>>,
    loss: f64,
}

fn equivalence_run(dtype: Dtype, workers: u32, global_batch: u64, objective: Objective) -> RunResult {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 40, 32, 7);
    run_job(
        &tmp,
        equivalence_config(&manifest, tmp.path(), dtype, workers, global_batch, objective),
        workers,
        objective,
    )
}

/// Runs `cfg` with `workers` processes dumping their final state; `objective` says which terms to expect.
fn run_job(tmp: &tempfile::TempDir, cfg: hcmoco_proto::JobConfig, workers: u32, objective: Objective) -> RunResult {
    let steps = cfg.steps;
    let c = TestCoordinator::start();
    let job = c.submit(cfg);
    let dump = tmp.path().join("state");
    let dump_arg = dump.display().to_string();
    let mut procs: Vec<WorkerProc> = (0..workers)
        .map(|i| WorkerProc::spawn(&c.url(), &job, tmp.path().join(format!("w{i}.log")), &["--dump-state", &dump_arg]))
        .collect();
    let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
    for p in &mut procs {
        let code = p.wait(Duration::from_secs(60)).expect("exit");
        assert!(code.success(), "{}", p.log_text());
    }
    assert_eq!(state_of(&end), pb::JobState::Completed, "{}", end.message);
    let last = end.latest.as_ref().expect("metrics of the last step");
    assert_eq!(last.step, steps - 1);
    if objective.stage == 2 {
        for term in ["dicl_r2d", "dicl_d2r", "sscl_r2k", "sscl_d2k", "sscl_cross"] {
            let v = last.loss_terms.get(term).copied().unwrap_or_default();
            assert!(v > 0.0 && v.is_finite(), "{term} = {v}: every stage-2 term has anchors in this data");
        }
    }
    RunResult {
        state: without_momentum(read_tensors(&dump.join("rank-0.safetensors")).expect("state")),
        other_rank: (workers > 1)
            .then(|| without_momentum(read_tensors(&dump.join("rank-1.safetensors")).expect("rank 1 state"))),
        loss: last.loss_total,
    }
}

/// Asserts that a 2-rank run and a 1-rank run of the same global batch agree on the loss and the
/// final parameters (3 SGD steps: any gradient difference shows).
fn assert_equivalent(dtype: Dtype, objective: Objective) -> (RunResult, RunResult) {
    // Parameters: f64 to an absolute 1e-9, fp32 to a relative 1e-4. The loss: relative to
    // max(1, |loss|) at the same precision, so a wrong loss fails whatever its size.
    let (tol_abs, tol_rel, tol_loss) = match dtype {
        Dtype::F64 => (1e-9, f64::INFINITY, 1e-9),
        Dtype::F32 => (f64::INFINITY, 1e-4, 1e-4),
    };
    let one = equivalence_run(dtype, 1, 12, objective);
    let two = equivalence_run(dtype, 2, 12, objective);
    let (abs, rel) = max_diffs(&one.state, &two.state).expect("same parameters");
    assert!(abs <= tol_abs && rel <= tol_rel, "{dtype:?} {objective:?}: max abs diff {abs:e}, max rel diff {rel:e}");
    let loss_diff = (one.loss - two.loss).abs();
    assert!(
        one.loss.is_finite() && loss_diff <= tol_loss * one.loss.abs().max(1.0),
        "{dtype:?} {objective:?}: loss {} (1 rank) vs {} (2 ranks)",
        one.loss,
        two.loss
    );
    (one, two)
}

/// 2 ranks x batch B against 1 rank x batch 2B, same seed, 3 SGD steps, GroupNorm: the parameters
/// match (f64 to 1e-9; fp32 to a relative 1e-4). This proves the cross-rank negatives and the
/// gradient rule: any lost gradient through other ranks' rows, or a 1/world scaling, breaks it.
#[test]
fn two_ranks_match_one_rank_with_the_whole_batch() {
    for dtype in [Dtype::F64, Dtype::F32] {
        let (one, _) = assert_equivalent(dtype, STAGE1);
        // The runs did train: the loss gradients moved the parameters away from the seed's initial
        // weights by far more than weight decay alone could (3 steps x lr 0.05 x wd 1e-4 ~ 1e-5 relative).
        let unused = std::path::Path::new("/unused");
        let cfg = equivalence_config(unused, unused, dtype, 1, 12, STAGE1);
        let init = hcmoco_worker::model::Model::new(
            &cfg.model,
            hcmoco_data::KeypointLayout::Mpii16,
            cfg.seed,
            tch::Device::Cpu,
        )
        .expect("model")
        .state();
        let (_, moved) = max_diffs(&init, &one.state).expect("same parameter names");
        assert!(moved > 1e-3, "{dtype:?}: parameters barely moved (max relative change {moved:e})");
    }
}

/// The same equivalence for stage 2 (every term: the six sample-level terms, DICL both ways, SSCL
/// part 1 for RGB and depth, SSCL part 2 over the global batch), in f64 and fp32.
#[test]
fn stage_two_two_ranks_match_one_rank() {
    for dtype in [Dtype::F64, Dtype::F32] {
        assert_equivalent(dtype, Objective { stage: 2, memory_bank: false });
    }
}

/// Every parameter gradient of one stage-2 step, directly: with lr 1, no momentum and no weight decay,
/// one SGD step leaves `p - g`, so `g = p_initial - p_final`. 2 ranks x 6 against 1 rank x 12, f64 to
/// 1e-9 (and the loss).
#[test]
fn stage_two_parameter_gradients_match_one_rank() {
    let unused = std::path::Path::new("/unused");
    let objective = Objective { stage: 2, memory_bank: false };
    let run = |workers: u32| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifest = synth(&tmp.path().join("data"), 40, 32, 7);
        let mut cfg = equivalence_config(&manifest, tmp.path(), Dtype::F64, workers, 12, objective);
        cfg.steps = 1;
        cfg.optimizer.lr = 1.0;
        cfg.optimizer.lr_min = 1.0;
        cfg.optimizer.momentum = 0.0;
        cfg.optimizer.weight_decay = 0.0;
        cfg.optimizer.schedule = Schedule::Constant;
        run_job(&tmp, cfg, workers, objective)
    };
    let cfg = equivalence_config(unused, unused, Dtype::F64, 1, 12, objective);
    let init =
        hcmoco_worker::model::Model::new(&cfg.model, hcmoco_data::KeypointLayout::Mpii16, cfg.seed, tch::Device::Cpu)
            .expect("model");
    let params = init.parameters();
    let grads = |state: &[(String, tch::Tensor)]| -> Vec<(String, tch::Tensor)> {
        params
            .iter()
            .map(|(name, p0)| {
                let p1 = &state.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not dumped")).1;
                (name.clone(), p0.detach() - p1)
            })
            .collect()
    };
    let (one, two) = (run(1), run(2));
    let (g1, g2) = (grads(&one.state), grads(&two.state));
    let (abs, _) = max_diffs(&g1, &g2).expect("same parameters");
    assert!(abs <= 1e-9, "parameter gradients differ by {abs:e}");
    // Every parameter that the objective reaches got a gradient (the dense heads and both encoders).
    for want in [
        "rgb.dense_head.weight",
        "depth.dense_head.weight",
        "kp.gcn.gconv_input.gconv.W",
        "depth.backbone.conv1.weight",
    ] {
        let g = &g1.iter().find(|(n, _)| n == want).expect(want).1;
        assert!(g.abs().max().double_value(&[]) > 0.0, "{want} got no gradient");
    }
    assert!((one.loss - two.loss).abs() <= 1e-9 * one.loss.abs().max(1.0), "loss {} vs {}", one.loss, two.loss);
}

/// The memory-bank variant: 2 ranks match 1 rank (negatives are drawn per slot, banks are updated in
/// global slot order), and the two ranks' banks are bit-identical.
#[test]
fn memory_bank_two_ranks_match_one_rank_and_banks_stay_identical() {
    let (one, two) = assert_equivalent(Dtype::F64, Objective { stage: 2, memory_bank: true });
    let rank1 = two.other_rank.expect("rank 1 state");
    let banks = |s: &[(String, tch::Tensor)]| -> Vec<(String, tch::Tensor)> {
        s.iter().filter(|(n, _)| n.starts_with("bank.")).map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    };
    let (b0, b1) = (banks(&two.state), banks(&rank1));
    assert_eq!(b0.len(), 3, "three banks dumped: {:?}", b0.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for ((n0, t0), (n1, t1)) in b0.iter().zip(&b1) {
        assert_eq!(n0, n1);
        assert!(t0.equal(t1), "{n0}: ranks' banks differ");
    }
    let (abs, _) = max_diffs(&banks(&one.state), &b0).expect("same banks");
    assert!(abs <= 1e-9, "1-rank and 2-rank banks differ by {abs:e}");
    // The banks were written: they moved away from a fresh bank of the same seed (40 samples, 32 dims).
    let fresh = hcmoco_worker::loss::MemoryBank::new(40, 32, 11, tch::Kind::Double, tch::Device::Cpu);
    let mut fresh: Vec<(String, tch::Tensor)> = hcmoco_worker::train::BANK_NAMES
        .iter()
        .zip(&fresh.banks)
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    fresh.sort_by(|a, b| a.0.cmp(&b.0));
    let (moved, _) = max_diffs(&fresh, &b0).expect("same bank names");
    assert!(moved > 1e-3, "the banks were never updated (max change {moved:e})");
}

/// kill -9 of one worker in the middle of a run that cannot go on below two workers
/// (`workers.below_min_timeout_ms = 0`): the survivor's collective fails fast (no hang), the survivor
/// exits non-zero naming the dead peer, and the job fails saying which rank was lost.
#[test]
fn a_killed_worker_fails_the_job_fast_and_names_the_peer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 32, 32, 3);
    let c = TestCoordinator::start();
    let mut cfg = small_job(&manifest, tmp.path(), 2, 100_000, 8);
    cfg.collective.timeout_ms = 5_000;
    cfg.heartbeat.interval_ms = 200;
    cfg.heartbeat.timeout_ms = 3_000;
    cfg.workers.below_min_timeout_ms = 0;
    let job = c.submit(cfg);
    let mut workers: Vec<WorkerProc> =
        (0..2).map(|i| WorkerProc::spawn(&c.url(), &job, tmp.path().join(format!("w{i}.log")), &[])).collect();
    let running = c.wait_until(&job, LIMIT, |_| {}, |s| s.committed_steps >= 3).expect("training started");
    // Kill the process holding rank 1.
    let victim_id = running.workers.iter().find(|w| w.rank == 1).expect("rank 1").worker_id.clone();
    let victim = workers
        .iter()
        .position(|w| w.log_text().contains(&format!("worker {victim_id} joined")))
        .expect("victim's process");
    let killed_at = std::time::Instant::now();
    workers[victim].child.kill().expect("kill -9");
    let _ = workers[victim].child.wait();

    let end = c.wait_until(&job, Duration::from_secs(30), |_| {}, is_terminal).expect("job ends after a death");
    assert_eq!(state_of(&end), pb::JobState::Failed);
    assert!(end.message.contains("rank 1"), "the failure names the lost rank: {}", end.message);
    let survivor = &mut workers[1 - victim];
    let code = survivor.wait(Duration::from_secs(30)).expect("survivor exits");
    assert!(!code.success());
    let log = survivor.log_text();
    assert!(log.contains("peer rank 1"), "the survivor's collective error names its dead peer:\n{log}");
    assert!(killed_at.elapsed() < Duration::from_secs(25), "took {:?}", killed_at.elapsed());
}

/// Corrupts the RGB payload of sample `key` inside its shard, leaving the tar structure intact.
fn corrupt_rgb(shard: &std::path::Path, key: &str) {
    let mut bytes = std::fs::read(shard).expect("shard");
    let name = format!("{key}.rgb.png");
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).expect("member in shard");
    let payload = at + 512; // the tar header is 512 bytes, the member's data follows
    for b in &mut bytes[payload + 40..payload + 80] {
        *b ^= 0x5a;
    }
    std::fs::write(shard, bytes).expect("write");
}

/// A corrupt sample: under `data.on_error = "fail"` the job fails naming the shard and the sample;
/// under `"skip"` it trains on, and the skipped sample is counted in the job's status and named in
/// the worker's log, never dropped silently.
#[test]
fn a_corrupt_sample_fails_the_job_or_is_skipped_and_counted() {
    for policy in ["fail", "skip"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifest = synth(&tmp.path().join("data"), 16, 24, 9);
        corrupt_rgb(&tmp.path().join("data/shard-00000.tar"), "synth-00000003");
        let c = TestCoordinator::start();
        let mut cfg = small_job(&manifest, tmp.path(), 2, 4, 8);
        cfg.data.on_error = policy.into();
        let job = c.submit(cfg);
        let mut workers: Vec<WorkerProc> =
            (0..2).map(|i| WorkerProc::spawn(&c.url(), &job, tmp.path().join(format!("w{i}.log")), &[])).collect();
        let end = c.wait_until(&job, LIMIT, |_| {}, is_terminal).expect("job ends");
        let codes: Vec<_> = workers.iter_mut().map(|w| w.wait(Duration::from_secs(60)).expect("exit")).collect();
        let logs: String = workers.iter().map(WorkerProc::log_text).collect::<Vec<_>>().join("\n");
        if policy == "fail" {
            assert_eq!(state_of(&end), pb::JobState::Failed, "{logs}");
            assert!(
                end.message.contains("shard-00000.tar") && end.message.contains("synth-00000003"),
                "{}",
                end.message
            );
        } else {
            assert_eq!(state_of(&end), pb::JobState::Completed, "{}\n{logs}", end.message);
            assert!(codes.iter().all(|c| c.success()), "{logs}");
            // 16 samples, 4 steps of 8: two epochs, the corrupt sample is met once per epoch.
            assert_eq!(end.skipped_samples, 2, "{logs}");
            assert!(logs.contains("skipped a sample") && logs.contains("synth-00000003"), "{logs}");
            assert!(hcmoco_coordinator::status::render(&end).contains("skipped 2"));
        }
    }
}
