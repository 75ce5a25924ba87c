//! HRNetV2 backbone (the image encoders), with the parameter names and shapes of the official HRNet
//! layout, which timm's `hrnet_w18` also uses.
//!
//! Variable names under the [`nn::Path`] given to [`HrNet::new`] (PyTorch `state_dict` names):
//! - stem: `conv1`, `bn1` (3x3 stride 2, `in_channels` -> stem width), `conv2`, `bn2` (3x3 stride 2);
//! - `layer1.N.{conv1,bn1,conv2,bn2,conv3,bn3}` (Bottlenecks), `layer1.0.downsample.{0,1}` (1x1 conv + norm);
//! - `transitionT.I.{0,1}` where branch I exists before and changes width (3x3 conv + norm + ReLU), and
//!   `transitionT.I.K.{0,1}` for a new branch I (a chain of stride-2 3x3 conv + norm + ReLU);
//! - `stageS.M.branches.B.K.{conv1,bn1,conv2,bn2}` (BasicBlocks of module M, branch B);
//! - `stageS.M.fuse_layers.I.J...`: into branch I from branch J. J > I: `.0` 1x1 conv, `.1` norm, then
//!   upsampling; J < I: `.K.0` / `.K.1` for K in 0..I-J, a chain of stride-2 3x3 conv + norm, with ReLU
//!   after every link but the last; J = I: identity (no variables).
//!
//! Convolutions have no bias. BatchNorm variables are `weight`, `bias` (trainable), `running_mean`,
//! `running_var` and `num_batches_tracked` (buffers, as in a PyTorch state dict); GroupNorm variables are
//! `weight` and `bias`. Initialisation follows the official HRNet: convolution weights normal with std
//! 0.001, norm weights 1 and biases 0, drawn from the VarStore's initialisers (so `tch::manual_seed` fixes
//! them). Without normalisation ([`Norm::None`]) std 0.001 would make the activations vanish through the
//! depth of the network, so that configuration draws convolution weights Kaiming-normal (fan out, ReLU
//! gain), as timm does.

use std::fmt;
use std::str::FromStr;

use hcmoco_proto::config::Norm;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// BatchNorm momentum, PyTorch convention (`running = (1 - m) * running + m * batch`).
pub const BN_MOMENTUM: f64 = 0.01;
/// BatchNorm and GroupNorm epsilon.
pub const NORM_EPS: f64 = 1e-5;
/// Standard deviation of the convolution weights at initialisation (the official HRNet's).
pub const CONV_INIT_STD: f64 = 0.001;

/// How the fuse layers bring a lower-resolution branch up to a higher-resolution one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsample {
    /// Bilinear to the target branch's size, `align_corners = false` (the authors' default).
    Bilinear,
    /// Nearest with scale factor 2^(j-i) (timm's), to the target branch's size.
    Nearest,
}

impl Upsample {
    pub fn as_str(self) -> &'static str {
        match self {
            Upsample::Bilinear => "bilinear",
            Upsample::Nearest => "nearest",
        }
    }
}

impl FromStr for Upsample {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Upsample> {
        match s {
            "bilinear" => Ok(Upsample::Bilinear),
            "nearest" => Ok(Upsample::Nearest),
            _ => anyhow::bail!("upsampling mode {s:?}: expected \"bilinear\" or \"nearest\""),
        }
    }
}

impl fmt::Display for Upsample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HRNet stage (stage 2, 3 or 4): `modules` high-resolution modules, each with one branch per entry
/// of `widths` holding `blocks` BasicBlocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub modules: usize,
    pub blocks: usize,
    pub widths: Vec<i64>,
}

/// The shape of an HRNetV2 backbone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrNetSpec {
    /// Preset name (`hrnet_w18`, `hrnet_small`), as in the job file's `model.backbone`.
    pub name: String,
    /// Output channels of both stem convolutions (`conv1`, `conv2`).
    pub stem_width: i64,
    /// Bottleneck width of `layer1`; `layer1` outputs 4x this many channels.
    pub layer1_planes: i64,
    pub layer1_blocks: usize,
    /// Stages 2, 3 and 4, with 2, 3 and 4 branches.
    pub stages: [StageSpec; 3],
}

impl HrNetSpec {
    /// HRNetV2-W18: stem 64, 4 Bottlenecks (64 -> 256), stage 2: 1 module [18, 36], stage 3: 4 modules
    /// [18, 36, 72], stage 4: 3 modules [18, 36, 72, 144], 4 BasicBlocks per branch.
    pub fn w18() -> HrNetSpec {
        HrNetSpec {
            name: "hrnet_w18".into(),
            stem_width: 64,
            layer1_planes: 64,
            layer1_blocks: 4,
            stages: [
                StageSpec { modules: 1, blocks: 4, widths: vec![18, 36] },
                StageSpec { modules: 4, blocks: 4, widths: vec![18, 36, 72] },
                StageSpec { modules: 3, blocks: 4, widths: vec![18, 36, 72, 144] },
            ],
        }
    }

    /// The same four-branch topology (strides 4/8/16/32), narrow and shallow for CPU tests and demos:
    /// stem 16, 1 Bottleneck (16 -> 64), widths [8, 16, 32, 64], 1 module per stage, 1 block per branch.
    pub fn small() -> HrNetSpec {
        HrNetSpec {
            name: "hrnet_small".into(),
            stem_width: 16,
            layer1_planes: 16,
            layer1_blocks: 1,
            stages: [
                StageSpec { modules: 1, blocks: 1, widths: vec![8, 16] },
                StageSpec { modules: 1, blocks: 1, widths: vec![8, 16, 32] },
                StageSpec { modules: 1, blocks: 1, widths: vec![8, 16, 32, 64] },
            ],
        }
    }

    /// A preset by its job-file name: `hrnet_w18` or `hrnet_small`.
    pub fn by_name(name: &str) -> anyhow::Result<HrNetSpec> {
        match name {
            "hrnet_w18" => Ok(HrNetSpec::w18()),
            "hrnet_small" => Ok(HrNetSpec::small()),
            _ => anyhow::bail!("unknown HRNet preset {name:?} (known: \"hrnet_w18\", \"hrnet_small\")"),
        }
    }

    /// The four branch widths (stage 4).
    pub fn branch_channels(&self) -> &[i64] {
        &self.stages[2].widths
    }

    /// Channels of the four branch maps together: 270 for W18.
    pub fn out_channels(&self) -> i64 {
        self.branch_channels().iter().sum()
    }

    /// Checks the structure: stages of 2, 3 and 4 branches, at least one module and block each, positive
    /// widths, a stage keeping the widths of the branches it inherits.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.name;
        anyhow::ensure!(self.stem_width > 0 && self.layer1_planes > 0, "{n}: stem and layer1 widths must be positive");
        anyhow::ensure!(self.layer1_blocks > 0, "{n}: layer1 needs at least one block");
        for (k, s) in self.stages.iter().enumerate() {
            let stage = k + 2;
            anyhow::ensure!(s.widths.len() == k + 2, "{n}: stage {stage} must have {} branches", k + 2);
            anyhow::ensure!(s.modules > 0 && s.blocks > 0, "{n}: stage {stage} needs modules and blocks");
            anyhow::ensure!(s.widths.iter().all(|&w| w > 0), "{n}: stage {stage} widths must be positive");
        }
        Ok(())
    }
}

/// GroupNorm group count of a layer with `channels` channels: the largest divisor of `channels` not above
/// `max_groups` (HRNet's widths 18/36/72/144/64/256 share no large divisor). With `model.groups = 32`:
/// 18 -> 18, 36 -> 18, 72 -> 24, 144 -> 24, 64 -> 32, 256 -> 32.
pub fn group_count(channels: i64, max_groups: u32) -> i64 {
    let cap = i64::from(max_groups.max(1)).min(channels.max(1));
    (1..=cap).rev().find(|g| channels % g == 0).unwrap_or(1)
}

/// BatchNorm over dimension 1 of an N x C x ... input, with the variables of a PyTorch BatchNorm state
/// dict: `weight`, `bias` (trainable), `running_mean`, `running_var`, and `num_batches_tracked` (an int64
/// scalar counting training-mode forwards, as PyTorch's; it does not enter the computation because the
/// momentum is fixed).
///
/// The counter is int64. `VarStore::double()` / `float()` cast only floating-point variables and leave it
/// alone; `VarStore::set_kind` casts every variable, the counter included (it keeps counting, as a float,
/// and [`crate::export`] writes it back as int64).
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm {
    pub fn new(p: nn::Path, channels: i64) -> BatchNorm {
        let kind = p.kind();
        let device = p.device();
        BatchNorm {
            weight: p.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: p.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: p.add("running_mean", Tensor::zeros([channels], (kind, device)), false),
            running_var: p.add("running_var", Tensor::ones([channels], (kind, device)), false),
            num_batches_tracked: p.add("num_batches_tracked", Tensor::zeros([], (Kind::Int64, device)), false),
            momentum: BN_MOMENTUM,
            eps: NORM_EPS,
        }
    }

    /// Training mode normalises with batch statistics and updates the running ones (unbiased variance,
    /// as PyTorch) and the counter; evaluation mode uses the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            let mut counter = self.num_batches_tracked.shallow_clone();
            tch::no_grad(|| {
                let _ = counter.g_add_scalar_(1i64);
            });
        }
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            self.momentum,
            self.eps,
            true,
        )
    }
}

/// A normalisation layer of the configured kind.
enum NormLayer {
    Batch(BatchNorm),
    Group(nn::GroupNorm),
    Identity,
}

impl NormLayer {
    fn new(p: nn::Path, norm: Norm, groups: u32, channels: i64) -> NormLayer {
        match norm {
            Norm::Batch => NormLayer::Batch(BatchNorm::new(p, channels)),
            Norm::Group => NormLayer::Group(nn::group_norm(
                p,
                group_count(channels, groups),
                channels,
                nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() },
            )),
            Norm::None => NormLayer::Identity,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            NormLayer::Batch(bn) => bn.forward_t(x, train),
            NormLayer::Group(gn) => gn.forward(x),
            NormLayer::Identity => x.shallow_clone(),
        }
    }
}

/// What every layer constructor needs besides its path and widths.
#[derive(Clone, Copy)]
struct Ctx {
    norm: Norm,
    groups: u32,
}

impl Ctx {
    fn conv(&self, p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::Conv2D {
        let ws_init = match self.norm {
            Norm::None => nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Normal,
                fan: nn::init::FanInOut::FanOut,
                non_linearity: nn::init::NonLinearity::ReLU,
            },
            Norm::Batch | Norm::Group => nn::Init::Randn { mean: 0.0, stdev: CONV_INIT_STD },
        };
        nn::conv2d(
            p,
            cin,
            cout,
            k,
            nn::ConvConfig { stride, padding: k / 2, bias: false, ws_init, ..Default::default() },
        )
    }

    fn norm(&self, p: nn::Path, channels: i64) -> NormLayer {
        NormLayer::new(p, self.norm, self.groups, channels)
    }

    /// `P.0` conv (k x k) and `P.1` norm, the `nn.Sequential(conv, norm[, relu])` of the official layout.
    fn conv_norm(&self, p: &nn::Path, cin: i64, cout: i64, k: i64, stride: i64, relu: bool) -> ConvNorm {
        ConvNorm { conv: self.conv(p / 0, cin, cout, k, stride), norm: self.norm(p / 1, cout), relu }
    }
}

/// Applies ReLU in place on a tensor this code has just created (no other reference reads it).
fn relu_owned(mut t: Tensor) -> Tensor {
    let _ = t.relu_();
    t
}

struct ConvNorm {
    conv: nn::Conv2D,
    norm: NormLayer,
    relu: bool,
}

impl ConvNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.norm.forward_t(&self.conv.forward(x), train);
        if self.relu { relu_owned(y) } else { y }
    }
}

/// ResNet BasicBlock (expansion 1): two 3x3 convolutions and a residual.
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: NormLayer,
    conv2: nn::Conv2D,
    bn2: NormLayer,
    downsample: Option<ConvNorm>,
}

impl BasicBlock {
    fn new(p: &nn::Path, c: Ctx, cin: i64, planes: i64) -> BasicBlock {
        let downsample = (cin != planes).then(|| c.conv_norm(&(p / "downsample"), cin, planes, 1, 1, false));
        BasicBlock {
            conv1: c.conv(p / "conv1", cin, planes, 3, 1),
            bn1: c.norm(p / "bn1", planes),
            conv2: c.conv(p / "conv2", planes, planes, 3, 1),
            bn2: c.norm(p / "bn2", planes),
            downsample,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = relu_owned(self.bn1.forward_t(&self.conv1.forward(x), train));
        let h = self.bn2.forward_t(&self.conv2.forward(&h), train);
        let residual = match &self.downsample {
            Some(d) => d.forward_t(x, train),
            None => x.shallow_clone(),
        };
        relu_owned(h + residual)
    }
}

/// ResNet Bottleneck (expansion 4): 1x1, 3x3, 1x1 convolutions and a residual.
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: NormLayer,
    conv2: nn::Conv2D,
    bn2: NormLayer,
    conv3: nn::Conv2D,
    bn3: NormLayer,
    downsample: Option<ConvNorm>,
}

impl Bottleneck {
    const EXPANSION: i64 = 4;

    fn new(p: &nn::Path, c: Ctx, cin: i64, planes: i64) -> Bottleneck {
        let cout = planes * Self::EXPANSION;
        let downsample = (cin != cout).then(|| c.conv_norm(&(p / "downsample"), cin, cout, 1, 1, false));
        Bottleneck {
            conv1: c.conv(p / "conv1", cin, planes, 1, 1),
            bn1: c.norm(p / "bn1", planes),
            conv2: c.conv(p / "conv2", planes, planes, 3, 1),
            bn2: c.norm(p / "bn2", planes),
            conv3: c.conv(p / "conv3", planes, cout, 1, 1),
            bn3: c.norm(p / "bn3", cout),
            downsample,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = relu_owned(self.bn1.forward_t(&self.conv1.forward(x), train));
        let h = relu_owned(self.bn2.forward_t(&self.conv2.forward(&h), train));
        let h = self.bn3.forward_t(&self.conv3.forward(&h), train);
        let residual = match &self.downsample {
            Some(d) => d.forward_t(x, train),
            None => x.shallow_clone(),
        };
        relu_owned(h + residual)
    }
}

/// One entry of a transition layer: what feeds branch I of the next stage.
enum Transition {
    /// Same branch, same width: passed through (no variables).
    Identity,
    /// Same branch, new width: 3x3 conv + norm + ReLU (`transitionT.I.{0,1}`).
    Adapt(Box<ConvNorm>),
    /// A new, lower-resolution branch from the previous stage's last one: stride-2 3x3 conv + norm +
    /// ReLU links (`transitionT.I.K.{0,1}`).
    New(Vec<ConvNorm>),
}

fn transition(p: &nn::Path, c: Ctx, pre: &[i64], cur: &[i64]) -> Vec<Transition> {
    (0..cur.len())
        .map(|i| {
            let q = p / i;
            if i < pre.len() {
                if cur[i] == pre[i] {
                    Transition::Identity
                } else {
                    Transition::Adapt(Box::new(c.conv_norm(&q, pre[i], cur[i], 3, 1, true)))
                }
            } else {
                let last = pre[pre.len() - 1];
                let links = i + 1 - pre.len();
                let chain = (0..links)
                    .map(|k| {
                        let cout = if k + 1 == links { cur[i] } else { last };
                        c.conv_norm(&(&q / k), last, cout, 3, 2, true)
                    })
                    .collect();
                Transition::New(chain)
            }
        })
        .collect()
}

fn apply_transition(layers: &[Transition], prev: &[Tensor], train: bool) -> Vec<Tensor> {
    let last = &prev[prev.len() - 1];
    layers
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Transition::Identity => prev[i].shallow_clone(),
            Transition::Adapt(cn) => cn.forward_t(&prev[i], train),
            Transition::New(chain) => {
                let mut h = last.shallow_clone();
                for cn in chain {
                    h = cn.forward_t(&h, train);
                }
                h
            }
        })
        .collect()
}

/// Fuse-layer path from branch j into branch i.
enum Fuse {
    Identity,
    /// j > i: 1x1 conv + norm, then upsampling by 2^(j-i).
    Up(Box<UpPath>),
    /// j < i: i - j stride-2 3x3 conv + norm links (ReLU after all but the last).
    Down(Vec<ConvNorm>),
}

/// 1x1 conv + norm (`.0`, `.1`), then upsampling by `factor` = 2^(j-i).
struct UpPath {
    conv: nn::Conv2D,
    norm: NormLayer,
    factor: i64,
}

/// A high-resolution module: parallel branches of BasicBlocks, then every branch receives the sum of
/// all branches brought to its resolution and width, followed by ReLU.
struct HrModule {
    branches: Vec<Vec<BasicBlock>>,
    fuse: Vec<Vec<Fuse>>,
    upsample: Upsample,
}

impl HrModule {
    fn new(p: &nn::Path, c: Ctx, widths: &[i64], blocks: usize, upsample: Upsample) -> HrModule {
        let bp = p / "branches";
        let branches = widths
            .iter()
            .enumerate()
            .map(|(b, &w)| (0..blocks).map(|k| BasicBlock::new(&(&bp / b / k), c, w, w)).collect())
            .collect();
        let fp = p / "fuse_layers";
        let n = widths.len();
        let fuse = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let q = &fp / i / j;
                        if j > i {
                            Fuse::Up(Box::new(UpPath {
                                conv: c.conv(&q / 0, widths[j], widths[i], 1, 1),
                                norm: c.norm(&q / 1, widths[i]),
                                factor: 1 << (j - i),
                            }))
                        } else if j == i {
                            Fuse::Identity
                        } else {
                            let links = i - j;
                            Fuse::Down(
                                (0..links)
                                    .map(|k| {
                                        let last = k + 1 == links;
                                        let cout = if last { widths[i] } else { widths[j] };
                                        c.conv_norm(&(&q / k), widths[j], cout, 3, 2, !last)
                                    })
                                    .collect(),
                            )
                        }
                    })
                    .collect()
            })
            .collect();
        HrModule { branches, fuse, upsample }
    }

    fn forward_t(&self, xs: &[Tensor], train: bool) -> Vec<Tensor> {
        let xs: Vec<Tensor> = self
            .branches
            .iter()
            .zip(xs)
            .map(|(blocks, x)| {
                let mut h = x.shallow_clone();
                for b in blocks {
                    h = b.forward_t(&h, train);
                }
                h
            })
            .collect();
        self.fuse
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let size = xs[i].size();
                let (h, w) = (size[2], size[3]);
                // Summed in j order, starting from j = 0, as the official and timm's modules do.
                let mut y: Option<Tensor> = None;
                for (j, f) in row.iter().enumerate() {
                    let t = match f {
                        Fuse::Identity => xs[j].shallow_clone(),
                        Fuse::Up(up) => {
                            let t = up.norm.forward_t(&up.conv.forward(&xs[j]), train);
                            match self.upsample {
                                Upsample::Bilinear => t.upsample_bilinear2d([h, w], false, None, None),
                                // PyTorch's `nn.Upsample(scale_factor=s)` passes s to the kernel: the
                                // same source indices as here when the size is exactly s times larger.
                                Upsample::Nearest => {
                                    let s = up.factor as f64;
                                    t.upsample_nearest2d([h, w], Some(s), Some(s))
                                }
                            }
                        }
                        Fuse::Down(chain) => {
                            let mut t = xs[j].shallow_clone();
                            for cn in chain {
                                t = cn.forward_t(&t, train);
                            }
                            t
                        }
                    };
                    y = Some(match y {
                        None => t,
                        Some(acc) => acc + t,
                    });
                }
                match y {
                    // The sum of at least two terms: a fresh tensor.
                    Some(y) if row.len() > 1 => relu_owned(y),
                    Some(y) => y.relu(),
                    None => unreachable!("a fuse row has one entry per branch"),
                }
            })
            .collect()
    }
}

/// HRNetV2 backbone: stem, layer1, three stages; the four branch maps at strides 4, 8, 16, 32.
pub struct HrNet {
    conv1: nn::Conv2D,
    bn1: NormLayer,
    conv2: nn::Conv2D,
    bn2: NormLayer,
    layer1: Vec<Bottleneck>,
    transitions: Vec<Vec<Transition>>,
    stages: Vec<Vec<HrModule>>,
    spec: HrNetSpec,
    upsample: Upsample,
}

impl HrNet {
    /// Builds the backbone's variables under `p` (see the module documentation for the names).
    /// `groups` is used by [`Norm::Group`] only (see [`group_count`]).
    ///
    /// # Panics
    /// On a spec that fails [`HrNetSpec::validate`] (the presets pass).
    pub fn new(p: nn::Path, spec: &HrNetSpec, in_channels: i64, norm: Norm, groups: u32, upsample: Upsample) -> HrNet {
        if let Err(e) = spec.validate() {
            panic!("invalid HRNet spec: {e:#}");
        }
        let c = Ctx { norm, groups };
        let stem = spec.stem_width;
        let conv1 = c.conv(&p / "conv1", in_channels, stem, 3, 2);
        let bn1 = c.norm(&p / "bn1", stem);
        let conv2 = c.conv(&p / "conv2", stem, stem, 3, 2);
        let bn2 = c.norm(&p / "bn2", stem);
        let l1 = &p / "layer1";
        let mut cin = stem;
        let layer1 = (0..spec.layer1_blocks)
            .map(|k| {
                let b = Bottleneck::new(&(&l1 / k), c, cin, spec.layer1_planes);
                cin = spec.layer1_planes * Bottleneck::EXPANSION;
                b
            })
            .collect();
        let mut pre = vec![cin];
        let mut transitions = Vec::new();
        let mut stages = Vec::new();
        for (k, s) in spec.stages.iter().enumerate() {
            transitions.push(transition(&(&p / format!("transition{}", k + 1)), c, &pre, &s.widths));
            let sp = &p / format!("stage{}", k + 2);
            stages.push((0..s.modules).map(|m| HrModule::new(&(&sp / m), c, &s.widths, s.blocks, upsample)).collect());
            pre.clone_from(&s.widths);
        }
        HrNet { conv1, bn1, conv2, bn2, layer1, transitions, stages, spec: spec.clone(), upsample }
    }

    pub fn spec(&self) -> &HrNetSpec {
        &self.spec
    }

    pub fn upsample(&self) -> Upsample {
        self.upsample
    }

    /// `x`: N x in_channels x H x W -> the four branch maps (N x width_b x H/2^(b+2) x W/2^(b+2), b = 0..3;
    /// 80/40/20/10 pixels at 320). `train` selects batch statistics (and running-statistic updates) in the
    /// BatchNorm layers.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let h = relu_owned(self.bn1.forward_t(&self.conv1.forward(x), train));
        let mut h = relu_owned(self.bn2.forward_t(&self.conv2.forward(&h), train));
        for b in &self.layer1 {
            h = b.forward_t(&h, train);
        }
        let mut ys = vec![h];
        for (t, modules) in self.transitions.iter().zip(&self.stages) {
            let mut xs = apply_transition(t, &ys, train);
            for m in modules {
                xs = m.forward_t(&xs, train);
            }
            ys = xs;
        }
        ys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn build(spec: &HrNetSpec, in_channels: i64, norm: Norm, upsample: Upsample) -> (nn::VarStore, HrNet) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = HrNet::new(vs.root(), spec, in_channels, norm, 32, upsample);
        (vs, net)
    }

    fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn shapes(outs: &[Tensor]) -> Vec<Vec<i64>> {
        outs.iter().map(Tensor::size).collect()
    }

    #[test]
    fn branch_maps_have_strides_4_to_32() {
        tch::manual_seed(0);
        let (vs, small) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let outs = small.forward_t(&x, true);
        assert_eq!(shapes(&outs), vec![vec![2, 8, 16, 16], vec![2, 16, 8, 8], vec![2, 32, 4, 4], vec![2, 64, 2, 2]]);
        // The in-place ReLUs leave autograd intact: every parameter gets a gradient.
        let loss = outs.iter().map(|o| (o * o.randn_like()).sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
        for (name, t) in sorted(&vs).iter().filter(|(_, t)| t.requires_grad()) {
            assert!(t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0, "no gradient for {name}");
        }
        // One input channel (depth).
        let (_vs, depth) = build(&HrNetSpec::small(), 1, Norm::Batch, Upsample::Nearest);
        let d = Tensor::randn([1, 1, 64, 64], (Kind::Float, Device::Cpu));
        assert_eq!(shapes(&depth.forward_t(&d, false))[3], vec![1, 64, 2, 2]);

        let (_vs, w18) = build(&HrNetSpec::w18(), 3, Norm::Batch, Upsample::Bilinear);
        let outs = tch::no_grad(|| w18.forward_t(&x.narrow(0, 0, 1), false));
        assert_eq!(shapes(&outs), vec![vec![1, 18, 16, 16], vec![1, 36, 8, 8], vec![1, 72, 4, 4], vec![1, 144, 2, 2]]);
        assert_eq!(HrNetSpec::w18().out_channels(), 270);
        assert_eq!(HrNetSpec::small().out_channels(), 120);
        // Sizes that are not multiples of 32 work in both modes (the fuse layers resize to the target).
        let odd = Tensor::randn([1, 3, 50, 70], (Kind::Float, Device::Cpu));
        for mode in [Upsample::Bilinear, Upsample::Nearest] {
            let (_vs, net) = build(&HrNetSpec::small(), 3, Norm::Batch, mode);
            let s = shapes(&net.forward_t(&odd, false));
            assert_eq!(s[0], vec![1, 8, 13, 18]);
            assert_eq!(s[3], vec![1, 64, 2, 3]);
        }
    }

    /// FNV-1a (64 bits) of the text.
    fn fnv1a(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    #[test]
    fn w18_layout_is_timms() {
        let (vs, _net) = build(&HrNetSpec::w18(), 3, Norm::Batch, Upsample::Nearest);
        let vars = sorted(&vs);
        // From timm 1.0.31:
        //   m = timm.create_model('hrnet_w18', pretrained=False, features_only=True, feature_location='',
        //                         out_indices=(1, 2, 3, 4))
        //   sd = m.state_dict()  -> 1830 entries, 9_596_501 elements; m.parameters() -> 915 tensors,
        //   9_562_260 elements; and the FNV-1a 64 of "".join(f"{k} {list(v.shape)}\n" for k in sorted(sd)),
        //   shapes written as Python prints lists ("[64, 3, 3, 3]", "[]").
        assert_eq!(vars.len(), 1830);
        assert_eq!(vars.iter().map(|(_, t)| t.numel()).sum::<usize>(), 9_596_501);
        let trainable: Vec<&(String, Tensor)> = vars.iter().filter(|(_, t)| t.requires_grad()).collect();
        assert_eq!(trainable.len(), 915);
        assert_eq!(trainable.iter().map(|(_, t)| t.numel()).sum::<usize>(), 9_562_260);
        let listing: String = vars
            .iter()
            .map(|(n, t)| {
                let dims: Vec<String> = t.size().iter().map(i64::to_string).collect();
                format!("{n} [{}]\n", dims.join(", "))
            })
            .collect();
        assert_eq!(fnv1a(&listing), 0x08c2_e7c2_6b80_3f10, "names or shapes differ from timm's hrnet_w18");
        let find = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, t)| t.size());
        assert_eq!(find("transition1.1.0.0.weight"), Some(vec![36, 256, 3, 3]));
        assert_eq!(find("stage4.2.fuse_layers.3.0.2.0.weight"), Some(vec![144, 18, 3, 3]));
        assert_eq!(find("stage4.2.fuse_layers.0.3.1.num_batches_tracked"), Some(vec![]));
        assert_eq!(find("layer1.0.downsample.0.weight"), Some(vec![256, 64, 1, 1]));
    }

    #[test]
    fn names_are_stable_and_init_is_seeded() {
        let names = |vs: &nn::VarStore| -> Vec<(String, Vec<i64>)> {
            sorted(vs).into_iter().map(|(n, t)| (n, t.size())).collect()
        };
        tch::manual_seed(5);
        let (a, _) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        tch::manual_seed(5);
        let (b, _) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        tch::manual_seed(6);
        let (c, _) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        assert_eq!(names(&a), names(&b));
        assert_eq!(names(&a), names(&c));
        let (va, vb, vc) = (sorted(&a), sorted(&b), sorted(&c));
        for ((n, ta), (_, tb)) in va.iter().zip(&vb) {
            assert!(ta.equal(tb), "{n}: same seed, different values");
        }
        let w = |v: &[(String, Tensor)]| v.iter().find(|(n, _)| n == "conv1.weight").map(|(_, t)| t.copy());
        let (wa, wc) = (w(&va).expect("conv1"), w(&vc).expect("conv1"));
        assert!(!wa.equal(&wc), "another seed gives other weights");
        // Official init: std 0.001 convolutions, unit norm weights, zero biases.
        let std = wa.std(true).double_value(&[]);
        assert!((0.0005..0.002).contains(&std), "conv1 std {std}");
        let bn1 = va.iter().find(|(n, _)| n == "bn1.weight").map(|(_, t)| t.copy()).expect("bn1");
        assert!(bn1.equal(&Tensor::ones([16], (Kind::Float, Device::Cpu))));
    }

    #[test]
    fn group_norm_variant() {
        assert_eq!(
            [18, 36, 72, 144, 64, 256].map(|c| group_count(c, 32)),
            [18, 18, 24, 24, 32, 32],
            "largest divisor not above 32"
        );
        assert_eq!(group_count(8, 4), 4);
        assert_eq!(group_count(7, 4), 1);
        assert_eq!(group_count(16, 0), 1);
        tch::manual_seed(1);
        let (mut vs, net) = build(&HrNetSpec::small(), 3, Norm::Group, Upsample::Bilinear);
        vs.double();
        let vars = sorted(&vs);
        assert!(vars.iter().all(|(n, _)| !n.contains("running") && !n.contains("num_batches")));
        assert!(vars.iter().any(|(n, _)| n == "bn1.weight") && vars.iter().any(|(n, _)| n == "bn1.bias"));
        assert!(vars.iter().all(|(_, t)| t.requires_grad()), "GroupNorm has no buffers");
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Double, Device::Cpu));
        let outs = net.forward_t(&x, true);
        assert_eq!(outs[3].size(), vec![2, 64, 2, 2]);
        // No batch statistics: a sample's output does not depend on the rest of the batch.
        let alone = net.forward_t(&x.narrow(0, 0, 1), true);
        let d = (&outs[0].narrow(0, 0, 1) - &alone[0]).abs().max().double_value(&[]);
        assert!(d < 1e-9, "{d}");
        let loss = outs.iter().map(|o| o.square().mean(Kind::Double)).fold(Tensor::from(0.0f64), |a, b| a + b);
        loss.backward();
        let conv1 = vars.iter().find(|(n, _)| n == "conv1.weight").map(|(_, t)| t.grad()).expect("conv1");
        assert!(conv1.abs().sum(Kind::Double).double_value(&[]) > 0.0, "gradients reach the stem");
    }

    #[test]
    fn num_batches_tracked_counts_train_forwards_only() {
        tch::manual_seed(2);
        let (mut vs, net) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let counters = |vs: &nn::VarStore| -> Vec<(Kind, i64)> {
            sorted(vs)
                .iter()
                .filter(|(n, _)| n.ends_with("num_batches_tracked"))
                .map(|(_, t)| (t.kind(), t.int64_value(&[])))
                .collect()
        };
        let stats = |vs: &nn::VarStore| -> Tensor {
            let v: Vec<Tensor> = sorted(vs)
                .iter()
                .filter(|(n, _)| n.ends_with("running_mean"))
                .map(|(_, t)| t.to_kind(Kind::Double))
                .collect();
            Tensor::cat(&v, 0)
        };
        let c0 = counters(&vs);
        assert!(!c0.is_empty() && c0.iter().all(|&c| c == (Kind::Int64, 0)));
        let _ = net.forward_t(&x, true);
        let _ = net.forward_t(&x, true);
        let after_train = stats(&vs);
        assert!(after_train.abs().max().double_value(&[]) > 0.0, "running means move in train mode");
        let _ = tch::no_grad(|| net.forward_t(&x, false));
        assert!(counters(&vs).iter().all(|&c| c == (Kind::Int64, 2)), "{:?}", counters(&vs));
        assert!(stats(&vs).equal(&after_train), "eval mode leaves running statistics alone");
        // f64 runs: `double()` casts floating-point variables only; the counter stays int64 and counts on.
        vs.double();
        let _ = net.forward_t(&x.to_kind(Kind::Double), true);
        assert!(counters(&vs).iter().all(|&c| c == (Kind::Int64, 3)), "{:?}", counters(&vs));
        let bn = sorted(&vs).into_iter().find(|(n, _)| n == "bn1.running_var").map(|(_, t)| t.kind());
        assert_eq!(bn, Some(Kind::Double));
    }

    #[test]
    fn batch_norm_follows_pytorch_momentum_convention() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(vs.root() / "bn", 3);
        let x = Tensor::randn([4, 3, 5, 5], (Kind::Float, Device::Cpu)) * 2.0 + 1.0;
        let y = bn.forward_t(&x, true);
        let mean = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let var = x.var_dim([0i64, 2, 3].as_slice(), true, false);
        let want_mean = &mean * BN_MOMENTUM;
        let want_var = &var * BN_MOMENTUM + (1.0 - BN_MOMENTUM);
        assert!(bn.running_mean.allclose(&want_mean, 1e-5, 1e-6, false));
        assert!(bn.running_var.allclose(&want_var, 1e-5, 1e-6, false), "unbiased variance, momentum 0.01");
        // Train mode normalises with the biased batch variance.
        let biased = x.var_dim([0i64, 2, 3].as_slice(), false, true);
        let want_y = (&x - mean.view([1, 3, 1, 1])) / (biased + NORM_EPS).sqrt();
        assert!(y.allclose(&want_y, 1e-4, 1e-5, false));
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 1);
    }

    #[test]
    fn upsample_modes_differ_and_parse() {
        assert_eq!("nearest".parse::<Upsample>().ok(), Some(Upsample::Nearest));
        assert_eq!("bilinear".parse::<Upsample>().ok(), Some(Upsample::Bilinear));
        assert!("cubic".parse::<Upsample>().is_err());
        assert_eq!(Upsample::Nearest.to_string(), "nearest");
        tch::manual_seed(3);
        let (vs, a) = build(&HrNetSpec::small(), 3, Norm::Batch, Upsample::Bilinear);
        let vs2 = nn::VarStore::new(Device::Cpu);
        let b = HrNet::new(vs2.root(), &HrNetSpec::small(), 3, Norm::Batch, 32, Upsample::Nearest);
        tch::no_grad(|| {
            for ((_, src), (_, dst)) in sorted(&vs).iter().zip(sorted(&vs2).iter_mut()) {
                dst.copy_(src);
            }
        });
        let x = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
        let (ya, yb) = (a.forward_t(&x, true), b.forward_t(&x, true));
        for (a, b) in ya.iter().zip(&yb) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d > 1e-3, "same weights, other upsampling: outputs must differ ({d})");
        }
        assert!(HrNetSpec::by_name("hrnet_w18").is_ok_and(|s| s == HrNetSpec::w18()));
        assert!(HrNetSpec::by_name("resnet50").is_err());
    }
}
