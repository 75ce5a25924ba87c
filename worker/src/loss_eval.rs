//! `hcmoco-worker loss-eval`: the in-batch objective of the method page (stage 2: every term) on given
//! features, as one process holding the whole batch, with the gradients of the total. It lets anyone
//! check another implementation of the objective against ours (docs/loss-eval.md). The objective is
//! the code that trains: `objective::Assembly::run`, the assembly `Trainer::step` runs, in a world of one.
//!
//! Inputs (B samples, D features (128 in the model), J joints, an h x w dense map, P cells), all float
//! inputs in one dtype, float32 or float64 (the outputs follow it):
//! `z_rgb`, `z_depth`, `z_kp` B x D; `has_depth` uint8 B; `dense_rgb`, `dense_depth` B x D x h x w;
//! `pixel_idx` int64 B x P; `g_kp` B x J x D; `joint_cells` int64 B x J x 2; `joint_vis` uint8 B x J;
//! optionally `has_kp` uint8 B (default: every sample has keypoints).
//! Outputs: the eleven terms, `loss_total`, and `grad_<input>` for the six float inputs.

use std::path::Path;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::comm::{CpuOptions, connect_cpu_alone};
use crate::loss::{TERMS, cell_features};
use crate::objective::{Assembly, DenseForward, Forward};
use crate::train::{Objective, StepError, Variant};

/// Names of the required inputs, in the order they are checked.
pub const REQUIRED: [&str; 10] = [
    "z_rgb",
    "z_depth",
    "z_kp",
    "has_depth",
    "dense_rgb",
    "dense_depth",
    "pixel_idx",
    "g_kp",
    "joint_cells",
    "joint_vis",
];

/// The optional input: per-sample keypoint presence for the six sample-level terms.
pub const OPTIONAL: [&str; 1] = ["has_kp"];

/// Names of the eleven term outputs, in the order they are summed into `loss_total`.
pub const TERM_OUTPUTS: [&str; 11] = [
    "loss_rgb_depth",
    "loss_depth_rgb",
    "loss_depth_kp",
    "loss_kp_depth",
    "loss_rgb_kp",
    "loss_kp_rgb",
    "loss_dicl_r2d",
    "loss_dicl_d2r",
    "loss_sscl_r2k",
    "loss_sscl_d2k",
    "loss_sscl_cross",
];

/// The float inputs that get a `grad_<name>` output.
pub const GRAD_INPUTS: [&str; 6] = ["z_rgb", "z_depth", "z_kp", "dense_rgb", "dense_depth", "g_kp"];

/// What is wrong with a loss-eval run. Every input error names the tensor and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum LossEvalError {
    #[error("cannot read {path}")]
    Read { path: String, source: tch::TchError },
    #[error("cannot write {path}")]
    Write { path: String, source: tch::TchError },
    #[error("missing input {}: expected {}", names.join(", "), expected.join("; "))]
    Missing { names: Vec<String>, expected: Vec<String> },
    #[error("unknown input {} (the inputs are {} and optionally {})", names.join(", "), REQUIRED.join(", "), OPTIONAL.join(", "))]
    Unknown { names: Vec<String> },
    #[error("input {name}: dtype {got}, expected {expected}")]
    Dtype { name: String, got: String, expected: String },
    #[error("input {name}: shape {got:?}, expected {expected}")]
    Shape { name: String, got: Vec<i64>, expected: String },
    #[error("input {name}: {detail}")]
    Value { name: String, detail: String },
    #[error("evaluating the objective failed")]
    Objective(#[source] StepError),
}

/// The validated inputs, on the CPU.
#[derive(Debug)]
pub struct Inputs {
    /// B x D each (before normalisation).
    pub z_rgb: Tensor,
    pub z_depth: Tensor,
    pub z_kp: Tensor,
    pub has_depth: Vec<bool>,
    pub has_kp: Vec<bool>,
    /// B x D x h x w each (before normalisation).
    pub dense_rgb: Tensor,
    pub dense_depth: Tensor,
    /// B x P flat cell indices `row * w + col` (rows of samples without depth are not read).
    pub pixel_idx: Tensor,
    /// B x J x D (before normalisation).
    pub g_kp: Tensor,
    /// B x J x 2 `(row, col)`, with the cells of invisible joints replaced by (0, 0) (never read).
    pub joint_cells: Tensor,
    /// B x J.
    pub joint_vis: Vec<bool>,
    pub joints: i64,
}

fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "float32".into(),
        Kind::Double => "float64".into(),
        Kind::Uint8 => "uint8".into(),
        Kind::Int64 => "int64".into(),
        Kind::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What an input must look like, as said in errors: `(dtype, shape with the sizes known so far)`.
fn describe(name: &str) -> String {
    let (dtype, shape) = match name {
        "z_rgb" | "z_depth" | "z_kp" => ("float32 or float64", "[B, D] (D = 128 in the model)"),
        "has_depth" | "has_kp" => ("uint8 0/1", "[B]"),
        "dense_rgb" | "dense_depth" => ("float32 or float64", "[B, D, h, w]"),
        "pixel_idx" => ("int64", "[B, P]"),
        "g_kp" => ("float32 or float64", "[B, J, D]"),
        "joint_cells" => ("int64", "[B, J, 2]"),
        "joint_vis" => ("uint8 0/1", "[B, J]"),
        _ => ("?", "?"),
    };
    format!("{name} {dtype} {shape}")
}

/// Takes one named input out of `tensors`, checking its dtype and its shape against `shape` (`None`
/// for a size not known yet, which the caller then reads off the tensor).
fn take(
    tensors: &mut Vec<(String, Tensor)>,
    name: &str,
    kind: Kind,
    kind_rule: &str,
    shape: &[Option<i64>],
    shape_rule: &str,
) -> Result<Tensor, LossEvalError> {
    let at = tensors
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| LossEvalError::Missing { names: vec![name.into()], expected: vec![describe(name)] })?;
    let (_, t) = tensors.swap_remove(at);
    if t.kind() != kind {
        return Err(LossEvalError::Dtype {
            name: name.into(),
            got: kind_name(t.kind()),
            expected: format!("{}{kind_rule}", kind_name(kind)),
        });
    }
    let got = t.size();
    let fits = got.len() == shape.len() && got.iter().zip(shape).all(|(g, s)| s.is_none_or(|s| s == *g));
    if !fits {
        let want: Vec<String> = shape.iter().map(|s| s.map_or("_".into(), |v| v.to_string())).collect();
        return Err(LossEvalError::Shape {
            name: name.into(),
            got,
            expected: format!("[{}]{shape_rule}", want.join(", ")),
        });
    }
    Ok(t)
}

/// 0/1 flags of a uint8 tensor.
fn flags(t: &Tensor, name: &str) -> Result<Vec<bool>, LossEvalError> {
    let v = Vec::<u8>::try_from(&t.reshape([-1]))
        .map_err(|e| LossEvalError::Value { name: name.into(), detail: format!("unreadable: {e}") })?;
    if let Some(i) = v.iter().position(|&x| x > 1) {
        return Err(LossEvalError::Value {
            name: name.into(),
            detail: format!("element {i} (flat) is {}, expected 0 or 1", v[i]),
        });
    }
    Ok(v.into_iter().map(|x| x == 1).collect())
}

fn int64s(t: &Tensor, name: &str) -> Result<Vec<i64>, LossEvalError> {
    Vec::<i64>::try_from(&t.reshape([-1]))
        .map_err(|e| LossEvalError::Value { name: name.into(), detail: format!("unreadable: {e}") })
}

impl Inputs {
    /// Validates named tensors (as read from a safetensors file): every required input present, no
    /// unknown one, dtypes and shapes consistent, flags 0/1, the cells that are read inside the map.
    pub fn from_named(mut tensors: Vec<(String, Tensor)>) -> Result<Inputs, LossEvalError> {
        let missing: Vec<String> =
            REQUIRED.iter().filter(|n| !tensors.iter().any(|(t, _)| t == *n)).map(|n| n.to_string()).collect();
        if !missing.is_empty() {
            let expected = missing.iter().map(|n| describe(n)).collect();
            return Err(LossEvalError::Missing { names: missing, expected });
        }
        let mut unknown: Vec<String> = tensors
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !REQUIRED.contains(&n.as_str()) && !OPTIONAL.contains(&n.as_str()))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(LossEvalError::Unknown { names: unknown });
        }
        for (_, t) in tensors.iter_mut() {
            *t = t.to_device(Device::Cpu).contiguous();
        }

        // z_rgb fixes B, D and the float dtype.
        let z_rgb = {
            let (_, t) = tensors.iter().find(|(n, _)| n == "z_rgb").expect("checked present");
            let size = t.size();
            if !matches!(t.kind(), Kind::Float | Kind::Double) {
                return Err(LossEvalError::Dtype {
                    name: "z_rgb".into(),
                    got: kind_name(t.kind()),
                    expected: "float32 (or float64: every float input in the same dtype)".into(),
                });
            }
            if size.len() != 2 || size[1] == 0 {
                return Err(LossEvalError::Shape {
                    name: "z_rgb".into(),
                    got: size,
                    expected: "[B, D] (B samples, D > 0 features; D = 128 in the model)".into(),
                });
            }
            let kind = t.kind();
            take(&mut tensors, "z_rgb", kind, "", &[None, None], "")?
        };
        let float = z_rgb.kind();
        let (b, d) = (z_rgb.size()[0], z_rgb.size()[1]);
        let like = " (every float input has z_rgb's dtype)";
        let z_depth = take(&mut tensors, "z_depth", float, like, &[Some(b), Some(d)], " (like z_rgb)")?;
        let z_kp = take(&mut tensors, "z_kp", float, like, &[Some(b), Some(d)], " (like z_rgb)")?;
        let has_depth_t = take(&mut tensors, "has_depth", Kind::Uint8, " (0/1)", &[Some(b)], " (B from z_rgb)")?;
        let dense_rgb =
            take(&mut tensors, "dense_rgb", float, like, &[Some(b), Some(d), None, None], " ([B, D, h, w])")?;
        let (h, w) = (dense_rgb.size()[2], dense_rgb.size()[3]);
        if h == 0 || w == 0 {
            return Err(LossEvalError::Shape {
                name: "dense_rgb".into(),
                got: dense_rgb.size(),
                expected: "[B, D, h, w] with h, w > 0".into(),
            });
        }
        let dense_depth =
            take(&mut tensors, "dense_depth", float, like, &[Some(b), Some(d), Some(h), Some(w)], " (like dense_rgb)")?;
        let pixel_idx = take(&mut tensors, "pixel_idx", Kind::Int64, "", &[Some(b), None], " ([B, P])")?;
        let g_kp = take(&mut tensors, "g_kp", float, like, &[Some(b), None, Some(d)], " ([B, J, D])")?;
        let j = g_kp.size()[1];
        let joint_cells = take(
            &mut tensors,
            "joint_cells",
            Kind::Int64,
            "",
            &[Some(b), Some(j), Some(2)],
            " ([B, J, 2], J from g_kp)",
        )?;
        let joint_vis_t =
            take(&mut tensors, "joint_vis", Kind::Uint8, " (0/1)", &[Some(b), Some(j)], " ([B, J], J from g_kp)")?;
        let has_kp = if tensors.iter().any(|(n, _)| n == "has_kp") {
            flags(&take(&mut tensors, "has_kp", Kind::Uint8, " (0/1)", &[Some(b)], " (B from z_rgb)")?, "has_kp")?
        } else {
            vec![true; b as usize]
        };
        let has_depth = flags(&has_depth_t, "has_depth")?;
        let joint_vis = flags(&joint_vis_t, "joint_vis")?;

        // The cells that are read: pixel_idx of samples with depth, joint_cells of visible joints.
        let p = pixel_idx.size()[1];
        let idx = int64s(&pixel_idx, "pixel_idx")?;
        for (s, _) in has_depth.iter().enumerate().filter(|(_, h)| **h) {
            for (k, &c) in idx[s * p as usize..(s + 1) * p as usize].iter().enumerate() {
                if !(0..h * w).contains(&c) {
                    return Err(LossEvalError::Value {
                        name: "pixel_idx".into(),
                        detail: format!("sample {s} (has depth), cell {k}: {c}, expected 0..{} (h * w)", h * w),
                    });
                }
            }
        }
        let mut cells = int64s(&joint_cells, "joint_cells")?;
        for (i, &vis) in joint_vis.iter().enumerate() {
            let (row, col) = (cells[2 * i], cells[2 * i + 1]);
            if !vis {
                (cells[2 * i], cells[2 * i + 1]) = (0, 0);
            } else if !(0..h).contains(&row) || !(0..w).contains(&col) {
                return Err(LossEvalError::Value {
                    name: "joint_cells".into(),
                    detail: format!(
                        "sample {}, joint {} (visible): (row {row}, col {col}), expected inside the {h} x {w} map",
                        i as i64 / j,
                        i as i64 % j
                    ),
                });
            }
        }
        let joint_cells = Tensor::from_slice(&cells).view([b, j, 2]);
        Ok(Inputs {
            z_rgb,
            z_depth,
            z_kp,
            has_depth,
            has_kp,
            dense_rgb,
            dense_depth,
            pixel_idx,
            g_kp,
            joint_cells,
            joint_vis,
            joints: j,
        })
    }
}

/// Indices of the set flags.
fn where_set(v: &[bool]) -> Vec<i64> {
    v.iter().enumerate().filter(|(_, x)| **x).map(|(i, _)| i as i64).collect()
}

/// The outputs: the eleven terms (0-dim), `loss_total` (0-dim) and the six gradients, in the inputs'
/// float dtype. The objective is the one `Trainer::step` trains with (`objective::Assembly`), run
/// in a world of one on the given features instead of the encoders' outputs; the terms are summed in
/// float64, as the step sums them.
pub fn evaluate(inputs: &Inputs, tau: f64) -> Result<Vec<(String, Tensor)>, LossEvalError> {
    let kind = inputs.z_rgb.kind();
    let b = inputs.z_rgb.size()[0];
    let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
    let leaves: [Tensor; 6] = [
        leaf(&inputs.z_rgb),
        leaf(&inputs.z_depth),
        leaf(&inputs.z_kp),
        leaf(&inputs.dense_rgb),
        leaf(&inputs.dense_depth),
        leaf(&inputs.g_kp),
    ];
    let [z_rgb, z_depth, z_kp, dense_rgb, dense_depth, g_kp] = &leaves;

    // The features as the step's forward pass hands them over: depth rows of the samples with depth
    // only, and each joint's cell features.
    let depth_rows = where_set(&inputs.has_depth);
    let depth_idx = Tensor::from_slice(&depth_rows);
    let f_depth = (!depth_rows.is_empty()).then(|| dense_depth.index_select(0, &depth_idx));
    let cell_depth = f_depth.as_ref().map(|f| cell_features(f, &inputs.joint_cells.index_select(0, &depth_idx)));
    let fwd = Forward {
        z_rgb: z_rgb.shallow_clone(),
        z_depth: (!depth_rows.is_empty()).then(|| z_depth.index_select(0, &depth_idx)),
        z_kp: z_kp.shallow_clone(),
        dense: Some(DenseForward {
            cell_rgb: cell_features(dense_rgb, &inputs.joint_cells),
            f_rgb: dense_rgb.shallow_clone(),
            f_depth,
            g: g_kp.shallow_clone(),
            cell_depth,
        }),
    };
    // The per-sample fields the objective reads; DICL anchors on every sample with depth.
    let none = || Tensor::zeros([0], (kind, Device::Cpu));
    let batch = Batch {
        rgb: none(),
        depth: none(),
        keypoints: none(),
        has_depth: inputs.has_depth.clone(),
        has_keypoints: inputs.has_kp.clone(),
        ids: (0..b).collect(),
        slots: (0..b as u64).collect(),
        epoch: 0,
        joint_cells: inputs.joint_cells.shallow_clone(),
        joint_visible: inputs.joint_vis.clone(),
        dicl_rows: (0..depth_rows.len() as i64).collect(),
        dicl_cells: inputs.pixel_idx.index_select(0, &depth_idx),
        depth_rows,
    };
    let objective = Objective { stage: 2, variant: Variant::InBatch, temperature: tau, negatives: 0, seed: 0 };
    // A world of one: the same ring code, with no neighbour.
    let mut comm =
        connect_cpu_alone(&CpuOptions::default()).map_err(|e| LossEvalError::Objective(StepError::Comm(e)))?;
    let mut comm_time = Duration::ZERO;
    let assembly = Assembly { objective: &objective, banks: None, joints: inputs.joints };
    let assembled = assembly.run(&mut comm, &fwd, &batch, None, &mut comm_time).map_err(LossEvalError::Objective)?;

    let scalar = |v: f64| Tensor::from(v).to_kind(kind);
    let (terms, grads): (Vec<f64>, Vec<Tensor>) = match assembled {
        // No sample at all: nothing to read, every term 0.
        None => (vec![0.0; TERM_OUTPUTS.len()], leaves.iter().map(Tensor::zeros_like).collect()),
        Some(a) => {
            let terms = Vec::<f64>::try_from(&Tensor::cat(&a.values, 0).to_kind(Kind::Double))
                .map_err(|e| LossEvalError::Objective(StepError::Tensor(format!("reading the terms: {e}"))))?;
            let grads = if a.surrogate.requires_grad() {
                Tensor::run_backward(&[&a.surrogate], &leaves, false, false)
                    .into_iter()
                    .zip(&leaves)
                    .map(|(g, l)| if g.defined() { g } else { l.zeros_like() })
                    .collect()
            } else {
                leaves.iter().map(Tensor::zeros_like).collect()
            };
            (terms, grads)
        }
    };
    debug_assert!(TERMS.iter().zip(&TERM_OUTPUTS).all(|((n, _, _), o)| o.ends_with(n)));
    debug_assert_eq!(terms.len(), TERM_OUTPUTS.len());
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(TERM_OUTPUTS.len() + 1 + GRAD_INPUTS.len());
    for (name, &v) in TERM_OUTPUTS.iter().zip(&terms) {
        out.push((name.to_string(), scalar(v)));
    }
    out.push(("loss_total".into(), scalar(terms.iter().sum())));
    for (name, g) in GRAD_INPUTS.iter().zip(grads) {
        out.push((format!("grad_{name}"), g.detach().contiguous()));
    }
    Ok(out)
}

/// Reads `input`, evaluates, writes `output`; returns the term values and the total, by name.
pub fn run(input: &Path, output: &Path, tau: f64) -> Result<Vec<(String, f64)>, LossEvalError> {
    let tensors = Tensor::read_safetensors(input)
        .map_err(|source| LossEvalError::Read { path: input.display().to_string(), source })?;
    let inputs = Inputs::from_named(tensors)?;
    let out = evaluate(&inputs, tau)?;
    Tensor::write_safetensors(&out, output)
        .map_err(|source| LossEvalError::Write { path: output.display().to_string(), source })?;
    Ok(out.iter().filter(|(n, _)| n.starts_with("loss_")).map(|(n, t)| (n.clone(), t.double_value(&[]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: i64 = 4;
    const J: i64 = 3;
    const D: i64 = 5;

    /// A valid f64 input set: sample 1 without depth (its depth rows hold NaN: never read).
    fn named() -> Vec<(String, Tensor)> {
        tch::manual_seed(41);
        let f = (Kind::Double, Device::Cpu);
        let z_depth = Tensor::randn([B, D], f);
        let _ = z_depth.get(1).fill_(f64::NAN);
        let dense_depth = Tensor::randn([B, D, 4, 4], f);
        let _ = dense_depth.get(1).fill_(f64::NAN);
        vec![
            ("z_rgb".into(), Tensor::randn([B, D], f)),
            ("z_depth".into(), z_depth),
            ("z_kp".into(), Tensor::randn([B, D], f)),
            ("has_depth".into(), Tensor::from_slice(&[1u8, 0, 1, 1])),
            ("dense_rgb".into(), Tensor::randn([B, D, 4, 4], f)),
            ("dense_depth".into(), dense_depth),
            ("pixel_idx".into(), Tensor::from_slice(&[0i64, 5, 5, -1, 99, 7, 15, 15, 2, 3, 4, 6]).view([B, 3])),
            ("g_kp".into(), Tensor::randn([B, J, D], f)),
            // Sample 0's joint 2 is invisible and outside the 4 x 4 map: not read, so accepted.
            (
                "joint_cells".into(),
                Tensor::from_slice(&[vec![0i64, 0, 1, 2, 3, 9], [0, 0, 1, 2, 3, 3].repeat(3)].concat()).view([B, J, 2]),
            ),
            ("joint_vis".into(), Tensor::from_slice(&[1u8, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1]).view([B, J])),
        ]
    }

    fn error_of(tensors: Vec<(String, Tensor)>) -> String {
        match Inputs::from_named(tensors) {
            Ok(_) => panic!("accepted bad inputs"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unread_rows_may_hold_anything_and_get_zero_gradients() {
        let inputs = Inputs::from_named(named()).expect("valid inputs");
        let out = evaluate(&inputs, 0.07).expect("evaluate");
        let get = |name: &str| out.iter().find(|(n, _)| n == name).map(|(_, t)| t).expect("output");
        let total = get("loss_total").double_value(&[]);
        let sum: f64 = TERM_OUTPUTS.iter().map(|n| get(n).double_value(&[])).sum();
        assert!(total.is_finite() && (total - sum).abs() < 1e-12, "{total} vs {sum}");
        for name in TERM_OUTPUTS {
            assert!(get(name).double_value(&[]) > 0.0, "{name} has anchors here and must be positive");
        }
        for name in GRAD_INPUTS {
            assert_eq!(get(&format!("grad_{name}")).isnan().any().int64_value(&[]), 0, "grad_{name}");
        }
        assert_eq!(get("grad_z_depth").get(1).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(get("grad_dense_depth").get(1).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(get("grad_z_rgb").kind(), Kind::Double);
        assert_eq!(get("grad_dense_rgb").size(), [B, D, 4, 4]);
    }

    #[test]
    fn bad_inputs_are_refused_naming_the_tensor() {
        let without = |name: &str| named().into_iter().filter(|(n, _)| n != name).collect::<Vec<_>>();
        let replaced = |name: &str, t: Tensor| {
            named().into_iter().map(|(n, v)| if n == name { (n, t.shallow_clone()) } else { (n, v) }).collect()
        };
        let e = error_of(without("g_kp"));
        assert!(e.contains("missing input g_kp") && e.contains("[B, J, D]"), "{e}");
        let e = error_of(replaced("joint_cells", Tensor::zeros([B, J, 3], (Kind::Int64, Device::Cpu))));
        assert!(e.contains("joint_cells") && e.contains("[4, 3, 2]"), "{e}");
        let e = error_of(replaced("z_kp", Tensor::zeros([B, D], (Kind::Float, Device::Cpu))));
        assert!(e.contains("z_kp") && e.contains("dtype float32, expected float64"), "{e}");
        let e = error_of(replaced("has_depth", Tensor::from_slice(&[1u8, 2, 0, 0])));
        assert!(e.contains("has_depth") && e.contains("expected 0 or 1"), "{e}");
        let e = error_of(replaced("has_depth", Tensor::from_slice(&[1u8, 1, 1, 1])));
        assert!(e.contains("pixel_idx") && e.contains("sample 1"), "{e}");
        let e = error_of(replaced("joint_vis", Tensor::ones([B, J], (Kind::Uint8, Device::Cpu))));
        assert!(e.contains("joint_cells") && e.contains("sample 0, joint 2"), "{e}");
        let mut extra = named();
        extra.push(("pixel_index".into(), Tensor::zeros([1], (Kind::Int64, Device::Cpu))));
        assert!(error_of(extra).contains("unknown input pixel_index"));
    }
}
