//! The HCMoCo model: an HRNet encoder per image modality (RGB, depth) with a global and a dense head,
//! and a SemGCN keypoint encoder with a skeleton global head (method page, "Encoders").
//!
//! Variables live in one `VarStore`:
//! - `rgb.backbone.*`, `depth.backbone.*`: HRNet with the official layout's names ([`crate::hrnet`]);
//! - `rgb.global_head.{weight,bias}`: Linear(sum of branch widths -> embed_dim) on the concatenated
//!   global-average-pooled branches;
//! - `rgb.dense_head.{weight,bias}`: a 1x1 convolution (sum of branch widths -> embed_dim) on branch 1
//!   concatenated with branches 2-4 upsampled bilinearly (align_corners false) to its size;
//! - the same under `depth.*` (one input channel);
//! - `kp.gcn.*` ([`crate::semgcn`]) and `kp.global_head.*`: Linear(embed_dim -> embed_dim) on the mean
//!   over joints.
//!
//! Parameters (trainable) and buffers (normalisation statistics) are listed in name order, identical on
//! every rank, which is what gradient all-reduce and buffer broadcast rely on.

use hcmoco_data::KeypointLayout;
use hcmoco_proto::config::{Dtype, ModelConfig};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::export::ImageModality;
use crate::hrnet::{HrNet, HrNetSpec, Upsample};
use crate::semgcn::SemGcn;

/// An image encoder: HRNet backbone, global head and dense head.
pub struct ImageEncoder {
    pub backbone: HrNet,
    global_head: nn::Linear,
    dense_head: nn::Conv2D,
}

impl ImageEncoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig, spec: &HrNetSpec, in_channels: i64) -> anyhow::Result<ImageEncoder> {
        let upsample: Upsample = cfg.upsample.parse()?;
        let backbone = HrNet::new(&p / "backbone", spec, in_channels, cfg.norm, cfg.groups, upsample);
        let (c, d) = (spec.out_channels(), i64::from(cfg.embed_dim));
        let global_head = nn::linear(&p / "global_head", c, d, Default::default());
        let dense_head = nn::conv2d(&p / "dense_head", c, d, 1, Default::default());
        Ok(ImageEncoder { backbone, global_head, dense_head })
    }

    /// The four branch maps (strides 4, 8, 16, 32).
    pub fn branches(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        self.backbone.forward_t(x, train)
    }

    /// Global embedding (N x embed_dim, before normalisation) from the branch maps.
    pub fn global(&self, maps: &[Tensor]) -> Tensor {
        let pooled: Vec<Tensor> = maps.iter().map(|m| m.mean_dim([2i64, 3].as_slice(), false, None::<Kind>)).collect();
        self.global_head.forward(&Tensor::cat(&pooled, 1))
    }

    /// Dense map (N x embed_dim x h x w at stride 4, before normalisation) from the branch maps.
    pub fn dense(&self, maps: &[Tensor]) -> Tensor {
        let size = maps[0].size();
        let (h, w) = (size[2], size[3]);
        let mut all = vec![maps[0].shallow_clone()];
        all.extend(maps[1..].iter().map(|m| m.upsample_bilinear2d([h, w], false, None, None)));
        self.dense_head.forward(&Tensor::cat(&all, 1))
    }
}

/// The keypoint encoder: SemGCN over the skeleton, plus the skeleton global head.
pub struct KeypointEncoder {
    pub gcn: SemGcn,
    global_head: nn::Linear,
}

impl KeypointEncoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig, layout: KeypointLayout) -> KeypointEncoder {
        let d = i64::from(cfg.embed_dim);
        let gcn = SemGcn::new(
            &p / "gcn",
            layout,
            i64::from(cfg.keypoint_hidden),
            d,
            cfg.keypoint_blocks as usize,
            cfg.norm,
            cfg.groups,
        );
        let global_head = nn::linear(&p / "global_head", d, d, Default::default());
        KeypointEncoder { gcn, global_head }
    }

    /// `x`: N x J x 2 normalised joints -> (global embedding N x embed_dim, per-joint outputs
    /// N x J x embed_dim), both before normalisation.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let g = self.gcn.forward_t(x, train);
        let z = self.global_head.forward(&g.mean_dim([1i64].as_slice(), false, None::<Kind>));
        (z, g)
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
    pub fn new(cfg: &ModelConfig, layout: KeypointLayout, seed: u64, device: Device) -> anyhow::Result<Model> {
        let spec = HrNetSpec::by_name(&cfg.backbone)?;
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let rgb = ImageEncoder::new(&root / "rgb", cfg, &spec, 3)?;
        let depth = ImageEncoder::new(&root / "depth", cfg, &spec, 1)?;
        let kp = KeypointEncoder::new(&root / "kp", cfg, layout);
        let kind = kind_of(cfg.dtype);
        // Floating-point variables only: BatchNorm's `num_batches_tracked` stays int64, as in PyTorch.
        match kind {
            Kind::Double => vs.double(),
            _ => vs.float(),
        }
        Ok(Model { vs, rgb, depth, kp, kind, embed_dim: i64::from(cfg.embed_dim) })
    }

    /// Loads a backbone from a safetensors file in PyTorch's layout (the official HRNet names, no
    /// prefix: a timm `hrnet_w18` features state dict, or an `hcmoco-worker export`). A missing, extra
    /// or mis-shaped tensor is refused, naming it.
    pub fn load_backbone(&self, modality: ImageModality, path: &std::path::Path) -> anyhow::Result<()> {
        let vars = crate::weights::strip_prefix(&self.state(), &modality.checkpoint_prefix());
        crate::weights::load_into(path, &vars)?;
        Ok(())
    }

    /// Whether a variable belongs to a dense head (new in stage 2: not loaded from stage 1).
    pub fn is_dense_head(name: &str) -> bool {
        name.starts_with("rgb.dense_head.") || name.starts_with("depth.dense_head.")
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

#[cfg(test)]
mod tests {
    use super::*;
    use hcmoco_data::KeypointLayout;
    use hcmoco_proto::config::ModelConfig;

    fn small() -> ModelConfig {
        ModelConfig { backbone: "hrnet_small".into(), embed_dim: 8, keypoint_hidden: 8, ..Default::default() }
    }

    #[test]
    fn same_seed_same_weights_and_stable_order() {
        let cfg = small();
        let a = Model::new(&cfg, KeypointLayout::Mpii16, 3, Device::Cpu).expect("model");
        let b = Model::new(&cfg, KeypointLayout::Mpii16, 3, Device::Cpu).expect("model");
        let (pa, pb) = (a.parameters(), b.parameters());
        assert_eq!(pa.len(), pb.len());
        for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na}");
        }
        // BatchNorm configuration: running statistics are buffers, not parameters.
        assert!(a.buffers().iter().any(|(n, _)| n.ends_with("running_mean")));
        let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let maps = a.rgb.branches(&x, true);
        assert_eq!(a.rgb.global(&maps).size(), vec![2, 8]);
        assert_eq!(a.rgb.dense(&maps).size(), vec![2, 8, 8, 8], "stride 4");
        let kp = Tensor::rand([2, 16, 2], (Kind::Float, Device::Cpu));
        let (z, g) = a.kp.forward_t(&kp, true);
        assert_eq!((z.size(), g.size()), (vec![2, 8], vec![2, 16, 8]));
        // The heads' names are the ones export and the Python reference rely on.
        let names: Vec<String> = a.state().into_iter().map(|(n, _)| n).collect();
        for want in
            ["rgb.global_head.weight", "rgb.dense_head.bias", "depth.backbone.conv1.weight", "kp.global_head.bias"]
        {
            assert!(names.iter().any(|n| n == want), "{want} missing");
        }
        assert!(Model::is_dense_head("depth.dense_head.weight") && !Model::is_dense_head("rgb.global_head.weight"));
    }
}
