//! The command lines as users run them: status, submit, worker start-up failures, local launch.

use std::process::Command;
use std::time::{Duration, Instant};

use hcmoco_proto::pb;
use hcmoco_tests::*;

/// `hcmoco status --job` against a running job shows its state, step, per-worker progress, per-rank
/// step times and the latest loss.
#[test]
fn status_shows_a_running_job() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 32, 32, 2);
    let c = TestCoordinator::start();
    let job = c.submit(small_job(&manifest, tmp.path(), 2, 100_000, 8));
    let mut workers: Vec<WorkerProc> =
        (0..2).map(|i| WorkerProc::spawn(&c.url(), &job, tmp.path().join(format!("w{i}.log")), &[])).collect();
    c.wait_until(
        &job,
        Duration::from_secs(120),
        |_| {},
        |s| s.committed_steps >= 3 && s.workers.iter().all(|w| w.latest.is_some()),
    )
    .expect("job makes progress");

    let out = Command::new(bin("hcmoco"))
        .args(["status", "--job", &job.0, "--coordinator", &c.addr.to_string()])
        .output()
        .expect("run status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("job {} (itest): running", job.0)), "{text}");
    assert!(text.contains("generation 1") && text.contains("world 2"), "{text}");
    let step_line = text.lines().find(|l| l.trim_start().starts_with("step ")).expect("a step line");
    let committed: u64 =
        step_line.trim_start()["step ".len()..].split('/').next().and_then(|n| n.parse().ok()).expect("step number");
    assert!(committed >= 3, "{step_line}");
    assert!(text.contains("loss "), "{text}");
    assert!(
        text.contains("step_ms") && text.contains("data_ms") && text.contains("compute_ms") && text.contains("comm_ms"),
        "{text}"
    );
    // One row per rank with its progress, timings and loss.
    for rank in ["0", "1"] {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(rank))
            .unwrap_or_else(|| panic!("no row for rank {rank}:\n{text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.len(), 10, "{row}");
        assert!(cols[4].parse::<u64>().expect("steps") >= 1, "{row}");
        for c in &cols[5..] {
            assert!(c.parse::<f64>().is_ok(), "{row}");
        }
    }
    // The list view names the job too.
    let out = Command::new(bin("hcmoco"))
        .args(["status", "--coordinator", &c.addr.to_string()])
        .output()
        .expect("run status");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&job.0));

    // Cancel: the workers stop and exit non-zero, the job says why.
    let out = Command::new(bin("hcmoco"))
        .args(["cancel", &job.0, "--coordinator", &c.addr.to_string()])
        .output()
        .expect("cancel");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    let end = c.wait_until(&job, Duration::from_secs(30), |_| {}, is_terminal).expect("ends");
    assert_eq!(state_of(&end), pb::JobState::Cancelled);
    for w in &mut workers {
        let code = w.wait(Duration::from_secs(30)).expect("worker exits after the cancel");
        let log = w.log_text();
        assert!(!code.success(), "a cancelled worker exits non-zero:\n{log}");
        assert!(log.contains("cancelled from the command line"), "the worker says why it stopped:\n{log}");
    }
}

/// A malformed job file is refused, naming the key: locally by `hcmoco submit`, and by the server
/// for a request that skips the CLI.
#[test]
fn malformed_job_files_name_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 8, 16, 0);
    let c = TestCoordinator::start();
    let base = format!("[[data.datasets]]\nmanifest = {:?}\n", manifest.display().to_string());
    let path = tmp.path().join("job.toml");
    let submit = |text: &str| {
        std::fs::write(&path, text).expect("write job file");
        let out = Command::new(bin("hcmoco"))
            .arg("submit")
            .arg(&path)
            .args(["--coordinator", &c.addr.to_string()])
            .output()
            .expect("run hcmoco submit");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (text, key) in [
        (format!("globl_batch = 4\n{base}"), "globl_batch"),
        (format!("[optimizer]\nlearning_rate = 0.1\n{base}"), "learning_rate"),
        (format!("[workers]\nmin = 4\nmax = 2\n{base}"), "workers.max"),
    ] {
        let (ok, err) = submit(&text);
        assert!(!ok, "accepted: {text}");
        assert!(err.contains(key) && err.contains("job.toml"), "error should name {key} and the file: {err}");
    }
    // A dataset that does not exist is refused by the coordinator, naming the key.
    let (ok, err) = submit("[[data.datasets]]\nmanifest = \"missing/manifest.json\"\n");
    assert!(!ok && err.contains("data.datasets[0].manifest"), "{err}");
    // Straight over gRPC: InvalidArgument naming the key.
    let status = c.rt.block_on(async {
        let mut client = pb::job_service_client::JobServiceClient::connect(c.url()).await.expect("connect");
        client
            .submit_job(pb::SubmitJobRequest { spec_toml: format!("stepz = 1\n{base}"), ..Default::default() })
            .await
            .expect_err("refused")
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("stepz"), "{}", status.message());
}

/// A worker pointed at an unreachable coordinator retries for a bounded time, then exits non-zero
/// with a clear message.
#[test]
fn worker_gives_up_on_an_unreachable_coordinator() {
    // A port nobody listens on: bind, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let started = Instant::now();
    let out = Command::new(bin("hcmoco-worker"))
        .args(["run", "--coordinator", &format!("127.0.0.1:{port}"), "--connect-timeout-secs", "2"])
        .output()
        .expect("run worker");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("could not reach the coordinator at 127.0.0.1:{port}")), "{err}");
    assert!(err.contains("attempts"), "retried: {err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(60), "gave up after {took:?}");
}

/// The gRPC health service reports the coordinator's services as serving.
#[test]
fn health_and_reflection_are_served() {
    let c = TestCoordinator::start();
    c.rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(c.url()).expect("uri").connect().await.expect("connect");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in ["hcmoco.v1.JobService", "hcmoco.v1.WorkerService"] {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
                .await
                .expect("check")
                .into_inner();
            assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service}");
        }
        // Reflection lists the contract's services, so grpcurl works without the .proto file.
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream =
            reflection.server_reflection_info(tokio_stream::iter([req])).await.expect("reflection").into_inner();
        let resp = stream.message().await.expect("message").expect("one response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected {resp:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in ["hcmoco.v1.JobService", "hcmoco.v1.WorkerService", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    });
}

/// The README's main command, smaller: `hcmoco launch --local` generates data, runs 2 worker
/// processes, prints a summary and leaves a checkpoint.
#[test]
fn launch_local_runs_to_completion() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("run");
    let out = Command::new(bin("hcmoco"))
        .args([
            "launch",
            "--local",
            "--workers",
            "2",
            "--steps",
            "12",
            "--synth-samples",
            "48",
            "--synth-image-size",
            "32",
            "--out",
        ])
        .arg(&out_dir)
        .env("HCMOCO_WORKER_BIN", bin("hcmoco-worker"))
        .output()
        .expect("launch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("run complete") && stdout.contains("trained 12 steps"), "{stdout}");
    assert!(stdout.contains("completed"), "{stdout}");
    let ckpt = out_dir.join("checkpoints/step-00000012");
    assert!(ckpt.join("model.safetensors").is_file(), "{stdout}");
    assert!(out_dir.join("job.toml").is_file() && out_dir.join("logs/worker-0.log").is_file());
}

/// The two-stage recipe from the command line: stage 1 with the memory-bank variant, then stage 2
/// (`--stage 2 --init-checkpoint`) starting from it: the weights and banks load, every stage-2 term is
/// trained, and the stage-2 checkpoint carries the banks. A missing stage-1 checkpoint is refused.
#[test]
fn stage_two_starts_from_a_stage_one_run_with_its_memory_banks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tmp.path().join("bank.toml");
    std::fs::write(
        &job,
        "global_batch = 20\n[data]\nimage_size = 32\n[model]\nbackbone = \"hrnet_small\"\nembed_dim = 32\nkeypoint_hidden = 32\nkeypoint_blocks = 1\n\
         [loss]\nvariant = \"memory_bank\"\nnegatives = 64\ndicl_points = 50\n[runtime]\ntorch_threads = 1\n",
    )
    .expect("job file");
    let launch = |job: &std::path::Path, out: &std::path::Path, extra: &[&str]| {
        let out = Command::new(bin("hcmoco"))
            .args([
                "launch",
                "--local",
                "--workers",
                "2",
                "--steps",
                "6",
                "--synth-samples",
                "40",
                "--synth-image-size",
            ])
            .args(["32", "--job-file"])
            .arg(job)
            .arg("--out")
            .arg(out)
            .args(extra)
            .env("HCMOCO_WORKER_BIN", bin("hcmoco-worker"))
            .output()
            .expect("launch");
        (
            out.status.success(),
            format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let s1 = tmp.path().join("s1");
    let (ok, text) = launch(&job, &s1, &[]);
    assert!(ok, "stage 1: {text}");
    let s1_ckpt = s1.join("checkpoints/step-00000006");
    assert!(s1_ckpt.join("banks.safetensors").is_file(), "stage 1 writes its banks: {text}");
    let init = s1.join("checkpoints").display().to_string();
    let s2 = tmp.path().join("s2");
    let (ok, text) = launch(&job, &s2, &["--stage", "2", "--init-checkpoint", &init]);
    assert!(ok, "stage 2: {text}");
    // The final status lists every term with its value (`[rgb_depth 2.2095, ..., sscl_cross 3.1]`):
    // every stage-2 term was trained, with anchors, so its value is finite and positive.
    for term in ["dicl_r2d", "dicl_d2r", "sscl_r2k", "sscl_d2k", "sscl_cross"] {
        let needle = format!("{term} ");
        let at = text.find(&needle).unwrap_or_else(|| panic!("stage 2 reports {term}: {text}"));
        let value: String = text[at + needle.len()..].chars().take_while(|c| !matches!(c, ',' | ']' | ' ')).collect();
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{term} = {value:?}: {e}"));
        assert!(value.is_finite() && value > 0.0, "{term} = {value}: {text}");
    }
    let log = std::fs::read_to_string(s2.join("logs/worker-0.log")).expect("worker log");
    assert!(log.contains("initialised from") && log.contains("step-00000006"), "{log}");
    // Each run checkpoints under its own --out: stage 2 did not replace stage 1's step 6.
    assert!(s2.join("checkpoints/step-00000006/banks.safetensors").is_file(), "{text}");
    let s1_meta = std::fs::read_to_string(s1_ckpt.join("job.toml")).expect("stage 1 job");
    assert!(s1_meta.contains("stage = 1"), "stage 1's checkpoint is still stage 1's: {s1_meta}");
    // A stage-1 checkpoint of another architecture (2 SemGCN blocks here, 1 there) is refused, naming
    // the tensors it lacks.
    let two_blocks = tmp.path().join("two-blocks.toml");
    let text = std::fs::read_to_string(&job).expect("job").replace("keypoint_blocks = 1", "keypoint_blocks = 2");
    std::fs::write(&two_blocks, text).expect("job file");
    let (ok, text) = launch(&two_blocks, &tmp.path().join("s4"), &["--stage", "2", "--init-checkpoint", &init]);
    assert!(!ok, "{text}");
    assert!(text.contains("missing") && text.contains("kp.gcn.gconv_layers.1.gconv1.gconv.W"), "{text}");
    let missing = tmp.path().join("nowhere").display().to_string();
    let (ok, text) = launch(&job, &tmp.path().join("s3"), &["--stage", "2", "--init-checkpoint", &missing]);
    assert!(!ok && text.contains("model.init_checkpoint") && text.contains("nowhere"), "{text}");
}

/// `data inspect` prints counts and modalities; `data verify` passes on a good dataset and fails on a
/// modified shard, naming it.
#[test]
fn data_inspect_and_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let manifest = synth(&tmp.path().join("data"), 40, 16, 5);
    let run = |cmd: &str| Command::new(bin("hcmoco-worker")).args(["data", cmd]).arg(&manifest).output().expect("run");
    let out = run("inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("samples 40") && text.contains("with depth") && text.contains("mpii16"), "{text}");
    let out = run("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("40 samples decode"));
    // Flip one byte in the middle of the second shard.
    let shard = tmp.path().join("data/shard-00001.tar");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).expect("write");
    let out = run("verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("shard-00001.tar"), "the error names the shard: {err}");
}

/// `data convert coco` on a tiny COCO fixture: the valid person becomes a sample, a crowd annotation
/// is skipped and counted, and the output trains-ready dataset verifies.
#[test]
fn data_convert_coco_from_the_command_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    let (w, h) = (80u32, 60u32);
    let file = std::fs::File::create(images.join("a.png")).expect("png");
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("header");
    writer.write_image_data(&vec![120u8; (w * h * 3) as usize]).expect("pixels");
    writer.finish().expect("finish");
    // 17 COCO keypoints: a person in the middle, all labelled.
    let kps: Vec<String> = (0..17).map(|i| format!("{}, {}, 2", 30 + i, 15 + 2 * i)).collect();
    let kps = kps.join(", ");
    let annotations = format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.png", "width": {w}, "height": {h}}}],
            "annotations": [
              {{"id": 10, "image_id": 1, "category_id": 1, "bbox": [25, 10, 30, 40], "iscrowd": 0, "num_keypoints": 17, "keypoints": [{kps}]}},
              {{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1, "num_keypoints": 17, "keypoints": [{kps}]}}
            ],
            "categories": [{{"id": 1, "name": "person"}}]}}"#
    );
    let ann = tmp.path().join("person_keypoints.json");
    std::fs::write(&ann, annotations).expect("annotations");
    let out_dir = tmp.path().join("coco-shards");
    let out = Command::new(bin("hcmoco-worker"))
        .args(["data", "convert", "coco", "--annotations"])
        .arg(&ann)
        .arg("--images")
        .arg(&images)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("convert");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("wrote 1 samples") && text.contains("skipped 1: crowd"), "{text}");
    let verify = Command::new(bin("hcmoco-worker"))
        .args(["data", "verify"])
        .arg(out_dir.join("manifest.json"))
        .output()
        .expect("verify");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let inspect = Command::new(bin("hcmoco-worker"))
        .args(["data", "inspect"])
        .arg(out_dir.join("manifest.json"))
        .output()
        .expect("inspect");
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("coco13"));
}

/// `hcmoco serve --etcd` with etcd unreachable gives up after its bounded retries, exits non-zero,
/// and names the endpoints.
#[test]
fn serve_with_an_unreachable_etcd_exits_naming_the_endpoints() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let out = Command::new(bin("hcmoco"))
        .args(["serve", "--listen", "127.0.0.1:0", "--etcd", &endpoint, "--etcd-connect-timeout-secs", "2"])
        .output()
        .expect("run hcmoco serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot reach etcd") && err.contains(&endpoint) && err.contains("attempts"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "gave up after {:?}", started.elapsed());
}
