//! The dataset manifest (`manifest.json`, format `hcmoco-shards/1`) and [`Dataset`], random access to
//! the samples of all shards in manifest order.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::layout::KeypointLayout;
use crate::sample::Sample;
use crate::shard::{ShardReader, sha256_file};

/// The manifest format this crate reads and writes.
pub const MANIFEST_FORMAT: &str = "hcmoco-shards/1";

/// Modality names a manifest may list. `rgb` and `kp2d` are required (every sample has both); `parts`
/// (body-part labels, `KEY.parts.png`) is listed when any sample has them.
pub const MODALITIES: [&str; 4] = ["rgb", "depth", "kp2d", "parts"];

/// A dataset: its shards, in order, with their sample counts and checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    pub name: String,
    pub layout: KeypointLayout,
    /// Size of every sample's images (checked by [`Dataset::get`]); both 0 when the size varies per
    /// sample (real datasets), both non-zero otherwise.
    pub image_width: u32,
    pub image_height: u32,
    /// Subset of [`MODALITIES`]; `depth` present iff some shard has samples with depth, `parts` when
    /// some sample has part labels (checked when a shard is opened).
    pub modalities: Vec<String>,
    /// Total samples: the sum over `shards`.
    pub samples: u64,
    pub shards: Vec<ShardEntry>,
}

/// One shard of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Relative to the manifest's directory.
    pub path: String,
    pub samples: u64,
    pub with_depth: u64,
    /// Lowercase hex SHA-256 of the shard file.
    pub sha256: String,
}

impl Manifest {
    /// Reads and validates a manifest. Unknown fields are rejected; every error names `path` and the
    /// offending field.
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest, DataError> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|source| DataError::ManifestJson { path: path.to_path_buf(), source })?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// Validates and writes the manifest atomically (temp file in the same directory, fsync,
    /// rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), DataError> {
        let path = path.as_ref();
        self.validate(path)?;
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|source| DataError::ManifestJson { path: path.to_path_buf(), source })?;
        json.push(b'\n');
        let file_name = path.file_name().ok_or_else(|| DataError::Manifest {
            path: path.to_path_buf(),
            field: "(path)".into(),
            detail: "manifest path has no file name".into(),
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(DataError::io(&tmp, e));
        }
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            DataError::io(path, e)
        })
    }

    /// Checks the invariants `load` and `save` enforce; `path` is only used in error messages.
    pub fn validate(&self, path: &Path) -> Result<(), DataError> {
        let err = |field: String, detail: String| DataError::Manifest { path: path.to_path_buf(), field, detail };
        if self.format != MANIFEST_FORMAT {
            return Err(err("format".into(), format!("expected {MANIFEST_FORMAT:?}, found {:?}", self.format)));
        }
        if self.name.trim().is_empty() {
            return Err(err("name".into(), "must not be empty".into()));
        }
        if (self.image_width == 0) != (self.image_height == 0) {
            let (field, other) =
                if self.image_width == 0 { ("image_width", "image_height") } else { ("image_height", "image_width") };
            return Err(err(
                field.into(),
                format!("is 0 but {other} is not: both 0 (size varies per sample) or both positive"),
            ));
        }
        for (i, m) in self.modalities.iter().enumerate() {
            if !MODALITIES.contains(&m.as_str()) {
                return Err(err(
                    format!("modalities[{i}]"),
                    format!("unknown modality {m:?}, expected one of {MODALITIES:?}"),
                ));
            }
            if self.modalities[..i].contains(m) {
                return Err(err(format!("modalities[{i}]"), format!("{m:?} listed twice")));
            }
        }
        for required in ["rgb", "kp2d"] {
            if !self.modalities.iter().any(|m| m == required) {
                return Err(err("modalities".into(), format!("must include {required:?}")));
            }
        }
        if self.shards.is_empty() {
            return Err(err("shards".into(), "must not be empty".into()));
        }
        let mut total = 0u64;
        let mut with_depth = 0u64;
        for (i, s) in self.shards.iter().enumerate() {
            if s.path.is_empty() {
                return Err(err(format!("shards[{i}].path"), "must not be empty".into()));
            }
            let p = Path::new(&s.path);
            if p.is_absolute() || p.components().any(|c| matches!(c, Component::Prefix(_))) {
                return Err(err(
                    format!("shards[{i}].path"),
                    format!("{:?} must be relative to the manifest's directory", s.path),
                ));
            }
            if s.with_depth > s.samples {
                return Err(err(
                    format!("shards[{i}].with_depth"),
                    format!("{} exceeds the shard's {} samples", s.with_depth, s.samples),
                ));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(err(
                    format!("shards[{i}].sha256"),
                    format!("expected 64 lowercase hex digits, found {:?}", s.sha256),
                ));
            }
            total = total
                .checked_add(s.samples)
                .ok_or_else(|| err(format!("shards[{i}].samples"), "sample counts overflow".into()))?;
            with_depth += s.with_depth;
        }
        if self.samples != total {
            return Err(err("samples".into(), format!("says {} but the shards hold {total}", self.samples)));
        }
        if total == 0 {
            return Err(err("samples".into(), "dataset is empty".into()));
        }
        if with_depth > 0 && !self.modalities.iter().any(|m| m == "depth") {
            return Err(err(
                "modalities".into(),
                format!("{with_depth} samples have depth but \"depth\" is not listed"),
            ));
        }
        Ok(())
    }

    /// The image size every sample has, or `None` when `image_width` and `image_height` are 0 (the size
    /// varies per sample).
    pub fn fixed_image_size(&self) -> Option<(u32, u32)> {
        (self.image_width > 0 && self.image_height > 0).then_some((self.image_width, self.image_height))
    }

    /// Whether the manifest lists `modality`.
    pub fn has_modality(&self, modality: &str) -> bool {
        self.modalities.iter().any(|m| m == modality)
    }

    /// Total number of samples with depth.
    pub fn with_depth(&self) -> u64 {
        self.shards.iter().map(|s| s.with_depth).sum()
    }
}

/// Random access to a manifest's samples; global index = position across shards in manifest order.
///
/// Shards are opened lazily, on the first `get` that touches them (opening reads only tar headers);
/// `Dataset::open` reads nothing but the manifest and checks that the shard files exist. `Send + Sync`:
/// share it (e.g. in an `Arc`) with loader threads.
#[derive(Debug)]
pub struct Dataset {
    manifest_path: PathBuf,
    manifest: Manifest,
    shard_paths: Vec<PathBuf>,
    /// Global index of each shard's first sample.
    starts: Vec<u64>,
    readers: Vec<OnceLock<ShardReader>>,
}

impl Dataset {
    /// Loads and validates the manifest; shard paths resolve against the manifest's directory.
    pub fn open(manifest_path: impl AsRef<Path>) -> Result<Dataset, DataError> {
        let manifest_path = manifest_path.as_ref().to_path_buf();
        let manifest = Manifest::load(&manifest_path)?;
        let root = match manifest_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut shard_paths = Vec::with_capacity(manifest.shards.len());
        let mut starts = Vec::with_capacity(manifest.shards.len());
        let mut next = 0u64;
        for entry in &manifest.shards {
            let path = root.join(&entry.path);
            let meta = fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
            if !meta.is_file() {
                return Err(DataError::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "shard is not a file"),
                ));
            }
            shard_paths.push(path);
            starts.push(next);
            next += entry.samples;
        }
        let readers = manifest.shards.iter().map(|_| OnceLock::new()).collect();
        Ok(Dataset { manifest_path, manifest, shard_paths, starts, readers })
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Where the manifest was loaded from.
    pub fn manifest_path(&self) -> &Path {
        &self.manifest_path
    }

    /// Resolved path of shard `i` (manifest order).
    pub fn shard_path(&self, i: usize) -> Option<&Path> {
        self.shard_paths.get(i).map(PathBuf::as_path)
    }

    /// Total number of samples.
    pub fn len(&self) -> u64 {
        self.manifest.samples
    }

    /// Whether the dataset is empty (never true for a validated manifest).
    pub fn is_empty(&self) -> bool {
        self.manifest.samples == 0
    }

    /// Maps a global index to (shard, index within the shard).
    pub fn locate(&self, index: u64) -> Option<(usize, usize)> {
        if index >= self.len() {
            return None;
        }
        // The last shard starting at or before `index`; empty shards share a start and are skipped.
        let shard = self.starts.partition_point(|&s| s <= index).checked_sub(1)?;
        let local = usize::try_from(index - self.starts[shard]).ok()?;
        Some((shard, local))
    }

    /// The reader of shard `i`, opened (and checked against the manifest entry) on first use.
    pub fn shard(&self, i: usize) -> Result<&ShardReader, DataError> {
        let cell = self.readers.get(i).ok_or_else(|| DataError::Manifest {
            path: self.manifest_path.clone(),
            field: "shards".into(),
            detail: format!("no shard {i} (manifest has {})", self.readers.len()),
        })?;
        if let Some(r) = cell.get() {
            return Ok(r);
        }
        let reader = ShardReader::open(&self.shard_paths[i])?;
        let entry = &self.manifest.shards[i];
        if reader.len() as u64 != entry.samples {
            return Err(DataError::ShardSampleCount {
                shard: self.shard_paths[i].clone(),
                expected: entry.samples,
                found: reader.len() as u64,
            });
        }
        if reader.with_depth() as u64 != entry.with_depth {
            return Err(DataError::Manifest {
                path: self.manifest_path.clone(),
                field: format!("shards[{i}].with_depth"),
                detail: format!(
                    "says {} but {} holds {}",
                    entry.with_depth,
                    self.shard_paths[i].display(),
                    reader.with_depth()
                ),
            });
        }
        if reader.with_parts() > 0 && !self.manifest.has_modality("parts") {
            return Err(DataError::Manifest {
                path: self.manifest_path.clone(),
                field: "modalities".into(),
                detail: format!(
                    "{} has {} samples with parts.png but \"parts\" is not listed",
                    self.shard_paths[i].display(),
                    reader.with_parts()
                ),
            });
        }
        // Another thread may have won the race; either reader is equivalent.
        let _ = cell.set(reader);
        cell.get().ok_or_else(|| DataError::Manifest {
            path: self.manifest_path.clone(),
            field: format!("shards[{i}]"),
            detail: "reader was not initialised".into(),
        })
    }

    /// Reads sample `index` (global, manifest order). Checks the sample's layout and image size
    /// against the manifest.
    pub fn get(&self, index: u64) -> Result<Sample, DataError> {
        let (shard, local) = self.locate(index).ok_or_else(|| DataError::IndexOutOfRange {
            manifest: self.manifest_path.clone(),
            index,
            len: self.len(),
        })?;
        let reader = self.shard(shard)?;
        let sample = reader.read(local)?;
        let field_err = |field: &str, detail: String| DataError::SampleField {
            shard: reader.path().to_path_buf(),
            key: sample.key.clone(),
            field: field.to_string(),
            detail,
        };
        if sample.layout != self.manifest.layout {
            return Err(field_err(
                "kp2d.json layout",
                format!("{} but the manifest says {}", sample.layout, self.manifest.layout),
            ));
        }
        if let Some((w, h)) = self.manifest.fixed_image_size()
            && (sample.rgb.width, sample.rgb.height) != (w, h)
        {
            return Err(field_err(
                "rgb size",
                format!("{}x{} but the manifest says {w}x{h}", sample.rgb.width, sample.rgb.height),
            ));
        }
        Ok(sample)
    }

    /// Recomputes every shard's SHA-256 and compares it with the manifest; the first mismatch is
    /// reported, naming the shard.
    pub fn verify(&self) -> Result<(), DataError> {
        for (entry, path) in self.manifest.shards.iter().zip(&self.shard_paths) {
            let actual = sha256_file(path)?;
            if actual != entry.sha256 {
                return Err(DataError::ChecksumMismatch {
                    shard: path.clone(),
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{DepthImage, Joint, RgbImage};
    use crate::shard::ShardWriter;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            name: "t".into(),
            layout: KeypointLayout::Coco13,
            image_width: 4,
            image_height: 3,
            modalities: vec!["rgb".into(), "depth".into(), "kp2d".into()],
            samples: 5,
            shards: vec![
                ShardEntry { path: "a.tar".into(), samples: 2, with_depth: 1, sha256: "0".repeat(64) },
                ShardEntry { path: "b.tar".into(), samples: 3, with_depth: 0, sha256: "a".repeat(64) },
            ],
        }
    }

    fn assert_load_err(dir: &Path, json: &str, field: &str) {
        let path = dir.join("manifest.json");
        fs::write(&path, json).expect("write");
        let err = Manifest::load(&path).expect_err(field);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "no path in: {msg}");
        assert!(msg.contains(field), "no field {field} in: {msg}");
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest.json");
        let m = manifest();
        m.save(&path).expect("save");
        assert_eq!(Manifest::load(&path).expect("load"), m);
        // no temp file left behind
        let names: Vec<_> = fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("manifest.json")]);
        assert_eq!(m.with_depth(), 1);
    }

    #[test]
    fn load_errors_name_path_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = serde_json::to_value(manifest()).expect("json");

        let mut v = good.clone();
        v["format"] = "hcmoco-shards/2".into();
        assert_load_err(dir.path(), &v.to_string(), "format");

        let mut v = good.clone();
        v["samples"] = 6.into();
        assert_load_err(dir.path(), &v.to_string(), "samples");

        let mut v = good.clone();
        v["colour"] = "blue".into();
        assert_load_err(dir.path(), &v.to_string(), "colour");

        let mut v = good.clone();
        v["shards"][1]["checksum"] = "x".into();
        assert_load_err(dir.path(), &v.to_string(), "checksum");

        let mut v = good.clone();
        v["shards"] = serde_json::json!([]);
        v["samples"] = 0.into();
        assert_load_err(dir.path(), &v.to_string(), "shards");

        let mut v = good.clone();
        v["shards"][0]["sha256"] = "XYZ".into();
        assert_load_err(dir.path(), &v.to_string(), "shards[0].sha256");

        let mut v = good.clone();
        v["shards"][0]["with_depth"] = 3.into();
        assert_load_err(dir.path(), &v.to_string(), "shards[0].with_depth");

        let mut v = good.clone();
        v["modalities"] = serde_json::json!(["rgb", "kp2d"]);
        assert_load_err(dir.path(), &v.to_string(), "modalities");

        let mut v = good.clone();
        v["layout"] = "openpose".into();
        assert_load_err(dir.path(), &v.to_string(), "openpose");

        let mut v = good;
        v.as_object_mut().expect("object").remove("name");
        assert_load_err(dir.path(), &v.to_string(), "name");

        assert_load_err(dir.path(), "{not json", "manifest");
    }

    fn tiny(key: &str, depth: bool) -> Sample {
        Sample {
            key: key.into(),
            rgb: RgbImage { width: 4, height: 3, data: vec![key.len() as u8; 36] },
            depth: depth.then(|| DepthImage { width: 4, height: 3, data: vec![3000; 12] }),
            parts: None,
            layout: KeypointLayout::Coco13,
            joints: (0..13).map(|i| Joint { x: i as f32, y: 1.0, visible: true }).collect(),
        }
    }

    /// Writes shards of the given sizes (key = global index) and a manifest; returns its path.
    fn build(dir: &Path, sizes: &[usize]) -> PathBuf {
        let mut shards = Vec::new();
        let mut g = 0;
        for (i, &n) in sizes.iter().enumerate() {
            let name = format!("shard-{i:05}.tar");
            let mut w = ShardWriter::create(dir.join(&name)).expect("create");
            for _ in 0..n {
                w.append(&tiny(&format!("k{g:04}"), g % 3 == 0)).expect("append");
                g += 1;
            }
            let s = w.finish().expect("finish");
            shards.push(ShardEntry { path: name, samples: s.samples, with_depth: s.with_depth, sha256: s.sha256 });
        }
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            name: "tiny".into(),
            layout: KeypointLayout::Coco13,
            image_width: 4,
            image_height: 3,
            modalities: MODALITIES.iter().map(|s| s.to_string()).collect(),
            samples: g as u64,
            shards,
        };
        let path = dir.join("manifest.json");
        m.save(&path).expect("save");
        path
    }

    #[test]
    fn get_across_shard_boundaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = build(dir.path(), &[3, 0, 1, 4]);
        let ds = Dataset::open(&path).expect("open");
        assert_eq!(ds.len(), 8);
        assert_eq!(ds.locate(2), Some((0, 2)));
        assert_eq!(ds.locate(3), Some((2, 0)));
        assert_eq!(ds.locate(4), Some((3, 0)));
        assert_eq!(ds.locate(7), Some((3, 3)));
        assert_eq!(ds.locate(8), None);
        for g in (0..8u64).rev() {
            let s = ds.get(g).expect("get");
            assert_eq!(s, tiny(&format!("k{g:04}"), g % 3 == 0));
        }
        let err = ds.get(8).expect_err("out of range");
        assert!(matches!(err, DataError::IndexOutOfRange { index: 8, len: 8, .. }), "{err}");
        ds.verify().expect("untouched shards verify");
    }

    #[test]
    fn verify_detects_modified_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = build(dir.path(), &[2, 2]);
        let shard = dir.path().join("shard-00001.tar");
        let mut bytes = fs::read(&shard).expect("read");
        bytes[700] ^= 1;
        fs::write(&shard, bytes).expect("write");
        let ds = Dataset::open(&path).expect("open");
        let err = ds.verify().expect_err("modified");
        assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("shard-00001.tar"), "{err}");
    }

    #[test]
    fn count_mismatch_and_missing_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = build(dir.path(), &[2, 2]);
        let mut m = Manifest::load(&path).expect("load");
        m.shards[0].samples = 1;
        m.shards[1].samples = 3;
        m.save(&path).expect("save");
        let ds = Dataset::open(&path).expect("open");
        let err = ds.get(0).expect_err("count mismatch");
        assert!(matches!(err, DataError::ShardSampleCount { expected: 1, found: 2, .. }), "{err}");

        fs::remove_file(dir.path().join("shard-00001.tar")).expect("rm");
        let err = Dataset::open(&path).expect_err("missing shard");
        assert!(err.to_string().contains("shard-00001.tar"), "{err}");
    }

    #[test]
    fn dataset_is_send_sync_and_shared() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Dataset>();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = build(dir.path(), &[3, 3]);
        let ds = Dataset::open(&path).expect("open");
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let ds = &ds;
                s.spawn(move || {
                    for g in 0..6u64 {
                        let i = (g + t) % 6;
                        assert_eq!(ds.get(i).expect("get").key, format!("k{i:04}"));
                    }
                });
            }
        });
    }

    #[test]
    fn image_size_may_vary_per_sample() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sized = |key: &str, w: u32, h: u32| Sample {
            rgb: RgbImage { width: w, height: h, data: vec![9; (w * h * 3) as usize] },
            depth: None,
            parts: Some(crate::sample::LabelImage { width: w, height: h, data: vec![2; (w * h) as usize] }),
            ..tiny(key, false)
        };
        let mut w = ShardWriter::create(dir.path().join("v.tar")).expect("create");
        let samples = [sized("a", 4, 3), sized("b", 7, 2), sized("c", 1, 9)];
        for s in &samples {
            w.append(s).expect("append");
        }
        let summary = w.finish().expect("finish");
        let mut m = Manifest {
            format: MANIFEST_FORMAT.into(),
            name: "varied".into(),
            layout: KeypointLayout::Coco13,
            image_width: 0,
            image_height: 0,
            modalities: vec!["rgb".into(), "kp2d".into(), "parts".into()],
            samples: 3,
            shards: vec![ShardEntry { path: "v.tar".into(), samples: 3, with_depth: 0, sha256: summary.sha256 }],
        };
        let path = dir.path().join("manifest.json");
        m.save(&path).expect("save");
        assert_eq!(m.fixed_image_size(), None);
        let ds = Dataset::open(&path).expect("open");
        for (g, want) in samples.iter().enumerate() {
            assert_eq!(&ds.get(g as u64).expect("get"), want);
        }

        // a fixed size is still checked on every sample
        m.image_width = 4;
        m.image_height = 3;
        m.save(&path).expect("save");
        let ds = Dataset::open(&path).expect("open");
        ds.get(0).expect("4x3 matches");
        let err = ds.get(1).expect_err("7x2");
        assert!(err.to_string().contains("7x2") && err.to_string().contains("v.tar"), "{err}");

        // exactly one side 0 is refused
        m.image_width = 0;
        let err = m.save(&path).expect_err("one side 0");
        assert!(err.to_string().contains("image_width"), "{err}");

        // parts present but not listed
        m.image_width = 0;
        m.image_height = 0;
        m.modalities = vec!["rgb".into(), "kp2d".into()];
        m.save(&path).expect("save");
        let err = Dataset::open(&path).expect("open").get(0).expect_err("parts not listed");
        assert!(err.to_string().contains("\"parts\" is not listed"), "{err}");
    }
}
