//! `DataError`: every failure of the data layer, each naming the file, the sample and the field.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::layout::KeypointLayout;

/// Errors of the data layer. Shard errors name the shard path and the sample key; manifest errors name
/// the manifest path and the field.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("shard {shard}: sample {key}: truncated tar: {detail}")]
    TruncatedTar { shard: PathBuf, key: String, detail: String },

    #[error("shard {shard}: malformed tar (last sample read: {key}): {detail}")]
    MalformedTar { shard: PathBuf, key: String, detail: String },

    #[error("shard {shard}: sample {key}: missing member {member}")]
    MissingMember { shard: PathBuf, key: String, member: String },

    #[error("shard {shard}: sample {key}: duplicate member {member}")]
    DuplicateMember { shard: PathBuf, key: String, member: String },

    #[error("shard {shard}: sample {key}: member {member}: corrupt png: {detail}")]
    CorruptPng { shard: PathBuf, key: String, member: String, detail: String },

    #[error("shard {shard}: sample {key}: member {member}: corrupt jpeg: {detail}")]
    CorruptJpeg { shard: PathBuf, key: String, member: String, detail: String },

    #[error("shard {shard}: sample {key}: member {member}: expected {expected}, found {found}")]
    PngFormat { shard: PathBuf, key: String, member: String, expected: &'static str, found: String },

    #[error("shard {shard}: sample {key}: member {member}: invalid json: {detail}")]
    BadJson { shard: PathBuf, key: String, member: String, detail: String },

    #[error("shard {shard}: sample {key}: layout {layout} expects {expected} joints, found {found}")]
    JointCount { shard: PathBuf, key: String, layout: KeypointLayout, expected: usize, found: usize },

    #[error("shard {shard}: sample {key}: rgb is {rgb_width}x{rgb_height} but depth is {depth_width}x{depth_height}")]
    SizeMismatch { shard: PathBuf, key: String, rgb_width: u32, rgb_height: u32, depth_width: u32, depth_height: u32 },

    #[error("shard {shard}: sample {key}: member {member} is {width}x{height} but rgb is {rgb_width}x{rgb_height}")]
    MemberSize { shard: PathBuf, key: String, member: String, width: u32, height: u32, rgb_width: u32, rgb_height: u32 },

    #[error("shard {shard}: sample {key}: member {member}: label {label} at ({x}, {y}) is not a part (0..={max})")]
    PartLabel { shard: PathBuf, key: String, member: String, label: u8, x: u32, y: u32, max: u8 },

    #[error("shard {shard}: sample {key}: field {field}: {detail}")]
    SampleField { shard: PathBuf, key: String, field: String, detail: String },

    #[error("shard {shard}: sample index {index} out of range (shard holds {len} samples)")]
    ShardIndex { shard: PathBuf, index: usize, len: usize },

    #[error("shard {shard}: manifest entry says {expected} samples, the shard holds {found}")]
    ShardSampleCount { shard: PathBuf, expected: u64, found: u64 },

    #[error("shard {shard}: sha256 mismatch: manifest says {expected}, file has {actual}")]
    ChecksumMismatch { shard: PathBuf, expected: String, actual: String },

    #[error("shard writer {shard}: option {field}: {detail}")]
    WriterOption { shard: PathBuf, field: &'static str, detail: String },

    #[error("cannot write sample {key:?}: field {field}: {detail}")]
    InvalidSample { key: String, field: String, detail: String },

    #[error("manifest {path}: field {field}: {detail}")]
    Manifest { path: PathBuf, field: String, detail: String },

    #[error("manifest {path}: {source}")]
    ManifestJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("dataset {manifest}: sample index {index} out of range (dataset holds {len} samples)")]
    IndexOutOfRange { manifest: PathBuf, index: u64, len: u64 },

    #[error("synth config: field {field}: {detail}")]
    SynthConfig { field: &'static str, detail: String },

    #[error("unknown keypoint layout {0:?}: expected mpii16 or coco13")]
    UnknownLayout(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
