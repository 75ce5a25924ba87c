//! The first-cut model: a small strided-convolution encoder per image modality with a global head,
//! and a keypoint encoder. CPU-friendly; the HRNet-W18 and SemGCN encoders replace these behind the
//! same [`Model`] interface.
//!
//! Variables live in one `VarStore` under `rgb.*`, `depth.*`, `kp.*`. Parameters (trainable) and
//! buffers (BatchNorm running statistics) are listed in name order, identical on every rank, which is
//! what gradient all-reduce and buffer broadcast rely on.

use hcmoco_proto::config::{Dtype, ModelConfig, Norm};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// BatchNorm momentum (PyTorch convention), as in the method's reference.
pub const BN_MOMENTUM: f64 = 0.01;

enum NormLayer {
    Batch(nn::BatchNorm),
    Group(nn::GroupNorm),
    None,
}

impl NormLayer {
    fn new(p: nn::Path, cfg: &ModelConfig, channels: i64) -> NormLayer {
        match cfg.norm {
            Norm::Batch => NormLayer::Batch(nn::batch_norm2d(
                p,
                channels,
                nn::BatchNormConfig { momentum: BN_MOMENTUM, ..Default::default() },
            )),
            Norm::Group => NormLayer::Group(nn::group_norm(p, i64::from(cfg.groups), channels, Default::default())),
            Norm::None => NormLayer::None,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            NormLayer::Batch(bn) => bn.forward_t(x, train),
            NormLayer::Group(gn) => gn.forward(x),
            NormLayer::None => x.shallow_clone(),
        }
    }
}

/// Strided conv stack -> global average pool -> linear head (`embed_dim`).
pub struct ImageEncoder {
    convs: Vec<(nn::Conv2D, NormLayer)>,
    head: nn::Linear,
}

impl ImageEncoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig, in_channels: i64) -> ImageEncoder {
        let w = i64::from(cfg.width);
        // (in, out, stride): three stride-2 stages then one stride-1 stage (output stride 8).
        let stages = [(in_channels, w, 2), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)];
        let convs = stages
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, stride))| {
                let conv_cfg =
                    nn::ConvConfig { stride, padding: 1, bias: cfg.norm == Norm::None, ..Default::default() };
                let conv = nn::conv2d(&p / format!("conv{i}"), cin, cout, 3, conv_cfg);
                (conv, NormLayer::new(&p / format!("norm{i}"), cfg, cout))
            })
            .collect();
        let head = nn::linear(&p / "head", 4 * w, i64::from(cfg.embed_dim), Default::default());
        ImageEncoder { convs, head }
    }

    /// `x`: N x C x H x W -> N x embed_dim (before normalisation).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for (conv, norm) in &self.convs {
            h = norm.forward(&conv.forward(&h), train).relu();
        }
        let pooled = h.mean_dim([2i64, 3].as_slice(), false, None::<Kind>);
        self.head.forward(&pooled)
    }
}

/// Normalised 2D joints (J x 2, flattened) -> MLP -> embed_dim.
pub struct KeypointEncoder {
    layers: Vec<nn::Linear>,
}

impl KeypointEncoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig, joints: i64) -> KeypointEncoder {
        let h = i64::from(cfg.keypoint_hidden);
        let layers = vec![
            nn::linear(&p / "fc0", 2 * joints, h, Default::default()),
            nn::linear(&p / "fc1", h, h, Default::default()),
            nn::linear(&p / "fc2", h, i64::from(cfg.embed_dim), Default::default()),
        ];
        KeypointEncoder { layers }
    }

    /// `x`: N x (2J) -> N x embed_dim (before normalisation).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let last = self.layers.len() - 1;
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = h.relu();
            }
        }
        h
    }
}

/// The three encoders and their variables.
pub struct Model {
    pub vs: nn::VarStore,
    pub rgb: ImageEncoder,
    pub depth: ImageEncoder,
    pub kp: KeypointEncoder,
    pub kind: Kind,
    /// Width of the global embeddings.
    pub embed_dim: i64,
}

pub fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
    }
}

impl Model {
    /// Builds the model with weights drawn from libtorch's generator seeded by `seed`.
    pub fn new(cfg: &ModelConfig, joints: i64, seed: u64, device: Device) -> Model {
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let rgb = ImageEncoder::new(&root / "rgb", cfg, 3);
        let depth = ImageEncoder::new(&root / "depth", cfg, 1);
        let kp = KeypointEncoder::new(&root / "kp", cfg, joints);
        let kind = kind_of(cfg.dtype);
        vs.set_kind(kind);
        Model { vs, rgb, depth, kp, kind, embed_dim: i64::from(cfg.embed_dim) }
    }

    /// Trainable parameters in name order.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Non-trainable state (BatchNorm running statistics) in name order.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every variable, copied to the CPU (for files).
    pub fn state_on_cpu(&self) -> Vec<(String, Tensor)> {
        self.state().into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect()
    }

    /// Every variable (parameters and buffers) in name order.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Flattens tensors into one 1-D tensor (a bucket), in order.
pub fn flatten(tensors: &[Tensor], kind: Kind) -> Tensor {
    if tensors.is_empty() {
        return Tensor::zeros([0], (kind, Device::Cpu));
    }
    let flat: Vec<Tensor> = tensors.iter().map(|t| t.detach().to_kind(kind).reshape([-1])).collect();
    Tensor::cat(&flat, 0)
}

/// Copies a flat bucket back into `targets` (shapes taken from the targets), without tracking grads.
pub fn unflatten_into(flat: &Tensor, targets: &[Tensor]) {
    let _guard = tch::no_grad_guard();
    let mut offset = 0i64;
    for t in targets {
        let n = t.numel() as i64;
        let mut t = t.shallow_clone();
        t.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
        offset += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcmoco_proto::config::ModelConfig;

    #[test]
    fn same_seed_same_weights_and_stable_order() {
        let cfg = ModelConfig { width: 4, embed_dim: 8, keypoint_hidden: 8, ..Default::default() };
        let a = Model::new(&cfg, 16, 3, Device::Cpu);
        let b = Model::new(&cfg, 16, 3, Device::Cpu);
        let (pa, pb) = (a.parameters(), b.parameters());
        assert_eq!(pa.len(), pb.len());
        for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na}");
        }
        // BatchNorm configuration: running statistics are buffers, not parameters.
        assert!(a.buffers().iter().any(|(n, _)| n.ends_with("running_mean")));
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(a.rgb.forward(&x, true).size(), vec![2, 8]);
    }

    #[test]
    fn flatten_round_trip() {
        let ts = vec![Tensor::from_slice(&[1.0f64, 2.0]), Tensor::from_slice(&[3.0f64, 4.0, 5.0, 6.0]).view([2, 2])];
        let flat = flatten(&ts, Kind::Double);
        let targets =
            vec![Tensor::zeros([2], (Kind::Double, Device::Cpu)), Tensor::zeros([2, 2], (Kind::Double, Device::Cpu))];
        unflatten_into(&flat, &targets);
        assert!(targets[0].equal(&ts[0]) && targets[1].equal(&ts[1]));
    }
}
