//! Our encoders and the PyTorch reference (`tests/python/reference`) compute the same thing: the same
//! weights, loaded on both sides from one safetensors file written by `VarStore::save`, give the same
//! outputs in training and evaluation mode, the same parameter gradients and the same updated BatchNorm
//! statistics (`num_batches_tracked` included), in f64 to a relative 1e-9.
//!
//! The two sides are written independently: this cross-checks the SemGCN keypoint encoder, the HRNet
//! backbone (both fuse-layer upsampling modes) and the whole model with its heads, and proves that the
//! reference's `state_dict()` names are our variable names (the weights load with `strict=True`).
//!
//! Needs the venv that `scripts/setup.sh` builds (torch, safetensors): `$HCMOCO_VENV`, or
//! `~/.cache/hcmoco/venv-torch-2.11.0`. Without it the test fails and says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hcmoco_data::KeypointLayout;
use hcmoco_proto::config::{Dtype, ModelConfig, Norm};
use hcmoco_tests::venv_python;
use hcmoco_worker::hrnet::{HrNet, HrNetSpec, Upsample};
use hcmoco_worker::model::Model;
use hcmoco_worker::semgcn::SemGcn;
use serde_json::{Value, json};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Relative tolerance of every comparison (f64 on both sides).
const TOL: f64 = 1e-9;

fn script() -> PathBuf {
    hcmoco_tests::crate_file("python/model_parity.py")
}

fn norm_name(norm: Norm) -> &'static str {
    match norm {
        Norm::Batch => "batch",
        Norm::Group => "group",
        Norm::None => "none",
    }
}

/// Replaces the initial values with random ones of a useful scale, so that no comparison is trivially
/// small (HRNet's convolutions start at std 0.001) and evaluation mode uses non-trivial statistics.
fn randomize(vs: &VarStore) {
    let opts = (Kind::Double, Device::Cpu);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let size = t.size();
            let leaf = name.rsplit('.').next().unwrap_or_default();
            let new = if leaf == "num_batches_tracked" {
                Tensor::full(size.as_slice(), 3, (t.kind(), Device::Cpu))
            } else if leaf == "e" {
                Tensor::randn(size.as_slice(), opts)
            } else if leaf == "W" {
                // SemGCN: 2 x in x out.
                Tensor::randn(size.as_slice(), opts) / (size[1] as f64).sqrt()
            } else if size.len() >= 2 {
                // Convolution / linear weights: out x in x ...
                let fan_in = size.iter().skip(1).product::<i64>() as f64;
                Tensor::randn(size.as_slice(), opts) / fan_in.sqrt()
            } else if leaf == "running_var" || (leaf == "weight" && size.len() == 1) {
                Tensor::rand(size.as_slice(), opts) + 0.5
            } else {
                Tensor::randn(size.as_slice(), opts) * 0.1
            };
            t.copy_(&new);
        }
    });
}

/// The variables of `vs`, contiguous on the CPU.
fn state(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write(path: &Path, tensors: &[(String, Tensor)]) {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, path).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Runs our side of one case and asks the reference to compare.
///
/// `forward(train)` returns the named outputs. Order: randomise and save the weights; forward in training
/// mode; backward of sum over outputs of sum(out * r) with random cotangents r; save the variables (the
/// running statistics have moved); forward in evaluation mode.
fn check(
    case: &str,
    module: &str,
    args: Value,
    vs: &VarStore,
    inputs: &[(&str, &Tensor)],
    forward: &dyn Fn(bool) -> Vec<(String, Tensor)>,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let weights = dir.path().join("weights.safetensors");
    let after = dir.path().join("after.safetensors");
    let io_path = dir.path().join("io.safetensors");
    randomize(vs);
    vs.save(&weights).expect("save weights");

    let mut io: Vec<(String, Tensor)> = inputs.iter().map(|(n, t)| (format!("in.{n}"), t.contiguous())).collect();
    let outs = forward(true);
    let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
    for (name, y) in &outs {
        let r = Tensor::randn(y.size().as_slice(), (Kind::Double, Device::Cpu));
        loss += (y * &r).sum(Kind::Double);
        io.push((format!("train.{name}"), y.detach().contiguous()));
        io.push((format!("r.{name}"), r));
    }
    loss.backward();
    let mut grads = 0;
    for (name, t) in vs.variables() {
        if t.requires_grad() {
            let g = t.grad();
            let g = if g.defined() { g.contiguous() } else { t.zeros_like() };
            io.push((format!("grad.{name}"), g));
            grads += 1;
        }
    }
    write(&after, &state(vs));
    let outs = tch::no_grad(|| forward(false));
    for (name, y) in &outs {
        io.push((format!("eval.{name}"), y.contiguous()));
    }
    write(&io_path, &io);

    let case_file = dir.path().join("case.json");
    let spec = json!({
        "module": module,
        "args": args,
        "weights": weights,
        "after": after,
        "io": io_path,
        "tol": TOL,
    });
    std::fs::write(&case_file, spec.to_string()).expect("write case");
    let out = Command::new(venv_python()).arg(script()).arg(&case_file).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{case}: the reference disagrees (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{case}: report {e}: {stdout}"));
    assert_eq!(report["ok"], Value::Bool(true), "{case}: {report}");
    // Every output twice (train, eval), every gradient, every variable: nothing skipped.
    let checked = report["checked"].as_u64().expect("checked");
    let want = 2 * outs.len() + grads + vs.variables().len();
    assert_eq!(checked, want as u64, "{case}: the reference compared {checked} tensors, expected {want}: {report}");
    eprintln!("{case}: {checked} tensors agree; worst relative errors {}", report["worst"]);
}

fn double_store() -> VarStore {
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    vs
}

#[test]
fn semgcn_matches_pytorch() {
    let cases = [
        (KeypointLayout::Mpii16, Norm::Batch, "mpii16"),
        (KeypointLayout::Coco13, Norm::Group, "coco13"),
        (KeypointLayout::Mpii16, Norm::None, "mpii16"),
    ];
    for (layout, norm, layout_name) in cases {
        let (hidden, out, blocks, groups) = (12, 8, 2, 4);
        let vs = double_store();
        let gcn = SemGcn::new(vs.root(), layout, hidden, out, blocks, norm, groups);
        let j = layout.num_joints() as i64;
        let x = Tensor::rand([5, j, 2], (Kind::Double, Device::Cpu)) * 2.0 - 1.0;
        let args = json!({
            "layout": layout_name, "hidden": hidden, "out": out, "blocks": blocks,
            "norm": norm_name(norm), "groups": groups,
        });
        let case = format!("semgcn {layout} {}", norm_name(norm));
        check(&case, "semgcn", args, &vs, &[("x", &x)], &|train| vec![("y".into(), gcn.forward_t(&x, train))]);
    }
}

#[test]
fn hrnet_small_matches_pytorch() {
    let spec = HrNetSpec::small();
    let cases =
        [(Norm::Batch, Upsample::Bilinear), (Norm::Batch, Upsample::Nearest), (Norm::Group, Upsample::Bilinear)];
    for (norm, upsample) in cases {
        let vs = double_store();
        let groups = 4;
        let net = HrNet::new(vs.root(), &spec, 3, norm, groups, upsample);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Double, Device::Cpu));
        let args = json!({
            "preset": spec.name, "in_channels": 3, "norm": norm_name(norm), "groups": groups,
            "upsample": upsample.as_str(),
        });
        let case = format!("{} {} {upsample}", spec.name, norm_name(norm));
        check(&case, "hrnet", args, &vs, &[("x", &x)], &|train| {
            net.forward_t(&x, train).into_iter().enumerate().map(|(i, t)| (format!("b{i}"), t)).collect()
        });
    }
}

#[test]
fn whole_model_matches_pytorch() {
    let cfg = ModelConfig {
        backbone: "hrnet_small".into(),
        upsample: "bilinear".into(),
        embed_dim: 16,
        keypoint_hidden: 12,
        keypoint_blocks: 2,
        norm: Norm::Batch,
        groups: 4,
        dtype: Dtype::F64,
        ..Default::default()
    };
    let layout = KeypointLayout::Coco13;
    let model = Model::new(&cfg, layout, 11, Device::Cpu).expect("model");
    let opts = (Kind::Double, Device::Cpu);
    let rgb = Tensor::randn([2, 3, 64, 64], opts);
    let depth = Tensor::randn([2, 1, 64, 64], opts);
    let kp = Tensor::rand([2, 13, 2], opts) * 2.0 - 1.0;
    let args = json!({
        "backbone": cfg.backbone, "layout": "coco13", "embed_dim": cfg.embed_dim,
        "keypoint_hidden": cfg.keypoint_hidden, "keypoint_blocks": cfg.keypoint_blocks,
        "norm": norm_name(cfg.norm), "groups": cfg.groups, "upsample": cfg.upsample,
    });
    let forward = |train: bool| {
        let mut outs: HashMap<&str, Tensor> = HashMap::new();
        let maps = model.rgb.branches(&rgb, train);
        outs.insert("z_rgb", model.rgb.global(&maps));
        outs.insert("dense_rgb", model.rgb.dense(&maps));
        let maps = model.depth.branches(&depth, train);
        outs.insert("z_depth", model.depth.global(&maps));
        outs.insert("dense_depth", model.depth.dense(&maps));
        let (z, g) = model.kp.forward_t(&kp, train);
        outs.insert("z_kp", z);
        outs.insert("g_kp", g);
        outs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    check(
        "model hrnet_small",
        "model",
        args,
        &model.vs,
        &[("rgb", &rgb), ("depth", &depth), ("keypoints", &kp)],
        &forward,
    );
}
