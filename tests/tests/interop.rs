//! Weights move between us and PyTorch: `hcmoco-worker export` writes the RGB encoder of a checkpoint in
//! a form timm's `hrnet_w18` loads strictly, and timm computes the same four branch maps as our forward
//! pass and as `hcmoco-worker encode` (fp32, max abs diff <= 1e-5 of each map's largest value). Also: our BatchNorm training updates
//! (momentum 0.01, counters) match PyTorch's, the bilinear fuse mode matches bilinear upsampling in
//! PyTorch, and a GroupNorm export matches timm with its BatchNorm layers swapped for GroupNorm as
//! `docs/export.md` describes. And (no Python needed) bad weight and input files are refused with the tensor names listed.
//!
//! The timm test needs the venv that `scripts/setup.sh` builds (torch, safetensors, timm):
//! `$HCMOCO_VENV`, or `~/.cache/hcmoco/venv-torch-2.11.0`. Without the venv, or without timm in it,
//! it fails. Build the binaries first:
//! `cargo build -p hcmoco-worker --bins`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hcmoco_proto::JobConfig;
use hcmoco_proto::config::{DatasetConfig, ModelConfig, Norm};
use hcmoco_tests::{bin, venv_python};
use hcmoco_worker::checkpoint::{self, CheckpointMeta};
use hcmoco_worker::export::ImageModality;
use hcmoco_worker::hrnet::{HrNet, HrNetSpec, Upsample};
use hcmoco_worker::weights::{self, Metadata};
use tch::{Device, Kind, Tensor, nn};

fn job(backbone: &str, upsample: Upsample) -> JobConfig {
    let mut cfg = JobConfig::default();
    cfg.data.datasets.push(DatasetConfig { manifest: "data/manifest.json".into(), weight: None });
    cfg.model.backbone = backbone.into();
    cfg.model.norm = Norm::Batch;
    cfg.model.upsample = upsample.as_str().into();
    cfg
}

fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes a trainer-shaped checkpoint (`step-00000003` under `dir`) holding `vars` plus tensors that
/// export must ignore; returns the step directory.
fn write_checkpoint(dir: &Path, cfg: &JobConfig, vars: &[(String, Tensor)]) -> PathBuf {
    let mut model: Vec<(String, Tensor)> = vars.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
    model.push(("rgb.global_head.weight".into(), Tensor::ones([128, 270], (Kind::Float, Device::Cpu))));
    model.push(("kp.input.w0".into(), Tensor::ones([2, 128], (Kind::Float, Device::Cpu))));
    let meta = CheckpointMeta {
        format: checkpoint::FORMAT.into(),
        job_id: "interop".into(),
        step: 3,
        epoch: 0,
        next_slot_in_epoch: 6,
        generation: 1,
        world_size: 1,
        loss_total: 0.0,
        created_unix_ms: 0,
    };
    checkpoint::write(dir, &meta, &model, &[], &[], &cfg.to_toml()).expect("checkpoint")
}

fn worker(args: &[&str]) -> Output {
    Command::new(bin("hcmoco-worker")).args(args).env("OMP_NUM_THREADS", "2").output().expect("run hcmoco-worker")
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn get<'a>(set: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    set.iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Weights with O(1) activations: He-normal convolutions, random affine and running statistics (the
/// official init, std 0.001 with BatchNorm running statistics at 0/1, would give near-zero outputs in
/// evaluation mode and make the tolerance meaningless).
fn randomise(vars: &[(String, Tensor)]) {
    tch::no_grad(|| {
        for (name, t) in vars {
            let mut t = t.shallow_clone();
            let size = t.size();
            let value = if size.len() == 4 {
                let fan_in = (size[1] * size[2] * size[3]) as f64;
                t.randn_like() * (2.0 / fan_in).sqrt()
            } else if name.ends_with("running_mean") {
                t.randn_like() * 0.1
            } else if name.ends_with("running_var") {
                t.rand_like() + 0.5
            } else if name.ends_with(".weight") {
                t.rand_like() * 0.4 + 0.3
            } else if name.ends_with(".bias") {
                t.randn_like() * 0.1
            } else {
                continue;
            };
            t.copy_(&value);
        }
    });
}

#[test]
fn timm_hrnet_w18_loads_our_rgb_export_and_agrees() {
    let python = venv_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(2024);
    let cfg = job("hrnet_w18", Upsample::Nearest);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = HrNet::new(&vs.root() / "rgb" / "backbone", &HrNetSpec::w18(), 3, Norm::Batch, 32, Upsample::Nearest);
    let vars = sorted_vars(&vs);
    randomise(&vars);
    let before: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, t)| (n.strip_prefix("rgb.backbone.").expect("prefix").to_string(), t.detach().copy()))
        .collect();
    let before_path = tmp.path().join("before.safetensors");
    weights::write(&before_path, &before, &Metadata::new()).expect("before");

    // Three training-mode forwards: running statistics move, counters reach 3.
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    for i in 0..3 {
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let _ = tch::no_grad(|| net.forward_t(&x, true));
        inputs.push((format!("train_{i}"), x));
    }
    let x = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    inputs.push(("eval".into(), x.shallow_clone()));
    let inputs_path = tmp.path().join("inputs.safetensors");
    weights::write(&inputs_path, &inputs, &Metadata::new()).expect("inputs");
    let ours_nearest = tch::no_grad(|| net.forward_t(&x, false));

    let step_dir = write_checkpoint(&tmp.path().join("checkpoints"), &cfg, &vars);
    let export_path = tmp.path().join("rgb.safetensors");
    let out = worker(&[
        "export",
        "--checkpoint",
        path_arg(&step_dir),
        "--modality",
        "rgb",
        "--output",
        path_arg(&export_path),
    ]);
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    let (exported, meta) = weights::read(&export_path).expect("export");
    assert_eq!(meta.get("upsample").map(String::as_str), Some("nearest"));
    assert_eq!(exported.len(), 1830);
    assert_eq!(get(&exported, "stage4.2.fuse_layers.0.3.1.num_batches_tracked").int64_value(&[]), 3);

    // Our bilinear mode, same weights (loaded from the export).
    let vs_b = nn::VarStore::new(Device::Cpu);
    let net_b = HrNet::new(vs_b.root(), &HrNetSpec::w18(), 3, Norm::Batch, 32, Upsample::Bilinear);
    weights::load_into(&export_path, &sorted_vars(&vs_b)).expect("load export");
    let ours_bilinear = tch::no_grad(|| net_b.forward_t(&x, false));

    // `encode` on the same input.
    let input_path = tmp.path().join("x.safetensors");
    weights::write(&input_path, &[("input".into(), x.shallow_clone())], &Metadata::new()).expect("input");
    let features_path = tmp.path().join("features.safetensors");
    let out = worker(&[
        "encode",
        "--weights",
        path_arg(&export_path),
        "--input",
        path_arg(&input_path),
        "--output",
        path_arg(&features_path),
    ]);
    assert!(out.status.success(), "encode failed: {}", String::from_utf8_lossy(&out.stderr));
    let (encoded, _) = weights::read(&features_path).expect("features");

    // GroupNorm (groups 32) with nearest upsampling: loads into timm once its BatchNorm2d layers are
    // replaced by GroupNorm with the documented group counts.
    let gn_cfg = JobConfig { model: ModelConfig { norm: Norm::Group, groups: 32, ..cfg.model.clone() }, ..cfg.clone() };
    let vs_gn = nn::VarStore::new(Device::Cpu);
    let net_gn =
        HrNet::new(&vs_gn.root() / "rgb" / "backbone", &HrNetSpec::w18(), 3, Norm::Group, 32, Upsample::Nearest);
    let gn_vars = sorted_vars(&vs_gn);
    randomise(&gn_vars);
    let ours_gn = tch::no_grad(|| net_gn.forward_t(&x, false));
    let gn_dir = write_checkpoint(&tmp.path().join("gn-checkpoints"), &gn_cfg, &gn_vars);
    let gn_export = tmp.path().join("rgb-gn.safetensors");
    hcmoco_worker::export::export(&gn_dir, ImageModality::Rgb, &gn_export).expect("export the GroupNorm encoder");

    let script = hcmoco_tests::crate_file("python/timm_interop.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--before", path_arg(&before_path), "--export", path_arg(&export_path)])
        .args(["--gn-export", path_arg(&gn_export), "--gn-groups", "32"])
        .args(["--input", path_arg(&inputs_path), "--out", path_arg(tmp.path())])
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(2),
        "python packages missing (scripts/setup.sh installs timm into {}): {stderr}",
        python.display()
    );
    assert!(out.status.success(), "{} failed ({}): {stderr}", script.display(), out.status);
    eprintln!("timm side: {}", String::from_utf8_lossy(&out.stdout).trim());
    let (timm, _) = weights::read(&tmp.path().join("timm_features.safetensors")).expect("timm features");

    for b in 0..4 {
        let name = format!("branch{}", b + 1);
        let t_near = get(&timm, &format!("nearest.{name}"));
        let t_bil = get(&timm, &format!("bilinear.{name}"));
        let scale = t_near.abs().max().double_value(&[]);
        assert!(scale > 1.0, "{name}: outputs too small for the comparison to mean anything ({scale})");
        let d_ours = max_abs_diff(&ours_nearest[b], t_near);
        let d_encode = max_abs_diff(get(&encoded, &name), t_near);
        let d_bilinear = max_abs_diff(&ours_bilinear[b], t_bil);
        eprintln!(
            "{name}: max |x| {scale:.3}, ours-timm {d_ours:.2e}, encode-timm {d_encode:.2e}, bilinear {d_bilinear:.2e}"
        );
        // Relative to the map's largest value (same libtorch kernels on both sides: 0 on this machine).
        let tol = 1e-5 * scale;
        assert!(d_ours <= tol, "{name}: our forward and timm's differ by {d_ours}");
        assert!(d_encode <= tol, "{name}: encode and timm differ by {d_encode}");
        assert!(d_bilinear <= tol, "{name}: bilinear mode and PyTorch bilinear differ by {d_bilinear}");
        let modes = max_abs_diff(t_near, t_bil);
        assert!(modes > 1e-2, "{name}: nearest and bilinear fuse layers should differ ({modes})");
        let t_gn = get(&timm, &format!("gn.{name}"));
        let d_gn = max_abs_diff(&ours_gn[b], t_gn);
        let gn_scale = t_gn.abs().max().double_value(&[]);
        eprintln!("{name} GroupNorm: max |x| {gn_scale:.3}, ours-timm {d_gn:.2e}");
        assert!(
            gn_scale > 1.0 && d_gn <= 1e-5 * gn_scale,
            "{name}: GroupNorm encoder and timm+GroupNorm differ by {d_gn}"
        );
    }

    // Training-mode BatchNorm: same running statistics and counters as PyTorch from the same start.
    let (trained, _) = weights::read(&tmp.path().join("timm_trained.safetensors")).expect("timm trained");
    assert_eq!(weights::names_and_shapes(&trained), weights::names_and_shapes(&exported));
    let mut worst = (0.0f64, String::new());
    for ((name, theirs), (_, ours)) in trained.iter().zip(&exported) {
        if name.ends_with("num_batches_tracked") {
            assert_eq!((theirs.int64_value(&[]), ours.kind()), (3, Kind::Int64), "{name}");
            continue;
        }
        // Relative to the tensor's largest value (a statistic that is all zeros must match exactly).
        let d = max_abs_diff(theirs, ours) / theirs.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    assert!(worst.0 <= 1e-5, "running statistics differ from PyTorch's: {} by {}", worst.1, worst.0);
}

#[test]
fn export_and_encode_refuse_bad_files_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(5);
    let cfg = job("hrnet_small", Upsample::Bilinear);
    let vs = nn::VarStore::new(Device::Cpu);
    let _rgb = HrNet::new(&vs.root() / "rgb" / "backbone", &HrNetSpec::small(), 3, Norm::Batch, 32, Upsample::Bilinear);
    let _depth =
        HrNet::new(&vs.root() / "depth" / "backbone", &HrNetSpec::small(), 1, Norm::Batch, 32, Upsample::Bilinear);
    let ckpt_root = tmp.path().join("checkpoints");
    write_checkpoint(&ckpt_root, &cfg, &sorted_vars(&vs));

    // The checkpoint directory itself: `latest` is followed.
    let good = tmp.path().join("depth.safetensors");
    let out =
        worker(&["export", "--checkpoint", path_arg(&ckpt_root), "--modality", "depth", "--output", path_arg(&good)]);
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("depth encoder (hrnet_small"));
    let out = worker(&["export", "--checkpoint", path_arg(&ckpt_root), "--modality", "ir", "--output", "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("expected \"rgb\" or \"depth\""));

    // Weights with a missing, an unexpected and a mis-shaped tensor: one error naming all three.
    let (mut tensors, meta) = weights::read(&good).expect("read");
    tensors.retain(|(n, _)| n != "layer1.0.bn3.running_mean");
    tensors.push(("classifier.weight".into(), Tensor::zeros([10, 120], (Kind::Float, Device::Cpu))));
    for (n, t) in tensors.iter_mut() {
        if n == "stage4.0.branches.3.0.conv2.weight" {
            *t = Tensor::zeros([64, 32, 3, 3], (Kind::Float, Device::Cpu));
        }
    }
    let bad = tmp.path().join("bad.safetensors");
    weights::write(&bad, &tensors, &meta).expect("write");
    let x = tmp.path().join("x.safetensors");
    weights::write(
        &x,
        &[("input".into(), Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu)))],
        &Metadata::new(),
    )
    .expect("input");
    let f = tmp.path().join("f.safetensors");
    let out = worker(&["encode", "--weights", path_arg(&bad), "--input", path_arg(&x), "--output", path_arg(&f)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad weights accepted");
    for needle in [
        "1 missing, 1 unexpected and 1 mis-shaped",
        "layer1.0.bn3.running_mean [64]",
        "classifier.weight [10, 120]",
        "stage4.0.branches.3.0.conv2.weight: expected [64, 64, 3, 3], found [64, 32, 3, 3]",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    assert!(!f.exists(), "no output on error");

    // Wrong channel count for the depth encoder.
    let rgb_like = tmp.path().join("rgb_input.safetensors");
    weights::write(
        &rgb_like,
        &[("x".into(), Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)))],
        &Metadata::new(),
    )
    .expect("input");
    let out =
        worker(&["encode", "--weights", path_arg(&good), "--input", path_arg(&rgb_like), "--output", path_arg(&f)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("3 channels, the depth encoder takes 1"), "{stderr}");
    // The good pair works.
    let out = worker(&["encode", "--weights", path_arg(&good), "--input", path_arg(&x), "--output", path_arg(&f)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (maps, _) = weights::read(&f).expect("features");
    assert_eq!(
        maps.iter().map(|(_, t)| t.size()).collect::<Vec<_>>(),
        [vec![1, 8, 8, 8], vec![1, 16, 4, 4], vec![1, 32, 2, 2], vec![1, 64, 1, 1]]
    );
}

/// The other direction: weights made and trained (BatchNorm statistics) by timm initialise our RGB
/// backbone through `model.init_rgb_backbone`'s loader, and our forward pass then gives timm's four
/// branch maps; a state dict for the wrong architecture is refused, naming the tensors.
#[test]
fn timm_weights_initialise_our_rgb_backbone() {
    let python = venv_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = hcmoco_tests::crate_file("python/timm_weights.py");
    let out = Command::new(&python).arg(&script).arg(tmp.path()).output().expect("run python");
    assert!(out.status.success(), "timm_weights.py failed: {}", String::from_utf8_lossy(&out.stderr));

    let mut cfg = job("hrnet_w18", Upsample::Nearest).model;
    cfg.embed_dim = 16;
    let model =
        hcmoco_worker::model::Model::new(&cfg, hcmoco_data::KeypointLayout::Mpii16, 0, Device::Cpu).expect("model");
    model.load_backbone(ImageModality::Rgb, &tmp.path().join("timm_state.safetensors")).expect("timm weights load");
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(tmp.path().join("timm_io.safetensors")).expect("timm outputs").into_iter().collect();
    let maps = tch::no_grad(|| model.rgb.branches(&io["input"], false));
    for (i, ours) in maps.iter().enumerate() {
        let theirs = &io[&format!("branch{}", i + 1)];
        assert_eq!(ours.size(), theirs.size(), "branch {}", i + 1);
        let diff = (ours - theirs).abs().max().double_value(&[]);
        let scale = theirs.abs().max().double_value(&[]);
        assert!(scale > 1e-3, "branch {}: timm's map is trivially small", i + 1);
        assert!(diff <= 1e-5 * scale, "branch {}: max abs diff {diff:e} (max |x| {scale:e})", i + 1);
    }
    // The depth backbone has one input channel: timm's RGB stem is refused by name.
    let err =
        model.load_backbone(ImageModality::Depth, &tmp.path().join("timm_state.safetensors")).expect_err("3 channels");
    assert!(format!("{err:#}").contains("conv1.weight"), "{err:#}");
}
