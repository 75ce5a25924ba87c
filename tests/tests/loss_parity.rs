//! The objective against an independent PyTorch reference (`tests/python/reference/losses.py`, run by
//! `tests/python/loss_parity.py` with the installed torch): `hcmoco-worker loss-eval` and the reference
//! agree on every term and every gradient (f64 to 1e-9, fp32 to a relative 1e-4), and so does the
//! memory-bank variant (terms, gradients, updated banks). Bad inputs are refused naming the tensor.
//!
//! Needs `hcmoco-worker` built (`cargo build -p hcmoco-worker`) and the venv of `scripts/setup.sh`
//! (`$HCMOCO_VENV`, or `~/.cache/hcmoco/venv-torch-2.11.0`); without the venv the Python comparisons
//! fail, saying where they looked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hcmoco_tests::{bin, venv_python};
use hcmoco_worker::loss::{MemoryBank, Modality, TERMS};
use tch::{Device, Kind, Tensor};

const B: i64 = 6;
const J: i64 = 16;
const D: i64 = 128;
const H: i64 = 8;
const W: i64 = 8;
const P: i64 = 12;

fn script() -> PathBuf {
    hcmoco_tests::crate_file("python/loss_parity.py")
}

/// splitmix64, for inputs that do not depend on libtorch's global generator (tests run in parallel).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn below(&mut self, n: i64) -> i64 {
        (self.next() % n as u64) as i64
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below(hi - lo)
    }
    fn normal(&mut self, n: i64) -> Vec<f64> {
        (0..n)
            .map(|_| (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos())
            .collect()
    }
    fn randn(&mut self, shape: &[i64]) -> Tensor {
        Tensor::from_slice(&self.normal(shape.iter().product())).view(shape)
    }
}

const HAS_DEPTH: [u8; 6] = [1, 0, 1, 1, 0, 1];

/// The loss-eval inputs in f64: samples 1 and 4 without depth (their depth rows hold NaN, their
/// pixel_idx rows garbage), sample 2 (with depth) has every joint invisible, sample 3 (with depth) a
/// single visible joint; invisible joints' cells may lie outside the map; repeated DICL cells.
fn eval_inputs(seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng(seed);
    let no_depth: Vec<i64> = (0..B).filter(|&s| HAS_DEPTH[s as usize] == 0).collect();
    let poison = |t: Tensor| {
        for &s in &no_depth {
            let _ = t.get(s).fill_(f64::NAN);
        }
        t
    };
    let mut vis = vec![0u8; (B * J) as usize];
    for s in 0..B {
        for j in 0..J {
            vis[(s * J + j) as usize] = match s {
                2 => 0,
                3 => u8::from(j == 5),
                _ => u8::from(rng.uniform() < 0.7),
            };
        }
    }
    let mut cells = Vec::with_capacity((B * J * 2) as usize);
    for &v in &vis {
        if v == 1 {
            cells.extend([rng.below(H), rng.below(W)]);
        } else {
            cells.extend([rng.range(-4, H + 4), rng.range(-4, W + 4)]);
        }
    }
    let mut pixel_idx = Vec::with_capacity((B * P) as usize);
    for s in 0..B {
        let mut row: Vec<i64> =
            (0..P).map(|_| if HAS_DEPTH[s as usize] == 1 { rng.below(H * W) } else { rng.range(-100, 100) }).collect();
        row[3] = row[0];
        row[7] = row[0];
        row[9] = row[8];
        pixel_idx.extend(row);
    }
    vec![
        ("z_rgb".into(), rng.randn(&[B, D])),
        ("z_depth".into(), poison(rng.randn(&[B, D]))),
        ("z_kp".into(), rng.randn(&[B, D])),
        ("has_depth".into(), Tensor::from_slice(&HAS_DEPTH)),
        ("dense_rgb".into(), rng.randn(&[B, D, H, W])),
        ("dense_depth".into(), poison(rng.randn(&[B, D, H, W]))),
        ("pixel_idx".into(), Tensor::from_slice(&pixel_idx).view([B, P])),
        ("g_kp".into(), rng.randn(&[B, J, D])),
        ("joint_cells".into(), Tensor::from_slice(&cells).view([B, J, 2])),
        ("joint_vis".into(), Tensor::from_slice(&vis).view([B, J])),
    ]
}

fn to_float(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named
        .iter()
        .map(|(n, t)| (n.clone(), if t.kind() == Kind::Double { t.to_kind(Kind::Float) } else { t.shallow_clone() }))
        .collect()
}

fn write(named: &[(String, Tensor)], path: &Path) {
    Tensor::write_safetensors(named, path).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn loss_eval(input: &Path, output: &Path) -> Output {
    run(Command::new(bin("hcmoco-worker")).arg("loss-eval").arg("--input").arg(input).arg("--output").arg(output))
}

fn reference(python: &Path, mode: &str, input: &Path, output: &Path) {
    let out = run(Command::new(python).arg(script()).arg(mode).arg(input).arg(output));
    assert!(out.status.success(), "loss_parity.py {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// How close two outputs must be.
#[derive(Clone, Copy)]
enum Tolerance {
    /// Elementwise `|ours - ref| <= tol * max(1, |ref|)`.
    AbsOrRel(f64),
    /// `max |ours - ref| <= tol * max |ref|` per tensor.
    RelToMax(f64),
}

/// Same names, shapes and dtype (`kind`); values within `tol`; nothing NaN.
fn compare(ours: &[(String, Tensor)], theirs: &[(String, Tensor)], kind: Kind, tol: Tolerance, what: &str) {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(ours), names(theirs), "{what}: output names");
    for ((name, a), (_, b)) in ours.iter().zip(theirs) {
        assert_eq!(a.size(), b.size(), "{what}: {name} shape");
        assert_eq!(a.kind(), kind, "{what}: {name} dtype (ours)");
        assert_eq!(b.kind(), kind, "{what}: {name} dtype (reference)");
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        assert_eq!(a.isnan().sum(Kind::Int64).int64_value(&[]), 0, "{what}: {name} has NaN (ours)");
        assert_eq!(b.isnan().sum(Kind::Int64).int64_value(&[]), 0, "{what}: {name} has NaN (reference)");
        let diff = (&a - &b).abs();
        let worst = diff.max().double_value(&[]);
        let ok = match tol {
            Tolerance::AbsOrRel(t) => {
                (&diff - b.abs().clamp_min(1.0) * t).max().double_value(&[]) <= 0.0 || a.numel() == 0
            }
            Tolerance::RelToMax(t) => worst <= t * b.abs().max().double_value(&[]),
        };
        assert!(
            ok,
            "{what}: {name} differs: max |ours - reference| = {worst:e} (reference max |x| = {:e})",
            b.abs().max().double_value(&[])
        );
    }
}

fn value(named: &[(String, Tensor)], name: &str) -> f64 {
    named.iter().find(|(n, _)| n == name).map(|(_, t)| t.double_value(&[])).unwrap_or_else(|| panic!("no {name}"))
}

/// One comparison: its name, the inputs, the dtype of the outputs and the tolerance.
type Case = (&'static str, Vec<(String, Tensor)>, Kind, Tolerance);

#[test]
fn loss_eval_matches_the_pytorch_reference() {
    let python = venv_python();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [Case; 3] = [
        ("f64", eval_inputs(1), Kind::Double, Tolerance::AbsOrRel(1e-9)),
        ("fp32", to_float(&eval_inputs(2)), Kind::Float, Tolerance::RelToMax(1e-4)),
        (
            // Samples 2 and 3 (fewer than 2 visible joints) without the keypoint modality.
            "f64 with has_kp",
            {
                let mut v = eval_inputs(3);
                v.push(("has_kp".into(), Tensor::from_slice(&[1u8, 1, 0, 0, 1, 1])));
                v
            },
            Kind::Double,
            Tolerance::AbsOrRel(1e-9),
        ),
    ];
    for (i, (what, inputs, kind, tol)) in cases.into_iter().enumerate() {
        let input = dir.path().join(format!("in-{i}.safetensors"));
        let ours_path = dir.path().join(format!("ours-{i}.safetensors"));
        let ref_path = dir.path().join(format!("ref-{i}.safetensors"));
        write(&inputs, &input);
        let out = loss_eval(&input, &ours_path);
        assert!(out.status.success(), "{what}: loss-eval failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("loss_total "), "{what}: values on stdout");
        reference(&python, "eval", &input, &ref_path);
        let (ours, theirs) = (read(&ours_path), read(&ref_path));
        compare(&ours, &theirs, kind, tol, what);
        // Every term has anchors here (the batch has samples with depth and visible joints).
        for (name, t) in &ours {
            if name.starts_with("loss_") {
                assert!(t.double_value(&[]) > 0.0, "{what}: {name} = {}", t.double_value(&[]));
            }
        }
        assert_eq!(ours.len(), 11 + 1 + 6, "{what}: eleven terms, the total and six gradients");
    }
}

#[test]
fn loss_eval_refuses_bad_inputs_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("out.safetensors");
    let check = |inputs: Vec<(String, Tensor)>, must: &[&str]| {
        let input = dir.path().join("in.safetensors");
        write(&inputs, &input);
        let out = loss_eval(&input, &output);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted bad inputs (expected an error mentioning {must:?})");
        for m in must {
            assert!(stderr.contains(m), "error does not mention {m:?}: {stderr}");
        }
    };
    let without = |name: &str| eval_inputs(4).into_iter().filter(|(n, _)| n != name).collect::<Vec<_>>();
    let replaced = |name: &str, t: Tensor| {
        eval_inputs(4).into_iter().map(|(n, v)| if n == name { (n, t.shallow_clone()) } else { (n, v) }).collect()
    };
    check(without("g_kp"), &["missing input g_kp", "[B, J, D]"]);
    check(without("joint_vis"), &["missing input joint_vis"]);
    check(
        replaced("joint_cells", Tensor::zeros([B, J, 3], (Kind::Int64, Device::Cpu))),
        &["joint_cells", "[6, 16, 2]"],
    );
    check(
        replaced("dense_depth", Tensor::zeros([B, D, H, W + 1], (Kind::Double, Device::Cpu))),
        &["dense_depth", "[6, 128, 8, 8]"],
    );
    check(
        replaced("has_depth", Tensor::from_slice(&HAS_DEPTH).to_kind(Kind::Int64)),
        &["has_depth", "dtype int64", "uint8"],
    );
    check(replaced("z_kp", Tensor::zeros([B, D], (Kind::Float, Device::Cpu))), &["z_kp", "dtype float32", "float64"]);
}

/// Sample ids of the memory-bank case (repeats allowed: one sample in several slots) and, per id, its
/// modalities.
const IDS: [i64; 8] = [3, 7, 3, 0, 12, 7, 20, 5];
const N: i64 = 30;
const BANK_D: i64 = 16;
const K: usize = 5;

#[test]
fn memory_bank_matches_the_pytorch_reference() {
    let python = venv_python();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = IDS.len();
    let depth_ids = [0i64, 3, 9, 15, 18, 20, 21];
    let has_depth: Vec<bool> = IDS.iter().map(|y| depth_ids.contains(y)).collect();
    let has_kp: Vec<bool> = IDS.iter().map(|&y| y != 12 && y != 13).collect();
    let eligible: [Vec<i64>; 3] =
        [(0..N).collect(), depth_ids.to_vec(), (0..N).filter(|&y| y != 12 && y != 13).collect()];
    let has = [vec![true; b], has_depth.clone(), has_kp.clone()];

    let mut rng = Rng(9);
    let bank = MemoryBank::new(N, BANK_D, 5, Kind::Double, Device::Cpu);
    let z: [Tensor; 3] = std::array::from_fn(|m| {
        let t = rng.randn(&[b as i64, BANK_D]);
        for (s, _) in has[m].iter().enumerate().filter(|(_, h)| !**h) {
            let _ = t.get(s as i64).fill_(f64::NAN); // never read
        }
        t.set_requires_grad(true)
    });
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    let mut ours: Vec<(String, Tensor)> = Vec::new();
    let mod_name = ["rgb", "depth", "kp"];
    for ((name, m_bank), m_z) in mod_name.iter().zip(&bank.banks).zip(&z) {
        inputs.push((format!("bank_{name}"), m_bank.copy()));
        inputs.push((format!("z_{name}"), m_z.detach().copy()));
    }
    let flags = |v: &[bool]| Tensor::from_slice(&v.iter().map(|&x| u8::from(x)).collect::<Vec<u8>>());
    inputs.push(("has_depth".into(), flags(&has_depth)));
    inputs.push(("has_kp".into(), flags(&has_kp)));
    inputs.push(("ids".into(), Tensor::from_slice(&IDS)));

    let mut total = Tensor::zeros([], (Kind::Double, Device::Cpu));
    for (t, &(name, a, bm)) in TERMS.iter().enumerate() {
        let rows: Vec<usize> = (0..b).filter(|&s| has[a as usize][s] && has[bm as usize][s]).collect();
        let ids: Vec<i64> = rows.iter().map(|&s| IDS[s]).collect();
        let negs: Vec<i64> = rows
            .iter()
            .flat_map(|&s| MemoryBank::negatives(11 ^ t as u64, 1, s as u64, &eligible[bm as usize], IDS[s], K))
            .collect();
        let negs = Tensor::from_slice(&negs).view([rows.len() as i64, K as i64]);
        let idx = Tensor::from_slice(&rows.iter().map(|&s| s as i64).collect::<Vec<_>>());
        let share = bank.share(a, bm, &z[a as usize].index_select(0, &idx), &ids, &negs, 0.07, rows.len());
        ours.push((format!("loss_{name}"), share.detach().copy()));
        inputs.push((format!("neg_{name}"), negs));
        total += share;
    }
    let grads = Tensor::run_backward(&[&total], &z, false, false);
    ours.push(("loss_total".into(), total.detach().copy()));
    for (m, g) in grads.into_iter().enumerate() {
        let g = if g.defined() { g } else { z[m].zeros_like() };
        ours.push((format!("grad_z_{}", mod_name[m]), g));
    }
    let mut updated = MemoryBank { banks: std::array::from_fn(|m| bank.banks[m].copy()) };
    for (m, modality) in [Modality::Rgb, Modality::Depth, Modality::Keypoints].into_iter().enumerate() {
        let rows: Vec<i64> = (0..b).filter(|&s| has[m][s]).map(|s| s as i64).collect();
        let ids: Vec<i64> = rows.iter().map(|&s| IDS[s as usize]).collect();
        updated.update(modality, &ids, &z[m].index_select(0, &Tensor::from_slice(&rows)));
    }
    for (name, m) in mod_name.iter().zip(&updated.banks) {
        ours.push((format!("new_bank_{name}"), m.copy()));
    }
    ours.sort_by(|a, b| a.0.cmp(&b.0));

    let input = dir.path().join("bank-in.safetensors");
    let ref_path = dir.path().join("bank-ref.safetensors");
    write(&inputs, &input);
    reference(&python, "bank", &input, &ref_path);
    let theirs = read(&ref_path);
    compare(&ours, &theirs, Kind::Double, Tolerance::AbsOrRel(1e-9), "memory bank");
    // The update is the same arithmetic row by row: agreement to rounding.
    for (m, short) in mod_name.iter().enumerate() {
        let name = format!("new_bank_{short}");
        let get = |v: &[(String, Tensor)]| v.iter().find(|(n, _)| *n == name).map(|(_, t)| t.copy()).expect("bank");
        let worst = (get(&ours) - get(&theirs)).abs().max().double_value(&[]);
        assert!(worst < 1e-14, "{name}: max difference {worst:e}");
        assert!(!get(&ours).equal(&bank.banks[m]), "{name} unchanged by the update");
    }
    assert!(value(&ours, "loss_total") > 0.0);
}
