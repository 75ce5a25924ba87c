//! `hcmoco-worker export` and `hcmoco-worker encode`: one image encoder of a checkpoint as a
//! PyTorch-loadable safetensors file, and running such a file on an input tensor.
//!
//! An export holds the backbone's variables under the official HRNet names (the checkpoint's
//! `rgb.backbone.` or `depth.backbone.` prefix stripped), floating-point tensors as f32 and
//! `num_batches_tracked` as int64, so `load_state_dict` of timm's `hrnet_w18` (features_only,
//! `feature_location=''`) takes the RGB export of a BatchNorm `hrnet_w18` job as it is. Its
//! `__metadata__` ([`EncoderMeta`]) records what rebuilds the architecture. See `docs/export.md`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use hcmoco_proto::config::{JobConfig, Norm};
use tch::{Device, Kind, Tensor, nn};

use crate::hrnet::{HrNet, HrNetSpec, Upsample};
use crate::weights::{self, Metadata};

/// `format` metadata value of an exported encoder.
pub const ENCODER_FORMAT: &str = "hcmoco-encoder/1";
/// `format` metadata value of the feature file `encode` writes.
pub const FEATURES_FORMAT: &str = "hcmoco-features/1";
/// Names of the four branch maps `encode` writes (strides 4, 8, 16, 32).
pub const BRANCH_NAMES: [&str; 4] = ["branch1", "branch2", "branch3", "branch4"];

/// The image modality whose encoder is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageModality {
    Rgb,
    Depth,
}

impl ImageModality {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageModality::Rgb => "rgb",
            ImageModality::Depth => "depth",
        }
    }

    /// Input channels of the encoder: 3 (RGB) or 1 (depth).
    pub fn in_channels(self) -> i64 {
        match self {
            ImageModality::Rgb => 3,
            ImageModality::Depth => 1,
        }
    }

    /// The prefix of the backbone's variables in a checkpoint's `model.safetensors`.
    pub fn checkpoint_prefix(self) -> String {
        format!("{}.backbone.", self.as_str())
    }
}

impl FromStr for ImageModality {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<ImageModality> {
        match s {
            "rgb" => Ok(ImageModality::Rgb),
            "depth" => Ok(ImageModality::Depth),
            _ => anyhow::bail!("modality {s:?}: expected \"rgb\" or \"depth\""),
        }
    }
}

impl fmt::Display for ImageModality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The job-file spelling of a norm (`batch`, `group`, `none`).
pub fn norm_name(norm: Norm) -> &'static str {
    match norm {
        Norm::Batch => "batch",
        Norm::Group => "group",
        Norm::None => "none",
    }
}

fn parse_norm(s: &str) -> anyhow::Result<Norm> {
    match s {
        "batch" => Ok(Norm::Batch),
        "group" => Ok(Norm::Group),
        "none" => Ok(Norm::None),
        _ => anyhow::bail!("norm {s:?}: expected \"batch\", \"group\" or \"none\""),
    }
}

/// What rebuilds an exported encoder: the `__metadata__` of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderMeta {
    pub modality: ImageModality,
    /// HRNet preset name (`hrnet_w18`, `hrnet_small`).
    pub backbone: String,
    pub in_channels: i64,
    pub norm: Norm,
    /// GroupNorm's `model.groups` (recorded for every norm).
    pub groups: u32,
    pub upsample: Upsample,
}

impl EncoderMeta {
    /// The encoder of `modality` in a job.
    pub fn of_job(cfg: &JobConfig, modality: ImageModality) -> anyhow::Result<EncoderMeta> {
        Ok(EncoderMeta {
            modality,
            backbone: cfg.model.backbone.clone(),
            in_channels: modality.in_channels(),
            norm: cfg.model.norm,
            groups: cfg.model.groups,
            upsample: cfg.model.upsample.parse().context("job file key `model.upsample`")?,
        })
    }

    pub fn spec(&self) -> anyhow::Result<HrNetSpec> {
        HrNetSpec::by_name(&self.backbone)
    }

    /// The metadata map written into an export (`source` and `branch_channels` are informational).
    pub fn to_metadata(&self) -> anyhow::Result<Metadata> {
        let spec = self.spec()?;
        let branches: Vec<String> = spec.branch_channels().iter().map(i64::to_string).collect();
        Ok([
            ("format", ENCODER_FORMAT.to_string()),
            ("modality", self.modality.as_str().to_string()),
            ("backbone", self.backbone.clone()),
            ("in_channels", self.in_channels.to_string()),
            ("norm", norm_name(self.norm).to_string()),
            ("groups", self.groups.to_string()),
            ("upsample", self.upsample.as_str().to_string()),
            ("branch_channels", branches.join(",")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
    }

    /// Reads the metadata of the export at `path` (named in errors).
    pub fn from_metadata(path: &Path, m: &Metadata) -> anyhow::Result<EncoderMeta> {
        let get = |key: &str| -> anyhow::Result<&str> {
            m.get(key).map(String::as_str).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: metadata key {key:?} missing (not an encoder written by `hcmoco-worker export`?)",
                    path.display()
                )
            })
        };
        let bad = |key: &str| format!("{}: metadata key {key:?}", path.display());
        let format = get("format")?;
        anyhow::ensure!(format == ENCODER_FORMAT, "{}: format {format:?}, expected {ENCODER_FORMAT:?}", path.display());
        let meta = EncoderMeta {
            modality: get("modality")?.parse().with_context(|| bad("modality"))?,
            backbone: get("backbone")?.to_string(),
            in_channels: get("in_channels")?.parse().with_context(|| bad("in_channels"))?,
            norm: parse_norm(get("norm")?).with_context(|| bad("norm"))?,
            groups: get("groups")?.parse().with_context(|| bad("groups"))?,
            upsample: get("upsample")?.parse().with_context(|| bad("upsample"))?,
        };
        meta.spec().with_context(|| bad("backbone"))?;
        anyhow::ensure!(meta.in_channels > 0, "{}: in_channels must be positive", bad("in_channels"));
        Ok(meta)
    }

    /// Builds the encoder's variables under `p`.
    pub fn build(&self, p: nn::Path) -> anyhow::Result<HrNet> {
        Ok(HrNet::new(p, &self.spec()?, self.in_channels, self.norm, self.groups, self.upsample))
    }

    /// Names and shapes of the encoder's variables, in name order.
    pub fn expected(&self) -> anyhow::Result<Vec<(String, Vec<i64>)>> {
        let vs = nn::VarStore::new(Device::Cpu);
        // Shapes only: the initial values are thrown away.
        let _net = tch::no_grad(|| self.build(vs.root()))?;
        let mut v: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        v.sort();
        Ok(v)
    }
}

/// Where a checkpoint's files are: `DIR/model.safetensors` and `DIR/job.toml`. `path` is a step
/// directory, a checkpoint directory with a `latest` pointer, or a `model.safetensors` file.
pub fn locate_checkpoint(path: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else if path.join("model.safetensors").is_file() {
        path.to_path_buf()
    } else if let Some(latest) = crate::checkpoint::latest(path) {
        latest
    } else if path.is_dir() {
        anyhow::bail!("{}: no model.safetensors, and no `latest` pointer to a checkpoint", path.display());
    } else {
        anyhow::bail!("{}: no such checkpoint file or directory", path.display());
    };
    let model = if path.is_file() { path.to_path_buf() } else { dir.join("model.safetensors") };
    Ok((model, dir.join("job.toml")))
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub model: PathBuf,
    pub meta: EncoderMeta,
    pub tensors: usize,
}

/// Converts a backbone's variables to the export's element types: f32, and int64 counters.
fn to_export_kinds(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|(n, t)| {
            let kind = if n.ends_with("num_batches_tracked") { Kind::Int64 } else { Kind::Float };
            // A counter cast to float by `VarStore::set_kind` holds an integer value: round, not truncate.
            let t = if kind == Kind::Int64 && t.is_floating_point() { t.round() } else { t };
            (n, t.detach().to_device(Device::Cpu).to_kind(kind).contiguous())
        })
        .collect()
}

/// Writes the `modality` encoder of a checkpoint to `output` (see the module documentation).
pub fn export(checkpoint: &Path, modality: ImageModality, output: &Path) -> anyhow::Result<ExportReport> {
    let (model_path, job_path) = locate_checkpoint(checkpoint)?;
    let text = std::fs::read_to_string(&job_path)
        .with_context(|| format!("cannot read the job file {}", job_path.display()))?;
    // Parsed, not validated: a checkpoint written before a limit was tightened still exports.
    let cfg = JobConfig::parse_toml(&text).with_context(|| format!("bad job file {}", job_path.display()))?;
    let meta = EncoderMeta::of_job(&cfg, modality).with_context(|| job_path.display().to_string())?;
    let (all, _) = weights::read(&model_path)?;
    let prefix = modality.checkpoint_prefix();
    let found = weights::strip_prefix(&all, &prefix);
    anyhow::ensure!(
        !found.is_empty(),
        "{}: no tensors named {prefix}* (is it a checkpoint of an HRNet job?)",
        model_path.display()
    );
    let what = format!("{} ({prefix}* of a {} job)", model_path.display(), meta.backbone);
    weights::check_names_and_shapes(&what, &meta.expected()?, &found)?;
    let tensors = to_export_kinds(found);
    let mut metadata = meta.to_metadata()?;
    metadata.insert("source".into(), model_path.display().to_string());
    weights::write(output, &tensors, &metadata)?;
    Ok(ExportReport { model: model_path, meta, tensors: tensors.len() })
}

/// An exported encoder, loaded.
pub struct Encoder {
    pub vs: nn::VarStore,
    pub net: HrNet,
    pub meta: EncoderMeta,
}

/// Loads an export: rebuilds the architecture from its metadata and fills the variables, refusing a file
/// with missing, unexpected or mis-shaped tensors.
pub fn load_encoder(path: &Path, device: Device) -> anyhow::Result<Encoder> {
    let (tensors, metadata) = weights::read(path)?;
    let meta = EncoderMeta::from_metadata(path, &metadata)?;
    let vs = nn::VarStore::new(device);
    let net = tch::no_grad(|| meta.build(vs.root()))?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    weights::copy_into(&path.display().to_string(), &vars, &tensors)?;
    Ok(Encoder { vs, net, meta })
}

impl Encoder {
    /// The four branch maps of `x` (N x in_channels x H x W, floating point), evaluation mode, f32.
    pub fn encode(&self, x: &Tensor) -> anyhow::Result<Vec<Tensor>> {
        let size = x.size();
        anyhow::ensure!(x.is_floating_point(), "input: expected a floating-point tensor, found {:?}", x.kind());
        anyhow::ensure!(size.len() == 4, "input: expected N x C x H x W (4 dimensions), found shape {size:?}");
        anyhow::ensure!(
            size[1] == self.meta.in_channels,
            "input: {} channels, the {} encoder takes {} (shape {size:?})",
            size[1],
            self.meta.modality,
            self.meta.in_channels
        );
        anyhow::ensure!(size.iter().all(|&d| d > 0), "input: empty shape {size:?}");
        let x = x.to_device(self.vs.device()).to_kind(Kind::Float);
        Ok(tch::no_grad(|| self.net.forward_t(&x, false)))
    }
}

/// The input tensor of an `encode` input file: its only tensor, or the one named `input`.
fn pick_input(path: &Path, mut tensors: Vec<(String, Tensor)>) -> anyhow::Result<Tensor> {
    if tensors.len() == 1 {
        return Ok(tensors.remove(0).1);
    }
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    tensors.into_iter().find(|(n, _)| n == "input").map(|(_, t)| t).ok_or_else(|| {
        anyhow::anyhow!("{}: {} tensors {names:?} and none named \"input\"", path.display(), names.len())
    })
}

/// `hcmoco-worker encode`: runs the export at `weights_path` on the input tensor of `input` and writes
/// the four branch maps to `output` as `branch1`..`branch4`. Returns their shapes.
pub fn encode(weights_path: &Path, input: &Path, output: &Path, device: Device) -> anyhow::Result<Vec<Vec<i64>>> {
    let encoder = load_encoder(weights_path, device)?;
    let (tensors, _) = weights::read(input)?;
    let x = pick_input(input, tensors)?;
    let maps = encoder.encode(&x).with_context(|| input.display().to_string())?;
    let named: Vec<(String, Tensor)> = BRANCH_NAMES.iter().map(|n| n.to_string()).zip(maps).collect();
    let mut metadata = Metadata::new();
    metadata.insert("format".into(), FEATURES_FORMAT.into());
    metadata.insert("strides".into(), "4,8,16,32".into());
    metadata.insert("weights".into(), weights_path.display().to_string());
    weights::write(output, &named, &metadata)?;
    Ok(named.iter().map(|(_, t)| t.size()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcmoco_proto::config::{DatasetConfig, Dtype};

    fn job(norm: Norm, upsample: &str) -> JobConfig {
        let mut cfg = JobConfig::default();
        cfg.data.datasets.push(DatasetConfig { manifest: "data/manifest.json".into(), weight: None });
        cfg.model.backbone = "hrnet_small".into();
        cfg.model.norm = norm;
        cfg.model.upsample = upsample.into();
        cfg
    }

    /// A checkpoint directory shaped like the trainer's: both backbones, a head, the keypoint encoder.
    fn write_checkpoint(dir: &Path, cfg: &JobConfig, dtype: Kind) -> Vec<(String, Tensor)> {
        tch::manual_seed(11);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let rgb = EncoderMeta::of_job(cfg, ImageModality::Rgb).and_then(|m| m.build(&root / "rgb" / "backbone"));
        let depth = EncoderMeta::of_job(cfg, ImageModality::Depth).and_then(|m| m.build(&root / "depth" / "backbone"));
        let (rgb, depth) = (rgb.expect("rgb backbone"), depth.expect("depth backbone"));
        let _ = (&root / "rgb" / "global_head").var("weight", &[8, 120], nn::Init::Const(0.5));
        let _ = (&root / "kp" / "input").var("weight", &[2, 8], nn::Init::Const(0.5));
        // As the trainer's `set_kind`: every variable, counters included.
        vs.set_kind(dtype);
        let x = Tensor::randn([2, 3, 32, 32], (dtype, Device::Cpu));
        let d = Tensor::randn([2, 1, 32, 32], (dtype, Device::Cpu));
        for _ in 0..2 {
            let _ = rgb.forward_t(&x, true);
            let _ = depth.forward_t(&d, true);
        }
        let mut all: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.detach())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        std::fs::create_dir_all(dir).expect("dir");
        Tensor::write_safetensors(&all, dir.join("model.safetensors")).expect("model");
        std::fs::write(dir.join("job.toml"), cfg.to_toml()).expect("job");
        all
    }

    #[test]
    fn export_strips_the_prefix_and_converts_kinds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ckpt = tmp.path().join("step-00000002");
        let mut cfg = job(Norm::Batch, "nearest");
        cfg.model.dtype = Dtype::F64;
        let all = write_checkpoint(&ckpt, &cfg, Kind::Double);
        // The checkpoint's counters were cast to f64 by set_kind and counted on as floats.
        let c = all.iter().find(|(n, _)| n == "rgb.backbone.bn1.num_batches_tracked").map(|(_, t)| t.kind());
        assert_eq!(c, Some(Kind::Double));

        let out = tmp.path().join("rgb.safetensors");
        let report = export(&ckpt, ImageModality::Rgb, &out).expect("export");
        assert_eq!(report.meta.upsample, Upsample::Nearest);
        let (tensors, meta) = weights::read(&out).expect("read");
        assert_eq!(meta["format"], ENCODER_FORMAT);
        assert_eq!(meta["backbone"], "hrnet_small");
        assert_eq!(meta["norm"], "batch");
        assert_eq!(meta["in_channels"], "3");
        assert_eq!(meta["branch_channels"], "8,16,32,64");
        let expected = report.meta.expected().expect("expected");
        assert_eq!(weights::names_and_shapes(&tensors), expected);
        assert_eq!(report.tensors, expected.len());
        for (name, t) in &tensors {
            let src = all.iter().find(|(n, _)| *n == format!("rgb.backbone.{name}")).map(|(_, t)| t).expect(name);
            if name.ends_with("num_batches_tracked") {
                assert_eq!((t.kind(), t.int64_value(&[])), (Kind::Int64, 2), "{name}");
            } else {
                assert_eq!(t.kind(), Kind::Float, "{name}");
                assert!(t.equal(&src.to_kind(Kind::Float)), "{name}");
            }
        }
        // Depth: one input channel; the checkpoint root's `latest` pointer is followed.
        std::fs::write(tmp.path().join("latest"), "step-00000002\n").expect("latest");
        let out_d = tmp.path().join("depth.safetensors");
        export(tmp.path(), ImageModality::Depth, &out_d).expect("export depth");
        let (dt, dm) = weights::read(&out_d).expect("read");
        assert_eq!(dm["modality"], "depth");
        assert_eq!(dt.iter().find(|(n, _)| n == "conv1.weight").map(|(_, t)| t.size()), Some(vec![16, 1, 3, 3]));
        // A model.safetensors path works too.
        export(&ckpt.join("model.safetensors"), ImageModality::Rgb, &out).expect("export from the file");
    }

    #[test]
    fn encode_matches_the_forward_pass() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ckpt = tmp.path().join("ckpt");
        let all = write_checkpoint(&ckpt, &job(Norm::Batch, "bilinear"), Kind::Float);
        let out = tmp.path().join("rgb.safetensors");
        export(&ckpt, ImageModality::Rgb, &out).expect("export");

        // The same weights, loaded by name into a fresh backbone, evaluated directly.
        let vs = nn::VarStore::new(Device::Cpu);
        let net = HrNet::new(vs.root(), &HrNetSpec::small(), 3, Norm::Batch, 32, Upsample::Bilinear);
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let stripped = weights::strip_prefix(&all, &ImageModality::Rgb.checkpoint_prefix());
        weights::copy_into("checkpoint", &vars, &stripped).expect("copy");
        let x = Tensor::randn([2, 3, 40, 48], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| net.forward_t(&x, false));

        let input = tmp.path().join("x.safetensors");
        weights::write(&input, &[("input".into(), x.shallow_clone()), ("other".into(), x.copy())], &Metadata::new())
            .expect("input");
        let features = tmp.path().join("f.safetensors");
        let shapes = encode(&out, &input, &features, Device::Cpu).expect("encode");
        assert_eq!(shapes, vec![vec![2, 8, 10, 12], vec![2, 16, 5, 6], vec![2, 32, 3, 3], vec![2, 64, 2, 2]]);
        let (got, meta) = weights::read(&features).expect("features");
        assert_eq!(meta["format"], FEATURES_FORMAT);
        assert_eq!(got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), BRANCH_NAMES);
        for ((_, g), w) in got.iter().zip(&want) {
            assert!(g.equal(w), "encode differs from the forward pass");
        }
        // Eval mode: the export's counters did not move.
        let enc = load_encoder(&out, Device::Cpu).expect("load");
        let _ = enc.encode(&x).expect("encode");
        let (after, _) = weights::read(&out).expect("read");
        let bn = enc.vs.variables().get("bn1.num_batches_tracked").map(|t| t.int64_value(&[]));
        assert_eq!(bn, after.iter().find(|(n, _)| n == "bn1.num_batches_tracked").map(|(_, t)| t.int64_value(&[])));
    }

    #[test]
    fn bad_weights_and_inputs_are_refused_by_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ckpt = tmp.path().join("ckpt");
        write_checkpoint(&ckpt, &job(Norm::Batch, "nearest"), Kind::Float);
        let good = tmp.path().join("rgb.safetensors");
        export(&ckpt, ImageModality::Rgb, &good).expect("export");
        let (mut tensors, meta) = weights::read(&good).expect("read");

        // Drop one, reshape one, add one.
        tensors.retain(|(n, _)| n != "stage3.0.fuse_layers.0.2.1.running_var");
        for (n, t) in tensors.iter_mut() {
            if n == "transition1.0.0.weight" {
                *t = Tensor::zeros([8, 64, 1, 1], (Kind::Float, Device::Cpu));
            }
        }
        tensors.push(("head.weight".into(), Tensor::zeros([4], (Kind::Float, Device::Cpu))));
        let bad = tmp.path().join("bad.safetensors");
        weights::write(&bad, &tensors, &meta).expect("write");
        let msg = format!("{:#}", load_encoder(&bad, Device::Cpu).err().expect("refused"));
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        assert!(msg.contains("stage3.0.fuse_layers.0.2.1.running_var [8]"), "{msg}");
        assert!(msg.contains("transition1.0.0.weight: expected [8, 64, 3, 3], found [8, 64, 1, 1]"), "{msg}");
        assert!(msg.contains("head.weight [4]"), "{msg}");

        // No metadata: not an export.
        let plain = tmp.path().join("plain.safetensors");
        weights::write(&plain, &tensors, &Metadata::new()).expect("write");
        let msg = format!("{:#}", load_encoder(&plain, Device::Cpu).err().expect("refused"));
        assert!(msg.contains("metadata key \"format\" missing"), "{msg}");

        // A checkpoint with a mis-shaped backbone tensor is refused by export.
        let (mut model, _) = weights::read(&ckpt.join("model.safetensors")).expect("model");
        for (n, t) in model.iter_mut() {
            if n == "rgb.backbone.conv1.weight" {
                *t = Tensor::zeros([16, 4, 3, 3], (Kind::Float, Device::Cpu));
            }
        }
        Tensor::write_safetensors(&model, ckpt.join("model.safetensors")).expect("rewrite");
        let msg =
            format!("{:#}", export(&ckpt, ImageModality::Rgb, &tmp.path().join("x.safetensors")).expect_err("bad"));
        assert!(msg.contains("conv1.weight: expected [16, 3, 3, 3], found [16, 4, 3, 3]"), "{msg}");
        let msg = format!("{:#}", export(&tmp.path().join("nope"), ImageModality::Rgb, &good).expect_err("missing"));
        assert!(msg.contains("nope: no such checkpoint"), "{msg}");

        // Inputs: wrong channels, wrong rank, integer, ambiguous file.
        let enc = load_encoder(&good, Device::Cpu).expect("load");
        let e = enc.encode(&Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu))).expect_err("channels");
        assert!(format!("{e:#}").contains("1 channels, the rgb encoder takes 3"), "{e:#}");
        let e = enc.encode(&Tensor::zeros([3, 32, 32], (Kind::Float, Device::Cpu))).expect_err("rank");
        assert!(format!("{e:#}").contains("expected N x C x H x W (4 dimensions), found shape [3, 32, 32]"), "{e:#}");
        let e = enc.encode(&Tensor::zeros([1, 3, 32, 32], (Kind::Uint8, Device::Cpu))).expect_err("kind");
        assert!(format!("{e:#}").contains("floating-point"), "{e:#}");
        let two = tmp.path().join("two.safetensors");
        let z = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        weights::write(&two, &[("a".into(), z.copy()), ("b".into(), z)], &Metadata::new()).expect("write");
        let e = encode(&good, &two, &tmp.path().join("f.safetensors"), Device::Cpu).expect_err("ambiguous");
        assert!(format!("{e:#}").contains("none named \"input\""), "{e:#}");
    }
}
