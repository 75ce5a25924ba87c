//! The job file: one TOML document describing a pre-training job.
//!
//! Every key has a default (see `docs/job-file.md`, which lists them all); unknown keys are refused with
//! an error naming the key. [`JobConfig::from_toml`] parses and validates; [`JobConfig::to_toml`] writes
//! the resolved configuration (every key present), which is what workers receive and what is saved next
//! to the checkpoints.

use serde::{Deserialize, Serialize};

/// A job-file problem, naming the key (dotted path) that is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML does not parse, or names a key that does not exist.
    #[error("job file does not parse: {0}")]
    Parse(String),
    /// A key holds a value outside its allowed range.
    #[error("job file key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), reason: reason.into() }
    }

    /// The key the error is about (for `Invalid`), or the whole parse message.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Parse(_) => None,
        }
    }
}

/// A complete, validated job description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Human-readable name shown in status.
    pub name: String,
    /// Seeds the data plan, the augmentations and the initial weights.
    pub seed: u64,
    /// Optimizer steps to train.
    pub steps: u64,
    /// Samples per step summed over all ranks (G). Independent of the world size.
    pub global_batch: u64,
    pub workers: WorkersConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optimizer: OptimizerConfig,
    pub checkpoint: CheckpointConfig,
    pub collective: CollectiveConfig,
    pub rendezvous: RendezvousConfig,
    pub heartbeat: HeartbeatConfig,
    pub runtime: RuntimeConfig,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            name: "hcmoco".into(),
            seed: 0,
            steps: 50,
            global_batch: 224,
            workers: WorkersConfig::default(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            loss: LossConfig::default(),
            optimizer: OptimizerConfig::default(),
            checkpoint: CheckpointConfig::default(),
            collective: CollectiveConfig::default(),
            rendezvous: RendezvousConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// The job starts when this many workers have joined, and keeps training while this many remain.
    pub min: u32,
    /// The most workers a generation holds (the initial target; `hcmoco scale` moves the target
    /// within [min, max]). Workers joining beyond the target wait as standbys.
    pub max: u32,
    /// With fewer than `min` workers left, the job waits this long for replacements, then fails
    /// naming the lost workers (0: fail at once).
    pub below_min_timeout_ms: u64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig { min: 1, max: 1, below_min_timeout_ms: 300_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The datasets the job mixes.
    pub datasets: Vec<DatasetConfig>,
    /// Side of the square training crop (pixels). 0: no augmentation, images are used as stored (then
    /// every dataset must store one image size).
    pub image_size: u32,
    /// Samples with depth: a square crop around the person covering this share range of the image area.
    pub crop_scale_min: f32,
    pub crop_scale_max: f32,
    /// RGB-only samples: crop side = person box x 1.25 x (1 +- scale_jitter), rotated by +- rotation_deg.
    pub scale_jitter: f32,
    pub rotation_deg: f32,
    /// Threads decoding and augmenting samples off the training thread.
    pub loader_threads: u32,
    /// A sample that cannot be read or decoded: `fail` the job (naming shard and key), or `skip` it
    /// (logged with shard and key, counted in the job's status).
    pub on_error: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            datasets: Vec::new(),
            image_size: 320,
            crop_scale_min: 0.08,
            crop_scale_max: 1.2,
            scale_jitter: 0.25,
            rotation_deg: 30.0,
            loader_threads: 2,
            on_error: "fail".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Path of the dataset's `manifest.json`, as seen by the coordinator and every worker.
    pub manifest: String,
    /// Mixing weight: with weights, each epoch gives dataset i the share `weight_i / sum(weights)` of its
    /// slots (a small dataset repeats, a large one is subsampled). Without weights (on every dataset)
    /// each epoch trains every sample once. Give every dataset a weight, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// Normalisation layers of the image encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// BatchNorm: per-rank batch statistics; running statistics broadcast from rank 0 every step.
    Batch,
    /// GroupNorm with `model.groups` groups: no batch statistics (exact distributed equivalence).
    Group,
    /// No normalisation.
    None,
}

/// Floating-point precision of parameters and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F64,
}

/// The image encoders `model.backbone` names.
pub const BACKBONES: [&str; 2] = ["hrnet_w18", "hrnet_small"];

/// Upper bounds of the job's counts: far beyond any real run, low enough that a typo (or a hostile
/// file) cannot ask for a plan, a pending job or an allocation nobody could ever serve.
pub const MAX_STEPS: u64 = 1_000_000_000;
pub const MAX_WORKERS: u32 = 100_000;
pub const MAX_GLOBAL_BATCH: u64 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Image encoder architecture: `hrnet_w18` (HRNetV2-W18, the production default) or `hrnet_small`
    /// (the same topology, narrow and shallow: for CPU runs and tests).
    pub backbone: String,
    /// Upsampling in HRNet's fuse layers: `bilinear` (the authors') or `nearest` (timm's).
    pub upsample: String,
    /// Output dimension of the global and dense heads and of the keypoint encoder.
    pub embed_dim: u32,
    pub norm: Norm,
    /// GroupNorm: each layer of C channels uses the largest divisor of C not above this.
    pub groups: u32,
    /// Hidden width of the SemGCN keypoint encoder.
    pub keypoint_hidden: u32,
    /// Residual blocks of the SemGCN keypoint encoder.
    pub keypoint_blocks: u32,
    pub dtype: Dtype,
    /// Stage 2 starts from a stage-1 checkpoint (a `step-N` directory, or a checkpoint directory whose
    /// `latest` names one): every variable but the dense heads, and the memory banks. Empty: none.
    pub init_checkpoint: String,
    /// HRNet weights in PyTorch's layout (a safetensors state dict with the official names, e.g. timm's
    /// `hrnet_w18` with `features_only=True`, or an `hcmoco-worker export`) for the RGB backbone, loaded
    /// after `init_checkpoint`. Empty: none.
    pub init_rgb_backbone: String,
    /// The same for the depth backbone (one input channel).
    pub init_depth_backbone: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backbone: "hrnet_w18".into(),
            upsample: "bilinear".into(),
            embed_dim: 128,
            norm: Norm::Batch,
            groups: 32,
            keypoint_hidden: 128,
            keypoint_blocks: 4,
            dtype: Dtype::F32,
            init_checkpoint: String::new(),
            init_rgb_backbone: String::new(),
            init_depth_backbone: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Softmax temperature tau of every contrastive term.
    pub temperature: f64,
    /// Sample-level variant. `in_batch`: negatives gathered from every rank; `memory_bank`: one bank
    /// per modality, `negatives` drawn per anchor.
    pub variant: String,
    /// Memory-bank variant: negatives K drawn per anchor.
    pub negatives: u32,
    /// 1: the six sample-level terms; 2: those plus DICL (both directions), SSCL part 1 (RGB and depth)
    /// and SSCL part 2.
    pub stage: u32,
    /// DICL: cells P drawn per sample with depth.
    pub dicl_points: u32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { temperature: 0.07, variant: "in_batch".into(), negatives: 16384, stage: 1, dicl_points: 400 }
    }
}

/// Defines a closed set of job-file values: the enum, its names, parsing and display. The job file
/// keeps the text (so a bad value is refused by [`JobConfig::validate`] naming its key); code reads
/// the typed value through the config's accessor, never comparing strings.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every accepted spelling, in order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!("{other:?}: expected one of {:?}", $name::NAMES)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// `data.on_error`: what a sample that cannot be read does.
    OnError { Fail = "fail", Skip = "skip" }
);
choice!(
    /// `loss.variant`: where the sample-level terms take their negatives.
    LossVariant { InBatch = "in_batch", MemoryBank = "memory_bank" }
);
choice!(
    /// `collective.backend`.
    Backend { Cpu = "cpu", Nccl = "nccl" }
);
choice!(
    /// `collective.transport` (cpu backend).
    TransportChoice { Auto = "auto", Tcp = "tcp", Shm = "shm" }
);
choice!(
    /// `runtime.autocast`.
    Autocast { None = "none", Bf16 = "bf16" }
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine from `lr` to `lr_min` over the job's epochs, stepped per epoch.
    Cosine,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub lr_min: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { lr: 0.03, lr_min: 3e-5, momentum: 0.9, weight_decay: 1e-4, schedule: Schedule::Cosine }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory the checkpoints go to (rank 0 writes). `hcmoco submit` resolves a relative path against the
    /// directory of the job file at submission.
    pub dir: String,
    /// Write a checkpoint every this many steps (0: only at the end). The last step always writes one.
    pub every_steps: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { dir: "checkpoints".into(), every_steps: 25 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectiveConfig {
    /// `cpu`: a ring between worker processes (TCP, or shared memory between ranks on one host);
    /// `nccl`: NCCL on CUDA devices.
    pub backend: String,
    /// For the `cpu` backend: `auto` (shared memory between ranks on the same host, TCP otherwise),
    /// `tcp`, or `shm` (every neighbour must share the host).
    pub transport: String,
    /// A collective that makes no progress for this long fails, naming the peer.
    pub timeout_ms: u64,
    /// Gradient fusion: gradients are all-reduced in buckets of this many MiB (0: one per tensor).
    pub bucket_mb: f64,
}

impl Default for CollectiveConfig {
    fn default() -> Self {
        CollectiveConfig { backend: "cpu".into(), transport: "auto".into(), timeout_ms: 30_000, bucket_mb: 25.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RendezvousConfig {
    /// Once `workers.min` have joined, wait this long for more (up to `workers.max`) before sealing.
    pub settle_ms: u64,
    /// After a membership change, the members of the old generation that rendezvous within this
    /// long (plus admitted joiners) form the new one; the others are evicted.
    pub rejoin_ms: u64,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig { settle_ms: 300, rejoin_ms: 2_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    pub interval_ms: u64,
    /// A worker silent for this long is lost.
    pub timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig { interval_ms: 1_000, timeout_ms: 15_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// libtorch intra-op threads per worker process.
    pub torch_threads: u32,
    /// `none`, or `bf16`: the encoders' forward under libtorch autocast to bfloat16 (parameters,
    /// gradients, the losses and the optimizer stay in `model.dtype`).
    pub autocast: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { torch_threads: 1, autocast: "none".into() }
    }
}

impl JobConfig {
    /// `data.on_error` (validated; a config that was never validated reads as the default).
    pub fn on_error(&self) -> OnError {
        self.data.on_error.parse().unwrap_or(OnError::Fail)
    }

    /// `loss.variant`.
    pub fn loss_variant(&self) -> LossVariant {
        self.loss.variant.parse().unwrap_or(LossVariant::InBatch)
    }

    /// `collective.backend`.
    pub fn backend(&self) -> Backend {
        self.collective.backend.parse().unwrap_or(Backend::Cpu)
    }

    /// `collective.transport`.
    pub fn transport(&self) -> TransportChoice {
        self.collective.transport.parse().unwrap_or(TransportChoice::Auto)
    }

    /// `runtime.autocast`.
    pub fn autocast(&self) -> Autocast {
        self.runtime.autocast.parse().unwrap_or(Autocast::None)
    }

    /// Parses and validates a job file.
    pub fn from_toml(text: &str) -> Result<JobConfig, ConfigError> {
        let cfg = JobConfig::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses without [`JobConfig::validate`]: for a caller that fills in keys (a local launch adds
    /// its generated dataset) and validates the result.
    pub fn parse_toml(text: &str) -> Result<JobConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// The resolved configuration, every key present.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# unserialisable config: {e}\n"))
    }

    /// Checks every value against its allowed range; the error names the key. The global batch is
    /// checked against the datasets' epoch at submission, where their sizes are known.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::invalid("name", "must not be empty"));
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(ConfigError::invalid("steps", format!("must be in 1..={MAX_STEPS}")));
        }
        if self.workers.min == 0 {
            return Err(ConfigError::invalid("workers.min", "must be at least 1"));
        }
        if self.workers.max < self.workers.min {
            return Err(ConfigError::invalid("workers.max", format!("must be >= workers.min ({})", self.workers.min)));
        }
        if self.workers.max > MAX_WORKERS {
            return Err(ConfigError::invalid("workers.max", format!("must be at most {MAX_WORKERS}")));
        }
        // The in-batch objective needs a negative for every anchor, and every rank a sample.
        let least = u64::from(self.workers.max).max(2);
        if self.global_batch < least || self.global_batch > MAX_GLOBAL_BATCH {
            return Err(ConfigError::invalid(
                "global_batch",
                format!(
                    "must be in {least}..={MAX_GLOBAL_BATCH}: at least 2 (the in-batch objective needs negatives) \
                     and at least workers.max = {} (every rank trains a sample)",
                    self.workers.max
                ),
            ));
        }
        if self.data.datasets.is_empty() {
            return Err(ConfigError::invalid(
                "data.datasets",
                "list at least one dataset ([[data.datasets]] manifest = \"...\")",
            ));
        }
        for (i, d) in self.data.datasets.iter().enumerate() {
            if d.manifest.trim().is_empty() {
                return Err(ConfigError::invalid(format!("data.datasets[{i}].manifest"), "must not be empty"));
            }
            match d.weight {
                Some(w) if !(w.is_finite() && w > 0.0) => {
                    return Err(ConfigError::invalid(
                        format!("data.datasets[{i}].weight"),
                        "must be a positive number",
                    ));
                }
                None if self.data.datasets.iter().any(|o| o.weight.is_some()) => {
                    return Err(ConfigError::invalid(
                        format!("data.datasets[{i}].weight"),
                        "missing: give every dataset a weight, or none",
                    ));
                }
                _ => {}
            }
        }
        let d = &self.data;
        if !(d.crop_scale_min > 0.0 && d.crop_scale_min <= d.crop_scale_max && d.crop_scale_max.is_finite()) {
            return Err(ConfigError::invalid("data.crop_scale_min", "needs 0 < crop_scale_min <= crop_scale_max"));
        }
        if !(d.scale_jitter >= 0.0 && d.scale_jitter < 1.0) {
            return Err(ConfigError::invalid("data.scale_jitter", "must be in [0, 1)"));
        }
        if !(d.rotation_deg >= 0.0 && d.rotation_deg <= 180.0) {
            return Err(ConfigError::invalid("data.rotation_deg", "must be in [0, 180]"));
        }
        d.on_error.parse::<OnError>().map_err(|e| ConfigError::invalid("data.on_error", e))?;
        if d.loader_threads == 0 {
            return Err(ConfigError::invalid("data.loader_threads", "must be at least 1"));
        }
        let m = &self.model;
        if !BACKBONES.contains(&m.backbone.as_str()) {
            return Err(ConfigError::invalid(
                "model.backbone",
                format!("unknown backbone {:?} (known: {BACKBONES:?})", m.backbone),
            ));
        }
        if !["bilinear", "nearest"].contains(&m.upsample.as_str()) {
            return Err(ConfigError::invalid(
                "model.upsample",
                format!("{:?}: expected \"bilinear\" or \"nearest\"", m.upsample),
            ));
        }
        for (key, v) in
            [("model.embed_dim", m.embed_dim), ("model.keypoint_hidden", m.keypoint_hidden), ("model.groups", m.groups)]
        {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        let l = &self.loss;
        if !(l.temperature.is_finite() && l.temperature > 0.0) {
            return Err(ConfigError::invalid("loss.temperature", "must be a positive number"));
        }
        let variant = l.variant.parse::<LossVariant>().map_err(|e| ConfigError::invalid("loss.variant", e))?;
        if variant == LossVariant::MemoryBank && l.negatives == 0 {
            return Err(ConfigError::invalid("loss.negatives", "must be at least 1"));
        }
        if !(1..=2).contains(&l.stage) {
            return Err(ConfigError::invalid("loss.stage", format!("{}: expected 1 or 2", l.stage)));
        }
        if l.stage == 2 && l.dicl_points == 0 {
            return Err(ConfigError::invalid("loss.dicl_points", "must be at least 1"));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(ConfigError::invalid("optimizer.lr", "must be a positive number"));
        }
        if !(o.lr_min.is_finite() && o.lr_min >= 0.0 && o.lr_min <= o.lr) {
            return Err(ConfigError::invalid("optimizer.lr_min", "must be between 0 and optimizer.lr"));
        }
        if !(o.momentum.is_finite() && (0.0..1.0).contains(&o.momentum)) {
            return Err(ConfigError::invalid("optimizer.momentum", "must be in [0, 1)"));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(ConfigError::invalid("optimizer.weight_decay", "must be >= 0"));
        }
        if self.checkpoint.dir.trim().is_empty() {
            return Err(ConfigError::invalid("checkpoint.dir", "must not be empty"));
        }
        self.collective.backend.parse::<Backend>().map_err(|e| ConfigError::invalid("collective.backend", e))?;
        self.collective
            .transport
            .parse::<TransportChoice>()
            .map_err(|e| ConfigError::invalid("collective.transport", e))?;
        if !(self.collective.bucket_mb.is_finite() && self.collective.bucket_mb >= 0.0) {
            return Err(ConfigError::invalid("collective.bucket_mb", "must be >= 0"));
        }
        if self.collective.timeout_ms == 0 {
            return Err(ConfigError::invalid("collective.timeout_ms", "must be at least 1"));
        }
        if self.heartbeat.interval_ms == 0 {
            return Err(ConfigError::invalid("heartbeat.interval_ms", "must be at least 1"));
        }
        if self.heartbeat.timeout_ms <= self.heartbeat.interval_ms {
            return Err(ConfigError::invalid("heartbeat.timeout_ms", "must be larger than heartbeat.interval_ms"));
        }
        self.runtime.autocast.parse::<Autocast>().map_err(|e| ConfigError::invalid("runtime.autocast", e))?;
        if self.runtime.torch_threads == 0 {
            return Err(ConfigError::invalid("runtime.torch_threads", "must be at least 1"));
        }
        Ok(())
    }

    /// The learning rate of `epoch` out of `epochs` (the schedule steps once per epoch).
    pub fn learning_rate(&self, epoch: u64, epochs: u64) -> f64 {
        let o = &self.optimizer;
        match o.schedule {
            Schedule::Constant => o.lr,
            Schedule::Cosine => {
                let t = if epochs <= 1 { 0.0 } else { epoch as f64 / epochs as f64 };
                o.lr_min + 0.5 * (o.lr - o.lr_min) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[data.datasets]]\nmanifest = \"/d/manifest.json\"\n";

    #[test]
    fn minimal_file_gets_every_default_and_round_trips() {
        let cfg = JobConfig::from_toml(MINIMAL).expect("minimal job file");
        assert_eq!(cfg.steps, 50);
        assert_eq!(cfg.model.norm, Norm::Batch);
        assert_eq!(cfg.data.datasets[0].weight, None);
        let again = JobConfig::from_toml(&cfg.to_toml()).expect("resolved file parses");
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            (format!("stepz = 3\n{MINIMAL}"), "stepz"),
            (format!("{MINIMAL}[model]\nwidht = 3\n"), "widht"),
            (format!("{MINIMAL}[optimiser]\nlr = 1.0\n"), "optimiser"),
        ] {
            let err = JobConfig::from_toml(&text).expect_err("unknown key must be refused");
            assert!(err.to_string().contains(key), "error {err} should name {key}");
        }
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (extra, key) in [
            ("steps = 0\n", "steps"),
            ("global_batch = 0\n", "global_batch"),
            ("global_batch = 1\n", "global_batch"),
            ("global_batch = 9223372036854775807\n", "global_batch"),
            ("global_batch = 3\n[workers]\nmin = 1\nmax = 4\n", "global_batch"),
            ("steps = 9223372036854775807\n", "steps"),
            ("[workers]\nmin = 4000000000\nmax = 4000000000\n", "workers.max"),
            ("[workers]\nmin = 3\nmax = 2\n", "workers.max"),
            ("[model]\nnorm = \"group\"\ngroups = 0\n", "model.groups"),
            ("[model]\nbackbone = \"resnet50\"\n", "model.backbone"),
            ("[model]\nupsample = \"cubic\"\n", "model.upsample"),
            ("[loss]\nstage = 3\n", "loss.stage"),
            ("[loss]\nvariant = \"moco\"\n", "loss.variant"),
            ("[loss]\nvariant = \"memory_bank\"\nnegatives = 0\n", "loss.negatives"),
            ("[runtime]\nautocast = \"fp16\"\n", "runtime.autocast"),
            ("[optimizer]\nmomentum = 1.5\n", "optimizer.momentum"),
            ("[loss]\ntemperature = -1.0\n", "loss.temperature"),
            ("[collective]\nbackend = \"mpi\"\n", "collective.backend"),
            ("[collective]\ntransport = \"rdma\"\n", "collective.transport"),
            ("[collective]\nbucket_mb = -1.0\n", "collective.bucket_mb"),
        ] {
            let err = JobConfig::from_toml(&format!("{extra}{MINIMAL}")).expect_err(extra);
            assert_eq!(err.key(), Some(key), "{err}");
        }
        let two = "[[data.datasets]]\nmanifest = \"a\"\nweight = 1.0\n[[data.datasets]]\nmanifest = \"b\"\n";
        let err = JobConfig::from_toml(two).expect_err("one weight missing");
        assert_eq!(err.key(), Some("data.datasets[1].weight"), "{err}");
        let err = JobConfig::from_toml(&two.replace("weight = 1.0", "weight = 0.0")).expect_err("zero weight");
        assert_eq!(err.key(), Some("data.datasets[0].weight"), "{err}");
        let err = JobConfig::from_toml("steps = 3\n").expect_err("no dataset");
        assert_eq!(err.key(), Some("data.datasets"));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = JobConfig::from_toml(&format!("steps = \"many\"\n{MINIMAL}")).expect_err("string steps");
        assert!(err.to_string().contains("steps"), "{err}");
    }

    #[test]
    fn cosine_schedule_runs_from_lr_to_near_lr_min() {
        let cfg = JobConfig::default();
        assert_eq!(cfg.learning_rate(0, 10), cfg.optimizer.lr);
        let last = cfg.learning_rate(9, 10);
        assert!(last < cfg.optimizer.lr * 0.05 && last > cfg.optimizer.lr_min);
        assert_eq!(cfg.learning_rate(0, 1), cfg.optimizer.lr);
    }
}
