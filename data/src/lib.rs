//! hcmoco-data: the dataset format, manifests, and the synthetic human generator. No libtorch here:
//! this crate is shared by the coordinator (plans over manifests) and the workers (sample loading).
//!
//! # Layout
//! - [`layout`]: keypoint layouts (MPII-16, COCO-13: joints, parents, root, hips) and
//!   [`normalize_keypoints`], the keypoint-encoder input rule of the method page.
//! - [`layout`] also holds the body-part labels ([`PART_NAMES`], [`part`]) and [`adjacent_parts`], the
//!   parts that meet at each joint.
//! - [`sample`]: the in-memory [`Sample`] (RGB, optional depth, optional part labels, joints) and its
//!   image types.
//! - [`shard`]: WebDataset-compatible tar shards: [`ShardWriter`] (deterministic bytes, SHA-256 while
//!   writing) and [`ShardReader`] (header-only index at open, seek + decode one sample per read).
//! - `codec` (private): member encodings: RGB PNG or JPEG ([`RgbEncoding`]), 16-bit depth PNG, 8-bit
//!   part-label PNG, `kp2d.json`, `meta.json`. The shard module also exports the (doc-hidden) fuzzing
//!   entry points that `data/fuzz` and the corpus replay test share.
//! - [`manifest`]: [`Manifest`] (`manifest.json`, format `hcmoco-shards/1`, validated, saved
//!   atomically) and [`Dataset`] (global index over the shards, lazy shard open, `verify`).
//! - [`synth`]: the deterministic procedural generator ([`SynthConfig`], [`generate`]).
//! - [`augment`]: augmentation consistent across modalities (one similarity transform per sample,
//!   seeded by (seed, epoch, slot)).
//! - [`convert`]: converters from real formats (COCO, MPII, NTU RGB+D) into shards + manifest:
//!   person-centred crops, layout mapping, RGB-to-depth registration ([`convert::convert_coco`], ...).
//! - [`error`]: [`DataError`]; every variant names the file, the sample key and the field at fault.

pub mod augment;
mod codec;
pub mod convert;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod sample;
pub mod shard;
pub mod synth;

pub use error::DataError;
pub use layout::*;
pub use manifest::{Dataset, Manifest, ShardEntry};
pub use sample::*;
pub use shard::{RgbEncoding, ShardReader, ShardSummary, ShardWriter};
pub use synth::{SynthConfig, generate, generate_with_progress};
