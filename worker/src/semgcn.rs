//! The keypoint encoder: a semantic graph convolution network (SemGCN, Zhao et al., CVPR 2019), as on the
//! method page ("Encoders").
//!
//! [`SemGraphConv`]: `out = (A * I)(X W0) + (A * (1 - I))(X W1) + b`, where `A = softmax_row(L)` and `L`
//! holds one learnable logit per nonzero entry of the skeleton's adjacency (symmetric skeleton edges plus
//! self-loops, initialised to 1) and `-9e15` elsewhere, so non-edges get weight exactly 0 (as in the
//! original SemGCN code).
//!
//! [`SemGcn`]: input graph conv (2 -> hidden, norm, ReLU), `blocks` residual blocks (two graph convs with
//! norm and ReLU each, plus the identity), output graph conv hidden -> out (no norm, no ReLU).
//! `B x J x 2 -> B x J x out`.
//!
//! # Variable names
//! The original SemGCN names, without its `nn.Sequential` index on the input layer (`K` = block index):
//! - `gconv_input.gconv.W` (`2 x 2 x hidden`), `gconv_input.gconv.e` (`1 x nnz`),
//!   `gconv_input.gconv.bias` (`hidden`), `gconv_input.bn.*`
//! - `gconv_layers.K.gconv1.gconv.{W,e,bias}`, `gconv_layers.K.gconv1.bn.*`, the same for `gconv2`
//! - `gconv_output.{W,e,bias}`
//!
//! `W[0]` is the self (diagonal) transform, `W[1]` the neighbour transform. `e` lists the edge logits in
//! row-major order of the adjacency's nonzero entries (PyTorch's `adj.nonzero()` order). The norm layer is
//! named `bn` whatever its kind: BatchNorm has `weight`, `bias`, `running_mean`, `running_var` and an
//! int64 scalar `num_batches_tracked` (PyTorch's state-dict layout); GroupNorm has `weight` and `bias`;
//! no norm has no variables. `tests/python/reference/semgcn.py` is the PyTorch twin, with the same names.
//!
//! # Normalisation
//! - [`Norm::Batch`]: BatchNorm1d over the channels, statistics over batch and joints, momentum 0.01
//!   (PyTorch convention: `running = 0.99 running + 0.01 batch`, unbiased batch variance), eps 1e-5: the
//!   HRNet's [`BatchNorm`] applied to the `B x C x J` transpose.
//! - [`Norm::Group`]: GroupNorm over the channels with [`group_count`]`(width, groups)` groups (the HRNet's
//!   rule: the largest divisor of the layer width not above `groups` = `model.groups`), eps 1e-5. Width 128
//!   with 4 groups: 4 groups; with 32 groups: 32.
//! - [`Norm::None`]: the graph conv's output goes straight to the ReLU.
//!
//! `VarStore::double()` / `float()` leave the int64 `num_batches_tracked` alone; `set_kind` casts it too
//! (see [`BatchNorm`]).
//!
//! # Initialisation (as SemGCN)
//! `W`: xavier-uniform with gain 1.414 and PyTorch's fans for a 3-D tensor `2 x in x out`
//! (fan_in = in * out, fan_out = 2 * out), so the bound is `1.414 * sqrt(6 / (in * out + 2 * out))`;
//! `bias`: uniform(-1/sqrt(out), 1/sqrt(out)); `e` = 1; norm weight 1, bias 0. Every draw goes through the
//! `VarStore`'s path, so `tch::manual_seed` makes construction deterministic.

use hcmoco_data::KeypointLayout;
use hcmoco_proto::config::Norm;
use tch::Tensor;
use tch::nn::{self, Init};

pub use crate::hrnet::group_count;
use crate::hrnet::{BatchNorm, NORM_EPS};

/// The logit given to non-edges before the row softmax (the original SemGCN value).
pub const NON_EDGE_LOGIT: f64 = -9e15;
/// Xavier gain of the graph-conv weights (the original SemGCN value).
const XAVIER_GAIN: f64 = 1.414;

/// The skeleton adjacency of `layout` as a row-major `J x J` mask: symmetric skeleton edges plus
/// self-loops.
pub fn adjacency_mask(layout: KeypointLayout) -> Vec<bool> {
    let j = layout.num_joints();
    let mut mask = vec![false; j * j];
    for i in 0..j {
        mask[i * j + i] = true;
    }
    for (child, parent) in layout.edges() {
        mask[child * j + parent] = true;
        mask[parent * j + child] = true;
    }
    mask
}

/// One semantic graph convolution.
pub struct SemGraphConv {
    /// `2 x in x out`: `W[0]` self transform, `W[1]` neighbour transform.
    w: Tensor,
    /// `1 x nnz`: one logit per nonzero adjacency entry, row-major.
    e: Tensor,
    /// `out`.
    bias: Tensor,
    /// Flat (`row * J + col`) positions of the nonzero adjacency entries, int64, row-major.
    edge_index: Tensor,
    joints: i64,
}

impl SemGraphConv {
    /// Variables `p.W`, `p.e`, `p.bias`, initialised as the module doc says.
    pub fn new(p: nn::Path, layout: KeypointLayout, in_dim: i64, out_dim: i64) -> SemGraphConv {
        let joints = layout.num_joints() as i64;
        let flat: Vec<i64> =
            adjacency_mask(layout).iter().enumerate().filter_map(|(i, &m)| m.then_some(i as i64)).collect();
        let nnz = flat.len() as i64;
        let bound = XAVIER_GAIN * (6.0 / (in_dim * out_dim + 2 * out_dim) as f64).sqrt();
        let w = p.var("W", &[2, in_dim, out_dim], Init::Uniform { lo: -bound, up: bound });
        let e = p.var("e", &[1, nnz], Init::Const(1.0));
        let stdv = 1.0 / (out_dim as f64).sqrt();
        let bias = p.var("bias", &[out_dim], Init::Uniform { lo: -stdv, up: stdv });
        let edge_index = Tensor::from_slice(&flat).to_device(p.device());
        SemGraphConv { w, e, bias, edge_index, joints }
    }

    /// The attention matrix `A` (`J x J`): row softmax of the edge logits, exactly 0 off the skeleton.
    pub fn adjacency(&self) -> Tensor {
        let j = self.joints;
        let index = self.edge_index.to_device(self.e.device());
        Tensor::full([j * j], NON_EDGE_LOGIT, (self.e.kind(), self.e.device()))
            .index_put(&[Some(index)], &self.e.view([-1]), false)
            .view([j, j])
            .softmax(1, self.e.kind())
    }

    /// `x`: `B x J x in` -> `B x J x out`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let a = self.adjacency();
        let eye = Tensor::eye(self.joints, (a.kind(), a.device()));
        let h0 = x.matmul(&self.w.get(0));
        let h1 = x.matmul(&self.w.get(1));
        let diag = &a * &eye;
        // A * (1 - I), exactly: the diagonal becomes 0, every other entry is unchanged.
        let off = &a - &diag;
        diag.matmul(&h0) + off.matmul(&h1) + &self.bias
    }
}

/// The normalisation layer after a graph conv (named `bn` whatever its kind).
enum GraphNorm {
    Batch(BatchNorm),
    Group { weight: Tensor, bias: Tensor, groups: i64 },
    None,
}

impl GraphNorm {
    fn new(p: nn::Path, norm: Norm, channels: i64, groups: u32) -> GraphNorm {
        match norm {
            Norm::Batch => GraphNorm::Batch(BatchNorm::new(p, channels)),
            Norm::Group => GraphNorm::Group {
                weight: p.var("weight", &[channels], Init::Const(1.0)),
                bias: p.var("bias", &[channels], Init::Const(0.0)),
                groups: group_count(channels, groups),
            },
            Norm::None => GraphNorm::None,
        }
    }

    /// `x`: `B x J x C` (channels last, as the graph convs produce it).
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            GraphNorm::Batch(bn) => bn.forward_t(&x.transpose(1, 2), train).transpose(1, 2),
            GraphNorm::Group { weight, bias, groups } => {
                x.transpose(1, 2).group_norm(*groups, Some(weight), Some(bias), NORM_EPS, true).transpose(1, 2)
            }
            GraphNorm::None => x.shallow_clone(),
        }
    }
}

/// Graph conv -> norm -> ReLU (SemGCN's `_GraphConv`).
struct GraphConvBlock {
    gconv: SemGraphConv,
    bn: GraphNorm,
}

impl GraphConvBlock {
    fn new(p: nn::Path, layout: KeypointLayout, in_dim: i64, out_dim: i64, norm: Norm, groups: u32) -> Self {
        GraphConvBlock {
            gconv: SemGraphConv::new(&p / "gconv", layout, in_dim, out_dim),
            bn: GraphNorm::new(&p / "bn", norm, out_dim, groups),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.gconv.forward(x), train).relu()
    }
}

/// The keypoint encoder (see the module doc for the architecture, names and initialisation).
pub struct SemGcn {
    gconv_input: GraphConvBlock,
    /// `(gconv1, gconv2)` of each residual block.
    gconv_layers: Vec<(GraphConvBlock, GraphConvBlock)>,
    gconv_output: SemGraphConv,
}

impl SemGcn {
    /// Builds the network for `layout`'s skeleton: `hidden` channels inside, `out` per joint at the end,
    /// `blocks` residual blocks; `groups` is `model.groups` (used only with [`Norm::Group`]).
    pub fn new(
        p: nn::Path,
        layout: KeypointLayout,
        hidden: i64,
        out: i64,
        blocks: usize,
        norm: Norm,
        groups: u32,
    ) -> SemGcn {
        let gconv_input = GraphConvBlock::new(&p / "gconv_input", layout, 2, hidden, norm, groups);
        let layers = &p / "gconv_layers";
        let gconv_layers = (0..blocks)
            .map(|k| {
                let block = &layers / k;
                (
                    GraphConvBlock::new(&block / "gconv1", layout, hidden, hidden, norm, groups),
                    GraphConvBlock::new(&block / "gconv2", layout, hidden, hidden, norm, groups),
                )
            })
            .collect();
        let gconv_output = SemGraphConv::new(&p / "gconv_output", layout, hidden, out);
        SemGcn { gconv_input, gconv_layers, gconv_output }
    }

    /// `x`: `B x J x 2` (normalised joint positions) -> `B x J x out` (per-joint embeddings G).
    /// `train` selects batch statistics (and running-statistics updates) in the BatchNorm layers.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.gconv_input.forward_t(x, train);
        for (gconv1, gconv2) in &self.gconv_layers {
            let out = gconv2.forward_t(&gconv1.forward_t(&h, train), train);
            // Out of place: `h += out` would add in place into a tensor that autograd saved for backward.
            h = &h + out;
        }
        self.gconv_output.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hrnet::BN_MOMENTUM;
    use tch::{Device, Kind};

    fn store(kind: Kind) -> nn::VarStore {
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(kind);
        vs
    }

    fn names(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        v.sort();
        v
    }

    #[test]
    fn adjacency_is_symmetric_with_self_loops() {
        for layout in KeypointLayout::ALL {
            let j = layout.num_joints();
            let m = adjacency_mask(layout);
            let edges = layout.edges().count();
            assert_eq!(edges, j - 1, "{layout}: a tree");
            assert_eq!(m.iter().filter(|&&b| b).count(), j + 2 * edges, "{layout}");
            for r in 0..j {
                assert!(m[r * j + r]);
                for c in 0..j {
                    assert_eq!(m[r * j + c], m[c * j + r], "{layout} ({r}, {c})");
                }
            }
        }
        // MPII-16: pelvis (6) touches r_hip (2), l_hip (3), thorax (7) and itself only.
        let m = adjacency_mask(KeypointLayout::Mpii16);
        let pelvis: Vec<usize> = (0..16).filter(|&c| m[6 * 16 + c]).collect();
        assert_eq!(pelvis, vec![2, 3, 6, 7]);
    }

    #[test]
    fn group_counts_of_the_keypoint_widths() {
        assert_eq!(group_count(128, 4), 4);
        assert_eq!(group_count(128, 32), 32);
        assert_eq!(group_count(128, 6), 4);
        assert_eq!(group_count(12, 8), 6);
    }

    #[test]
    fn shapes_and_names() {
        let vs = store(Kind::Float);
        let gcn = SemGcn::new(vs.root() / "gcn", KeypointLayout::Mpii16, 16, 8, 2, Norm::Batch, 4);
        let x = Tensor::randn([3, 16, 2], (Kind::Float, Device::Cpu));
        assert_eq!(gcn.forward_t(&x, true).size(), vec![3, 16, 8]);
        assert_eq!(gcn.forward_t(&x, false).size(), vec![3, 16, 8]);

        let nnz = 16 + 2 * 15;
        let names = names(&vs);
        let want: Vec<(&str, Vec<i64>)> = vec![
            ("gcn.gconv_input.bn.bias", vec![16]),
            ("gcn.gconv_input.bn.num_batches_tracked", vec![]),
            ("gcn.gconv_input.bn.running_mean", vec![16]),
            ("gcn.gconv_input.bn.running_var", vec![16]),
            ("gcn.gconv_input.bn.weight", vec![16]),
            ("gcn.gconv_input.gconv.W", vec![2, 2, 16]),
            ("gcn.gconv_input.gconv.bias", vec![16]),
            ("gcn.gconv_input.gconv.e", vec![1, nnz]),
        ];
        for (n, s) in &want {
            assert!(names.contains(&(n.to_string(), s.clone())), "missing {n} {s:?} in {names:?}");
        }
        assert!(names.contains(&("gcn.gconv_layers.1.gconv2.gconv.W".into(), vec![2, 16, 16])));
        assert!(names.contains(&("gcn.gconv_layers.1.gconv2.bn.running_var".into(), vec![16])));
        assert!(names.contains(&("gcn.gconv_output.W".into(), vec![2, 16, 8])));
        assert!(names.contains(&("gcn.gconv_output.e".into(), vec![1, nnz])));
        // Input block 8 + 2 blocks x 2 x 8 + output 3.
        assert_eq!(names.len(), 8 + 2 * 2 * 8 + 3);
        // Train-mode forwards counted once per norm layer per call.
        let nbt = vs.variables()["gcn.gconv_input.bn.num_batches_tracked"].shallow_clone();
        assert_eq!(nbt.kind(), Kind::Int64);
        assert_eq!(nbt.int64_value(&[]), 1);
    }

    #[test]
    fn attention_rows_sum_to_one_over_edges_only() {
        for layout in KeypointLayout::ALL {
            let vs = store(Kind::Double);
            let conv = SemGraphConv::new(vs.root() / "g", layout, 3, 4);
            // Unequal logits, so the check does not rely on the uniform start.
            tch::no_grad(|| {
                let mut e = vs.variables()["g.e"].shallow_clone();
                e.copy_(&Tensor::randn(e.size(), (Kind::Double, Device::Cpu)));
            });
            let a = conv.adjacency();
            let j = layout.num_joints() as i64;
            let mask = Tensor::from_slice(&adjacency_mask(layout)).view([j, j]);
            let rows = a.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
            let ones = Tensor::ones([j], (Kind::Double, Device::Cpu));
            assert!(rows.allclose(&ones, 1e-12, 1e-12, false), "{layout}: rows {rows}");
            let off_edge = a.masked_select(&mask.logical_not());
            assert_eq!(off_edge.abs().max().double_value(&[]), 0.0, "{layout}: weight off the skeleton");
            assert!(a.masked_select(&mask).min().double_value(&[]) > 0.0, "{layout}: an edge with zero weight");
        }
    }

    #[test]
    fn attention_starts_uniform_over_each_joints_neighbourhood() {
        let vs = store(Kind::Double);
        let conv = SemGraphConv::new(vs.root() / "g", KeypointLayout::Coco13, 2, 2);
        let a = conv.adjacency();
        let m = adjacency_mask(KeypointLayout::Coco13);
        for r in 0..13 {
            let degree = (0..13).filter(|&c| m[r * 13 + c]).count() as f64;
            for c in 0..13 {
                let want = if m[r * 13 + c] { 1.0 / degree } else { 0.0 };
                let got = a.double_value(&[r as i64, c as i64]);
                assert!((got - want).abs() < 1e-15, "({r}, {c}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn output_depends_only_on_neighbours() {
        let layout = KeypointLayout::Mpii16;
        let vs = store(Kind::Double);
        let conv = SemGraphConv::new(vs.root() / "g", layout, 2, 5);
        let m = adjacency_mask(layout);
        let x = Tensor::randn([2, 16, 2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let y = conv.forward(&x);
        // r_ankle (0) neighbours r_knee (1) and itself; head_top (9) is far away.
        for (out_joint, in_joint) in [(0usize, 9usize), (0, 1), (0, 0), (9, 0), (9, 8)] {
            let g = Tensor::run_backward(&[y.select(1, out_joint as i64).sum(Kind::Double)], &[&x], true, false);
            let dep = g[0].select(1, in_joint as i64).abs().sum(Kind::Double).double_value(&[]);
            if m[out_joint * 16 + in_joint] {
                assert!(dep > 0.0, "joint {out_joint} ignores neighbour {in_joint}");
            } else {
                assert_eq!(dep, 0.0, "joint {out_joint} depends on non-neighbour {in_joint}");
            }
        }
        // And the batch samples stay independent.
        let g = Tensor::run_backward(&[y.get(0).sum(Kind::Double)], &[&x], false, false);
        assert_eq!(g[0].get(1).abs().sum(Kind::Double).double_value(&[]), 0.0);
    }

    #[test]
    fn graph_conv_matches_the_formula() {
        let layout = KeypointLayout::Coco13;
        let vs = store(Kind::Double);
        let conv = SemGraphConv::new(vs.root() / "g", layout, 3, 4);
        let vars = vs.variables();
        let (w, b) = (&vars["g.W"], &vars["g.bias"]);
        let x = Tensor::randn([2, 13, 3], (Kind::Double, Device::Cpu));
        let a = conv.adjacency();
        // Row by row: out_i = A_ii x_i W0 + sum_{k != i} A_ik x_k W1 + b.
        let y = conv.forward(&x);
        for i in 0..13i64 {
            let mut want = x.select(1, i).matmul(&w.get(0)) * a.double_value(&[i, i]) + b;
            for k in (0..13i64).filter(|&k| k != i) {
                want += x.select(1, k).matmul(&w.get(1)) * a.double_value(&[i, k]);
            }
            assert!(y.select(1, i).allclose(&want, 1e-12, 1e-12, false), "joint {i}");
        }
    }

    #[test]
    fn same_seed_same_weights_and_outputs() {
        let build = |seed: i64| {
            tch::manual_seed(seed);
            let vs = store(Kind::Float);
            let gcn = SemGcn::new(vs.root(), KeypointLayout::Coco13, 8, 4, 1, Norm::Batch, 4);
            (vs, gcn)
        };
        let (va, a) = build(7);
        let (vb, b) = build(7);
        let (vc, _) = build(8);
        let (sa, sb, sc) = (va.variables(), vb.variables(), vc.variables());
        for (name, t) in &sa {
            assert!(t.equal(&sb[name]), "{name}");
        }
        assert!(!sa["gconv_output.W"].equal(&sc["gconv_output.W"]), "the seed has no effect");
        let x = Tensor::randn([4, 13, 2], (Kind::Float, Device::Cpu));
        assert!(a.forward_t(&x, true).equal(&b.forward_t(&x, true)));
        assert!(sa["gconv_input.bn.running_mean"].equal(&sb["gconv_input.bn.running_mean"]));
    }

    #[test]
    fn init_bounds_follow_semgcn() {
        let vs = store(Kind::Double);
        let _conv = SemGraphConv::new(vs.root() / "g", KeypointLayout::Mpii16, 64, 32);
        let vars = vs.variables();
        let bound = 1.414 * (6.0f64 / (64.0 * 32.0 + 2.0 * 32.0)).sqrt();
        let w = &vars["g.W"];
        assert!(w.abs().max().double_value(&[]) <= bound);
        assert!(w.abs().max().double_value(&[]) > 0.9 * bound, "bound much smaller than SemGCN's");
        let b = &vars["g.bias"];
        assert!(b.abs().max().double_value(&[]) <= 1.0 / 32f64.sqrt());
        assert_eq!(vars["g.e"].min().double_value(&[]), 1.0);
        assert_eq!(vars["g.e"].max().double_value(&[]), 1.0);
    }

    #[test]
    fn batch_norm_updates_running_statistics_in_train_mode_only() {
        let vs = store(Kind::Double);
        let gcn = SemGcn::new(vs.root(), KeypointLayout::Mpii16, 8, 4, 1, Norm::Batch, 4);
        let x = Tensor::randn([5, 16, 2], (Kind::Double, Device::Cpu));
        let vars = vs.variables();
        let rm = vars["gconv_input.bn.running_mean"].shallow_clone();
        let before = rm.copy();
        let _ = gcn.forward_t(&x, false);
        assert!(rm.equal(&before), "eval mode changed the running mean");
        assert_eq!(vars["gconv_input.bn.num_batches_tracked"].int64_value(&[]), 0);

        // Train mode: running = 0.99 running + 0.01 batch mean over (batch, joints) of the graph-conv output.
        let pre = tch::no_grad(|| {
            let conv = SemGraphConv {
                w: vars["gconv_input.gconv.W"].shallow_clone(),
                e: vars["gconv_input.gconv.e"].shallow_clone(),
                bias: vars["gconv_input.gconv.bias"].shallow_clone(),
                edge_index: gcn.gconv_input.gconv.edge_index.shallow_clone(),
                joints: 16,
            };
            conv.forward(&x)
        });
        let _ = gcn.forward_t(&x, true);
        let batch_mean = pre.mean_dim([0i64, 1].as_slice(), false, Kind::Double);
        assert!(rm.allclose(&(batch_mean * BN_MOMENTUM), 1e-12, 1e-12, false));
        let batch_var = pre.reshape([-1, 8]).var_dim([0i64].as_slice(), true, false);
        let rv = &vars["gconv_input.bn.running_var"];
        assert!(rv.allclose(&(batch_var * BN_MOMENTUM + (1.0 - BN_MOMENTUM)), 1e-12, 1e-12, false));
        assert_eq!(vars["gconv_input.bn.num_batches_tracked"].int64_value(&[]), 1);
    }

    #[test]
    fn group_norm_variant() {
        let vs = store(Kind::Double);
        let gcn = SemGcn::new(vs.root(), KeypointLayout::Coco13, 12, 6, 2, Norm::Group, 8);
        let names = names(&vs);
        assert!(names.contains(&("gconv_input.bn.weight".into(), vec![12])));
        assert!(!names.iter().any(|(n, _)| n.contains("running") || n.contains("num_batches")), "{names:?}");
        let x = Tensor::randn([3, 13, 2], (Kind::Double, Device::Cpu));
        let y = gcn.forward_t(&x, true);
        assert_eq!(y.size(), vec![3, 13, 6]);
        // No batch statistics: a sample's output is the same alone or in a batch, train mode or not.
        let alone = gcn.forward_t(&x.narrow(0, 1, 1), true);
        assert!(alone.allclose(&y.narrow(0, 1, 1), 1e-12, 1e-12, false));
        assert!(gcn.forward_t(&x, false).equal(&y));
        // 12 channels with model.groups = 8: 6 groups of 2 channels.
        let GraphNorm::Group { groups, .. } = &gcn.gconv_input.bn else { panic!("not a GroupNorm") };
        assert_eq!(*groups, 6);
    }

    #[test]
    fn no_norm_variant_has_no_norm_variables() {
        let vs = store(Kind::Float);
        let gcn = SemGcn::new(vs.root(), KeypointLayout::Mpii16, 8, 8, 4, Norm::None, 4);
        assert!(!names(&vs).iter().any(|(n, _)| n.contains(".bn.")));
        assert_eq!(names(&vs).len(), 3 + 4 * 2 * 3 + 3);
        let x = Tensor::randn([2, 16, 2], (Kind::Float, Device::Cpu));
        assert_eq!(gcn.forward_t(&x, true).size(), vec![2, 16, 8]);
    }
}
