//! WebDataset-compatible tar shards.
//!
//! One sample is the run of tar members sharing a key: `KEY.rgb.png` (8-bit RGB) or `KEY.rgb.jpg`
//! (see [`RgbEncoding`]), `KEY.depth.png` (16-bit grayscale, millimetres; absent for RGB-only samples),
//! `KEY.parts.png` (8-bit grayscale body-part labels, values index [`crate::PART_NAMES`]; present when
//! the source knows them), `KEY.kp2d.json` and `KEY.meta.json`. The key is the member path up to the
//! first dot of its file name, so keys never contain dots (Python's `webdataset` splits the same way).
//!
//! [`ShardWriter`] writes members with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same
//! samples always give byte-identical shards, and hashes the file while writing it.
//! [`ShardReader::open`] reads only the tar headers (payloads are skipped with seeks) into an index of
//! member offsets, in file order; [`ShardReader::read`] then seeks to and decodes one sample.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::codec::{
    self, Ctx, DEPTH_MEMBER, KP2D_MEMBER, META_MEMBER, PARTS_MEMBER, RGB_JPEG_MEMBER, RGB_MEMBER, decode_depth_png,
    decode_kp2d, decode_meta, decode_parts_png, decode_rgb_jpeg, decode_rgb_png,
};
use crate::error::DataError;
use crate::layout::MAX_PART_LABEL;
use crate::sample::{DepthImage, LabelImage, RgbImage, Sample};

/// Longest accepted sample key, in bytes.
pub const MAX_KEY_LEN: usize = 200;

const BLOCK: u64 = 512;

/// What [`ShardWriter::finish`] reports: the numbers a manifest entry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub samples: u64,
    pub with_depth: u64,
    /// Samples with a `parts.png` member.
    pub with_parts: u64,
    /// Lowercase hex SHA-256 of the whole shard file.
    pub sha256: String,
}

/// How [`ShardWriter`] stores RGB: lossless `KEY.rgb.png` (the default) or `KEY.rgb.jpg` at a quality
/// in `1..=100` (4:4:4, no chroma subsampling). Readers accept either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RgbEncoding {
    #[default]
    Png,
    Jpeg {
        quality: u8,
    },
}

/// Checks a sample key: non-empty, at most [`MAX_KEY_LEN`] bytes, ASCII letters, digits, `-`, `_`
/// and `/` (not leading, trailing or doubled). In particular no dots: the first dot ends the key.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("key is {} bytes, at most {MAX_KEY_LEN} allowed", key.len()));
    }
    if let Some(c) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'))) {
        return Err(format!("key contains {c:?}; allowed: ascii letters, digits, '-', '_', '/'"));
    }
    if key.starts_with('/') || key.ends_with('/') || key.contains("//") {
        return Err("'/' may not lead, trail or repeat in a key".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writer

/// A writer that hashes every byte it passes on.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one shard. Call [`finish`](Self::finish); a writer dropped without it leaves an incomplete
/// shard (which [`ShardReader::open`] reports as truncated). After an I/O error from
/// [`append`](Self::append) the shard must be discarded; validation errors leave it usable.
pub struct ShardWriter {
    path: PathBuf,
    builder: tar::Builder<HashingWriter<BufWriter<File>>>,
    keys: HashSet<String>,
    samples: u64,
    with_depth: u64,
    with_parts: u64,
    source: String,
    rgb_encoding: RgbEncoding,
}

impl std::fmt::Debug for ShardWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWriter")
            .field("path", &self.path)
            .field("samples", &self.samples)
            .field("with_depth", &self.with_depth)
            .finish_non_exhaustive()
    }
}

impl ShardWriter {
    /// Creates (or truncates) the shard file at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<ShardWriter, DataError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        let writer = HashingWriter { inner: BufWriter::new(file), hasher: Sha256::new() };
        let mut builder = tar::Builder::new(writer);
        builder.mode(tar::HeaderMode::Deterministic);
        Ok(ShardWriter {
            path,
            builder,
            keys: HashSet::new(),
            samples: 0,
            with_depth: 0,
            with_parts: 0,
            source: "unknown".to_string(),
            rgb_encoding: RgbEncoding::Png,
        })
    }

    /// Sets how RGB is stored (default [`RgbEncoding::Png`]). A JPEG quality outside `1..=100` is an
    /// error naming the shard.
    pub fn with_rgb_encoding(mut self, encoding: RgbEncoding) -> Result<ShardWriter, DataError> {
        if let RgbEncoding::Jpeg { quality } = encoding
            && !(1..=100).contains(&quality)
        {
            return Err(DataError::WriterOption {
                shard: self.path.clone(),
                field: "rgb_encoding",
                detail: format!("jpeg quality {quality} is outside 1..=100"),
            });
        }
        self.rgb_encoding = encoding;
        Ok(self)
    }

    /// Sets the `source` recorded in every sample's `meta.json` (default `"unknown"`).
    pub fn with_source(mut self, source: impl Into<String>) -> ShardWriter {
        self.source = source.into();
        self
    }

    /// The shard's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Samples appended so far.
    pub fn len(&self) -> u64 {
        self.samples
    }

    /// Whether no sample has been appended yet.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Validates, encodes and appends one sample.
    pub fn append(&mut self, sample: &Sample) -> Result<(), DataError> {
        validate_sample(sample)?;
        if self.keys.contains(&sample.key) {
            return Err(invalid(&sample.key, "key", "duplicate key in this shard"));
        }
        let key = &sample.key;
        let (rgb_member, rgb) = match self.rgb_encoding {
            RgbEncoding::Png => (
                RGB_MEMBER,
                codec::encode_rgb_png(&sample.rgb)
                    .map_err(|e| invalid(key, "rgb", format!("png encoding failed: {e}")))?,
            ),
            RgbEncoding::Jpeg { quality } => (
                RGB_JPEG_MEMBER,
                codec::encode_rgb_jpeg(&sample.rgb, quality)
                    .map_err(|e| invalid(key, "rgb", format!("jpeg encoding failed: {e}")))?,
            ),
        };
        let depth = match &sample.depth {
            Some(d) => Some(
                codec::encode_depth_png(d).map_err(|e| invalid(key, "depth", format!("png encoding failed: {e}")))?,
            ),
            None => None,
        };
        let parts = match &sample.parts {
            Some(p) => Some(
                codec::encode_parts_png(p).map_err(|e| invalid(key, "parts", format!("png encoding failed: {e}")))?,
            ),
            None => None,
        };
        let kp2d = codec::encode_kp2d(sample.layout, &sample.joints);
        let meta = codec::encode_meta(key, depth.is_some(), &self.source);

        self.append_member(key, rgb_member, &rgb)?;
        if let Some(depth) = &depth {
            self.append_member(key, DEPTH_MEMBER, depth)?;
        }
        if let Some(parts) = &parts {
            self.append_member(key, PARTS_MEMBER, parts)?;
        }
        self.append_member(key, KP2D_MEMBER, &kp2d)?;
        self.append_member(key, META_MEMBER, &meta)?;

        self.keys.insert(key.clone());
        self.samples += 1;
        self.with_depth += u64::from(depth.is_some());
        self.with_parts += u64::from(parts.is_some());
        Ok(())
    }

    fn append_member(&mut self, key: &str, suffix: &str, data: &[u8]) -> Result<(), DataError> {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        self.builder.append_data(&mut header, format!("{key}.{suffix}"), data).map_err(|e| DataError::io(&self.path, e))
    }

    /// Writes the end-of-archive marker, flushes, and returns the counts and the file's SHA-256.
    pub fn finish(self) -> Result<ShardSummary, DataError> {
        let ShardWriter { path, builder, samples, with_depth, with_parts, .. } = self;
        let writer = builder.into_inner().map_err(|e| DataError::io(&path, e))?;
        let HashingWriter { inner, hasher } = writer;
        let file = inner.into_inner().map_err(|e| DataError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&path, e))?;
        Ok(ShardSummary { samples, with_depth, with_parts, sha256: hex::encode(hasher.finalize()) })
    }
}

fn invalid(key: &str, field: &str, detail: impl Into<String>) -> DataError {
    DataError::InvalidSample { key: key.to_string(), field: field.to_string(), detail: detail.into() }
}

/// The writer-side checks: everything a reader would reject is refused before it reaches the disk.
fn validate_sample(s: &Sample) -> Result<(), DataError> {
    let key = &s.key;
    validate_key(key).map_err(|d| invalid(key, "key", d))?;
    let (w, h) = (s.rgb.width, s.rgb.height);
    if w == 0 || h == 0 || w > codec::MAX_IMAGE_SIDE || h > codec::MAX_IMAGE_SIDE {
        return Err(invalid(key, "rgb", format!("unsupported size {w}x{h}")));
    }
    if Some(s.rgb.data.len()) != RgbImage::expected_len(w, h) {
        return Err(invalid(key, "rgb.data", format!("{} bytes, expected {w}x{h}x3", s.rgb.data.len())));
    }
    if let Some(d) = &s.depth {
        if (d.width, d.height) != (w, h) {
            return Err(invalid(key, "depth", format!("depth is {}x{} but rgb is {w}x{h}", d.width, d.height)));
        }
        if Some(d.data.len()) != DepthImage::expected_len(w, h) {
            return Err(invalid(key, "depth.data", format!("{} values, expected {w}x{h}", d.data.len())));
        }
    }
    if let Some(p) = &s.parts {
        if (p.width, p.height) != (w, h) {
            return Err(invalid(key, "parts", format!("parts is {}x{} but rgb is {w}x{h}", p.width, p.height)));
        }
        if Some(p.data.len()) != LabelImage::expected_len(w, h) {
            return Err(invalid(key, "parts.data", format!("{} values, expected {w}x{h}", p.data.len())));
        }
        if let Some(i) = p.data.iter().position(|&v| v > MAX_PART_LABEL) {
            let (x, y) = (i % w as usize, i / w as usize);
            return Err(invalid(
                key,
                "parts.data",
                format!("label {} at ({x}, {y}) is not a part (0..={MAX_PART_LABEL})", p.data[i]),
            ));
        }
    }
    let expected = s.layout.num_joints();
    if s.joints.len() != expected {
        return Err(invalid(
            key,
            "joints",
            format!("layout {} expects {expected} joints, found {}", s.layout, s.joints.len()),
        ));
    }
    if let Some(i) = s.joints.iter().position(|j| !j.x.is_finite() || !j.y.is_finite()) {
        return Err(invalid(key, &format!("joints[{i}]"), "coordinates must be finite"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reader

#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

#[derive(Debug, Clone, Default)]
struct IndexEntry {
    key: String,
    /// `rgb.png` or `rgb.jpg` (the suffix says which).
    rgb: Option<(Member, &'static str)>,
    depth: Option<Member>,
    parts: Option<Member>,
    kp2d: Option<Member>,
    meta: Option<Member>,
}

/// Random access to the samples of one shard. `Send + Sync`: reads lock the file handle only for the
/// seek + read of the member bytes; decoding runs outside the lock.
pub struct ShardReader {
    path: PathBuf,
    file: Mutex<File>,
    entries: Vec<IndexEntry>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("samples", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// Splits a member path into (key, suffix) at the first dot of its file name.
fn split_member(name: &str) -> Option<(&str, &str)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = base_start + name[base_start..].find('.')?;
    Some((&name[..dot], &name[dot + 1..]))
}

impl ShardReader {
    /// Opens a shard and indexes its members by scanning the tar headers (payloads are skipped).
    ///
    /// Fails on a truncated or malformed tar, a sample without `rgb.png`/`rgb.jpg` or `kp2d.json`, or
    /// a member that appears twice (`rgb.png` next to `rgb.jpg` counts as twice). Members with other
    /// suffixes are ignored.
    pub fn open(path: impl AsRef<Path>) -> Result<ShardReader, DataError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        let entries = scan(&path, &file, file_len)?;
        Ok(ShardReader { path, file: Mutex::new(file), entries })
    }

    /// The shard's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the shard holds no sample.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sample keys, in file order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.key.as_str())
    }

    /// The key of sample `i`.
    pub fn key(&self, i: usize) -> Option<&str> {
        self.entries.get(i).map(|e| e.key.as_str())
    }

    /// Whether sample `i` has a depth member (from the index, no read).
    pub fn has_depth(&self, i: usize) -> Option<bool> {
        self.entries.get(i).map(|e| e.depth.is_some())
    }

    /// Number of samples with a depth member (from the index, no read).
    pub fn with_depth(&self) -> usize {
        self.entries.iter().filter(|e| e.depth.is_some()).count()
    }

    /// Whether sample `i` has a `parts.png` member (from the index, no read).
    pub fn has_parts(&self, i: usize) -> Option<bool> {
        self.entries.get(i).map(|e| e.parts.is_some())
    }

    /// Number of samples with a `parts.png` member (from the index, no read).
    pub fn with_parts(&self) -> usize {
        self.entries.iter().filter(|e| e.parts.is_some()).count()
    }

    /// Reads and decodes sample `i` (only its own members).
    pub fn read(&self, i: usize) -> Result<Sample, DataError> {
        let entry = self.entries.get(i).ok_or_else(|| DataError::ShardIndex {
            shard: self.path.clone(),
            index: i,
            len: self.entries.len(),
        })?;
        let key = entry.key.as_str();
        let ctx = Ctx { shard: &self.path, key };
        let missing = |member: &str| DataError::MissingMember {
            shard: self.path.clone(),
            key: key.to_string(),
            member: format!("{key}.{member}"),
        };
        let (rgb_m, rgb_suffix) = entry.rgb.ok_or_else(|| missing(RGB_MEMBER))?;
        let kp2d_m = entry.kp2d.ok_or_else(|| missing(KP2D_MEMBER))?;

        // All I/O first (one lock), then decode without holding it.
        let (rgb_b, depth_b, parts_b, kp2d_b, meta_b) = {
            let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            let rgb_b = self.read_member(&mut file, key, rgb_suffix, rgb_m)?;
            let depth_b = match entry.depth {
                Some(m) => Some(self.read_member(&mut file, key, DEPTH_MEMBER, m)?),
                None => None,
            };
            let parts_b = match entry.parts {
                Some(m) => Some(self.read_member(&mut file, key, PARTS_MEMBER, m)?),
                None => None,
            };
            let kp2d_b = self.read_member(&mut file, key, KP2D_MEMBER, kp2d_m)?;
            let meta_b = match entry.meta {
                Some(m) => Some(self.read_member(&mut file, key, META_MEMBER, m)?),
                None => None,
            };
            (rgb_b, depth_b, parts_b, kp2d_b, meta_b)
        };

        let rgb =
            if rgb_suffix == RGB_JPEG_MEMBER { decode_rgb_jpeg(&rgb_b, ctx)? } else { decode_rgb_png(&rgb_b, ctx)? };
        let depth = depth_b.map(|b| decode_depth_png(&b, ctx)).transpose()?;
        if let Some(d) = &depth
            && (d.width, d.height) != (rgb.width, rgb.height)
        {
            return Err(DataError::SizeMismatch {
                shard: self.path.clone(),
                key: key.to_string(),
                rgb_width: rgb.width,
                rgb_height: rgb.height,
                depth_width: d.width,
                depth_height: d.height,
            });
        }
        let parts = parts_b.map(|b| decode_parts_png(&b, ctx)).transpose()?;
        if let Some(p) = &parts
            && (p.width, p.height) != (rgb.width, rgb.height)
        {
            return Err(DataError::MemberSize {
                shard: self.path.clone(),
                key: key.to_string(),
                member: format!("{key}.{PARTS_MEMBER}"),
                width: p.width,
                height: p.height,
                rgb_width: rgb.width,
                rgb_height: rgb.height,
            });
        }
        let (layout, joints) = decode_kp2d(&kp2d_b, ctx)?;
        if let Some(meta_b) = meta_b {
            let meta = decode_meta(&meta_b, ctx)?;
            if meta.key != key {
                return Err(ctx.field("meta.json key", format!("says {:?}, member names say {key:?}", meta.key)));
            }
            if meta.has_depth != depth.is_some() {
                return Err(ctx.field(
                    "meta.json has_depth",
                    format!(
                        "says {}, but the depth member is {}",
                        meta.has_depth,
                        if depth.is_some() { "present" } else { "absent" }
                    ),
                ));
            }
        }
        Ok(Sample { key: key.to_string(), rgb, depth, parts, layout, joints })
    }

    fn read_member(&self, file: &mut File, key: &str, suffix: &str, m: Member) -> Result<Vec<u8>, DataError> {
        let size = usize::try_from(m.size).map_err(|_| DataError::MalformedTar {
            shard: self.path.clone(),
            key: key.to_string(),
            detail: format!("member {key}.{suffix} is too large ({} bytes)", m.size),
        })?;
        let mut buf = vec![0u8; size];
        file.seek(SeekFrom::Start(m.offset)).map_err(|e| DataError::io(&self.path, e))?;
        file.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                DataError::TruncatedTar {
                    shard: self.path.clone(),
                    key: key.to_string(),
                    detail: format!("member {key}.{suffix} ends past the end of the file"),
                }
            } else {
                DataError::io(&self.path, e)
            }
        })?;
        Ok(buf)
    }
}

/// Scans the tar headers into the sample index; see [`ShardReader::open`].
fn scan(path: &Path, file: &File, file_len: u64) -> Result<Vec<IndexEntry>, DataError> {
    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut last_key = String::from("(none)");
    // End of the last member's padded payload: where the end-of-archive marker must start.
    let mut end = 0u64;

    let malformed = |last_key: &str, detail: String| DataError::MalformedTar {
        shard: path.to_path_buf(),
        key: last_key.to_string(),
        detail,
    };
    let tar_error = |last_key: &str, end: u64, e: io::Error| {
        if end + BLOCK > file_len || e.kind() == io::ErrorKind::UnexpectedEof {
            DataError::TruncatedTar {
                shard: path.to_path_buf(),
                key: last_key.to_string(),
                detail: format!("tar header after byte {end} is incomplete ({e})"),
            }
        } else {
            malformed(last_key, e.to_string())
        }
    };

    let mut archive = tar::Archive::new(BufReader::new(file));
    let iter = archive.entries_with_seek().map_err(|e| tar_error(&last_key, end, e))?;
    for item in iter {
        let entry = item.map_err(|e| tar_error(&last_key, end, e))?;
        let size = entry.size();
        let offset = entry.raw_file_position();
        let name = entry
            .path()
            .map_err(|e| malformed(&last_key, format!("bad member name: {e}")))?
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| malformed(&last_key, "member name is not utf-8".into()))?;
        let member_key = split_member(&name).map_or(name.as_str(), |(k, _)| k).to_string();
        let data_end = offset
            .checked_add(size)
            .ok_or_else(|| malformed(&member_key, format!("member {name} has an impossible size {size}")))?;
        if data_end > file_len {
            return Err(DataError::TruncatedTar {
                shard: path.to_path_buf(),
                key: member_key,
                detail: format!("member {name} needs bytes {offset}..{data_end} but the file has {file_len}"),
            });
        }
        end = data_end.div_ceil(BLOCK) * BLOCK;

        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some((key, suffix)) = split_member(&name) else {
            continue; // not a sample member (no extension)
        };
        if !matches!(suffix, RGB_MEMBER | RGB_JPEG_MEMBER | DEPTH_MEMBER | PARTS_MEMBER | KP2D_MEMBER | META_MEMBER) {
            continue; // other modalities are ignored by this reader
        }
        let idx = match by_key.get(key) {
            Some(&i) => i,
            None => {
                entries.push(IndexEntry { key: key.to_string(), ..IndexEntry::default() });
                by_key.insert(key.to_string(), entries.len() - 1);
                entries.len() - 1
            }
        };
        let e = &mut entries[idx];
        let member = Member { offset, size };
        let duplicate = match suffix {
            RGB_MEMBER | RGB_JPEG_MEMBER => {
                let kind = if suffix == RGB_MEMBER { RGB_MEMBER } else { RGB_JPEG_MEMBER };
                e.rgb.replace((member, kind)).is_some()
            }
            DEPTH_MEMBER => e.depth.replace(member).is_some(),
            PARTS_MEMBER => e.parts.replace(member).is_some(),
            KP2D_MEMBER => e.kp2d.replace(member).is_some(),
            _ => e.meta.replace(member).is_some(),
        };
        if duplicate {
            return Err(DataError::DuplicateMember {
                shard: path.to_path_buf(),
                key: key.to_string(),
                member: if suffix.starts_with("rgb.") {
                    format!("{name} (a sample has one rgb member, rgb.png or rgb.jpg)")
                } else {
                    name.clone()
                },
            });
        }
        last_key = key.to_string();
    }

    // Every tar writer ends the archive with zero blocks. Without them the file was cut at a member
    // boundary: a truncation the header scan alone cannot see.
    let mut marker = [0u8; BLOCK as usize];
    let has_marker = end + BLOCK <= file_len && {
        let mut f = file;
        f.seek(SeekFrom::Start(end)).is_ok() && f.read_exact(&mut marker).is_ok() && marker.iter().all(|&b| b == 0)
    };
    if !has_marker {
        return Err(DataError::TruncatedTar {
            shard: path.to_path_buf(),
            key: last_key,
            detail: format!("no end-of-archive marker after byte {end} (file has {file_len})"),
        });
    }

    for e in &entries {
        if e.rgb.is_none() {
            return Err(DataError::MissingMember {
                shard: path.to_path_buf(),
                key: e.key.clone(),
                member: format!("{k}.{RGB_MEMBER} or {k}.{RGB_JPEG_MEMBER}", k = e.key),
            });
        }
        if e.kp2d.is_none() {
            return Err(DataError::MissingMember {
                shard: path.to_path_buf(),
                key: e.key.clone(),
                member: format!("{}.{KP2D_MEMBER}", e.key),
            });
        }
    }
    Ok(entries)
}

/// Lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String, DataError> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DataError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

// ---------------------------------------------------------------------------------------------
// Fuzzing entry points (shared by `data/fuzz` and the corpus replay tests)

/// Parses `bytes` as a shard (written to a temporary file, removed afterwards), then reads every
/// sample. Returns the number of samples, or the first error; must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_shard_bytes(bytes: &[u8]) -> Result<usize, DataError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("hcmoco-fuzz-{}-{n}.tar", std::process::id()));
    std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
    let result = ShardReader::open(&path).and_then(|reader| {
        // Read every sample, even after a failure, and report the first error.
        let mut first_err = None;
        for i in 0..reader.len() {
            if let Err(e) = reader.read(i) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(reader.len()), Err)
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Runs every member decoder (`rgb.png`, `rgb.jpg`, `depth.png`, `parts.png`, `kp2d.json`,
/// `meta.json`) over `bytes`; returns how many accepted them. Must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_member_bytes(bytes: &[u8]) -> usize {
    let ctx = Ctx { shard: Path::new("fuzz.tar"), key: "fuzz" };
    [
        decode_rgb_png(bytes, ctx).is_ok(),
        decode_rgb_jpeg(bytes, ctx).is_ok(),
        decode_depth_png(bytes, ctx).is_ok(),
        decode_parts_png(bytes, ctx).is_ok(),
        decode_kp2d(bytes, ctx).is_ok(),
        decode_meta(bytes, ctx).is_ok(),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KeypointLayout;
    use crate::sample::Joint;
    use proptest::prelude::*;

    fn sample(key: &str, with_depth: bool, seed: u8) -> Sample {
        let (w, h) = (5u32, 4u32);
        let rgb = RgbImage {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect(),
        };
        let depth = with_depth.then(|| DepthImage {
            width: w,
            height: h,
            data: (0..w * h).map(|i| if i % 3 == 0 { 0 } else { 2000 + i as u16 * 17 }).collect(),
        });
        // part labels on two of every three seeds, covering 0..=14
        let parts = (seed % 3 != 1).then(|| LabelImage {
            width: w,
            height: h,
            data: (0..w * h).map(|i| ((i + u32::from(seed)) % 15) as u8).collect(),
        });
        let joints = (0..16)
            .map(|i| Joint { x: i as f32 * 0.25 + f32::from(seed), y: -(i as f32), visible: i % 4 != 1 })
            .collect();
        Sample { key: key.to_string(), rgb, depth, parts, layout: KeypointLayout::Mpii16, joints }
    }

    /// A smooth image (JPEG-friendly): gradients plus a soft disc.
    fn smooth_rgb(w: u32, h: u32, seed: u8) -> RgbImage {
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                let d = ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt();
                let disc = if d < 0.3 { 60.0 } else { 0.0 };
                data.push((40.0 + 150.0 * fx + disc + f32::from(seed)).min(255.0) as u8);
                data.push((200.0 - 120.0 * fy) as u8);
                data.push((90.0 + 80.0 * fx * fy + disc * 0.5) as u8);
            }
        }
        RgbImage { width: w, height: h, data }
    }

    fn mean_abs_error(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!((a.width, a.height, a.data.len()), (b.width, b.height, b.data.len()));
        let sum: u64 = a.data.iter().zip(&b.data).map(|(&x, &y)| u64::from(x.abs_diff(y))).sum();
        sum as f64 / a.data.len() as f64
    }

    fn write(path: &Path, samples: &[Sample]) -> ShardSummary {
        let mut w = ShardWriter::create(path).expect("create");
        for s in samples {
            w.append(s).expect("append");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn round_trip_with_and_without_depth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard.tar");
        let samples: Vec<Sample> = (0..6)
            .map(|i| sample(&format!("s{i:03}"), i % 2 == 0, i as u8))
            .chain([sample("nested/dir_key-9", true, 9)])
            .collect();
        let summary = write(&path, &samples);
        assert_eq!(summary.samples, 7);
        assert_eq!(summary.with_depth, 4);
        assert_eq!(summary.with_parts, 5);
        assert_eq!(summary.sha256, sha256_file(&path).expect("hash"));

        let reader = ShardReader::open(&path).expect("open");
        assert_eq!(reader.len(), 7);
        let keys: Vec<&str> = reader.keys().collect();
        let want: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, want);
        assert_eq!(reader.with_depth(), 4);
        assert_eq!(reader.with_parts(), 5);
        assert_eq!(reader.has_parts(1), Some(false));
        // random order access
        for i in [3usize, 0, 6, 1, 5, 2, 4] {
            assert_eq!(reader.read(i).expect("read"), samples[i]);
            assert_eq!(reader.has_depth(i), Some(samples[i].depth.is_some()));
        }
        let err = reader.read(7).expect_err("out of range");
        assert!(matches!(err, DataError::ShardIndex { index: 7, len: 7, .. }), "{err}");
    }

    #[test]
    fn same_samples_give_identical_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples: Vec<Sample> = (0..3).map(|i| sample(&format!("k{i}"), i == 1, 1)).collect();
        let a = write(&dir.path().join("a.tar"), &samples);
        let b = write(&dir.path().join("b.tar"), &samples);
        assert_eq!(a, b);
    }

    #[test]
    fn writer_rejects_bad_samples() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = ShardWriter::create(dir.path().join("x.tar")).expect("create");
        for bad in ["", "a.b", "/abs", "trail/", "sp ace", "a//b"] {
            let err = w.append(&sample(bad, false, 0)).expect_err(bad);
            assert!(matches!(err, DataError::InvalidSample { ref field, .. } if field == "key"), "{err}");
        }
        let mut s = sample("ok", true, 0);
        s.joints.pop();
        let err = w.append(&s).expect_err("joint count");
        assert!(err.to_string().contains("expects 16 joints"), "{err}");
        let mut s = sample("ok", true, 0);
        if let Some(d) = s.depth.as_mut() {
            d.width = 4;
            d.data.truncate(16);
        }
        assert!(w.append(&s).is_err());
        let mut s = sample("ok", false, 0);
        s.joints[3].x = f32::NAN;
        assert!(w.append(&s).is_err());
        w.append(&sample("ok", false, 0)).expect("valid sample after rejected ones");
        let err = w.append(&sample("ok", false, 0)).expect_err("duplicate");
        assert!(err.to_string().contains("duplicate"), "{err}");
        assert_eq!(w.finish().expect("finish").samples, 1);
    }

    /// Writes raw members (bypassing the writer's checks) into a tar.
    fn raw_tar(path: &Path, members: &[(String, Vec<u8>)]) {
        let file = File::create(path).expect("create");
        let mut b = tar::Builder::new(file);
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data.as_slice()).expect("append");
        }
        b.into_inner().expect("finish");
    }

    fn members_of(s: &Sample) -> Vec<(String, Vec<u8>)> {
        let mut m = vec![(format!("{}.rgb.png", s.key), codec::encode_rgb_png(&s.rgb).expect("png"))];
        if let Some(d) = &s.depth {
            m.push((format!("{}.depth.png", s.key), codec::encode_depth_png(d).expect("png")));
        }
        if let Some(p) = &s.parts {
            m.push((format!("{}.parts.png", s.key), codec::encode_parts_png(p).expect("png")));
        }
        m.push((format!("{}.kp2d.json", s.key), codec::encode_kp2d(s.layout, &s.joints)));
        m.push((format!("{}.meta.json", s.key), codec::encode_meta(&s.key, s.depth.is_some(), "t")));
        m
    }

    fn assert_names(err: &DataError, shard: &Path, key: &str) {
        let msg = err.to_string();
        assert!(msg.contains(&shard.display().to_string()), "no shard in: {msg}");
        assert!(msg.contains(key), "no key {key} in: {msg}");
        assert!(msg.starts_with(|c: char| c.is_ascii_lowercase()), "not lowercase: {msg}");
    }

    #[test]
    fn truncated_tar_names_shard_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.tar");
        let samples: Vec<Sample> = (0..3).map(|i| sample(&format!("key{i}"), true, i)).collect();
        write(&path, &samples);
        let full = std::fs::read(&path).expect("read");
        // cut inside the last sample's payloads, at a member boundary, and inside a header
        let reader = ShardReader::open(&path).expect("open");
        assert_eq!(reader.len(), 3);
        let mut cuts = vec![full.len() - 1024, full.len() - 1100, full.len() - 2000];
        cuts.extend(
            (1..full.len() / 512).map(|b| b * 512 + 100).filter(|&c| c > full.len() / 2 && c < full.len() - 1024),
        );
        for cut in cuts {
            let p = dir.path().join(format!("cut{cut}.tar"));
            std::fs::write(&p, &full[..cut]).expect("write");
            let err = ShardReader::open(&p).expect_err("truncated");
            assert!(
                matches!(err, DataError::TruncatedTar { .. } | DataError::MissingMember { .. }),
                "cut {cut}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.contains("key1") || msg.contains("key2"), "cut {cut}: {msg}");
        }
        // cut exactly before the end-of-archive marker
        let p = dir.path().join("nomarker.tar");
        std::fs::write(&p, &full[..full.len() - 1024]).expect("write");
        let err = ShardReader::open(&p).expect_err("no marker");
        assert!(matches!(err, DataError::TruncatedTar { ref key, .. } if key == "key2"), "{err}");
    }

    #[test]
    fn corrupt_png_names_shard_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.tar");
        let good = sample("good", true, 1);
        let bad = sample("bad_one", true, 2);
        let mut members = members_of(&good);
        let mut bad_members = members_of(&bad);
        let rgb = &mut bad_members[0].1;
        let mid = rgb.len() / 2;
        for b in &mut rgb[mid..mid + 8] {
            *b ^= 0x5a;
        }
        members.extend(bad_members);
        raw_tar(&path, &members);
        let reader = ShardReader::open(&path).expect("open reads headers only");
        assert_eq!(reader.read(0).expect("good sample"), good);
        let err = reader.read(1).expect_err("corrupt png");
        assert!(matches!(err, DataError::CorruptPng { .. }), "{err}");
        assert_names(&err, &path, "bad_one");

        // not a png at all
        let mut members = members_of(&good);
        members[1].1 = b"definitely not a png".to_vec();
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("garbage depth");
        assert!(matches!(err, DataError::CorruptPng { ref member, .. } if member == "depth.png"), "{err}");
        assert_names(&err, &path, "good");
    }

    #[test]
    fn eight_bit_depth_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.tar");
        let s = sample("depth8", true, 3);
        let mut members = members_of(&s);
        let mut png8 = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png8, 5, 4);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().expect("header");
            w.write_image_data(&[100u8; 20]).expect("data");
            w.finish().expect("finish");
        }
        members[1].1 = png8;
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("8-bit depth");
        assert!(matches!(err, DataError::PngFormat { .. }), "{err}");
        assert!(err.to_string().contains("8-bit grayscale"), "{err}");
        assert_names(&err, &path, "depth8");
    }

    #[test]
    fn wrong_joint_count_and_size_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.tar");
        let s = sample("joints13", false, 4);
        let mut members = members_of(&s);
        let idx = members.iter().position(|(n, _)| n.ends_with("kp2d.json")).expect("kp2d");
        members[idx].1 = codec::encode_kp2d(KeypointLayout::Coco13, &s.joints);
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("16 joints as coco13");
        assert!(matches!(err, DataError::JointCount { expected: 13, found: 16, .. }), "{err}");
        assert_names(&err, &path, "joints13");

        let s = sample("sizes", true, 5);
        let mut members = members_of(&s);
        let small = DepthImage { width: 2, height: 2, data: vec![1; 4] };
        members[1].1 = codec::encode_depth_png(&small).expect("png");
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("size mismatch");
        assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");
        assert_names(&err, &path, "sizes");
    }

    #[test]
    fn missing_and_duplicate_members() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.tar");
        let s = sample("nokp", false, 6);
        let members: Vec<_> = members_of(&s).into_iter().filter(|(n, _)| !n.ends_with("kp2d.json")).collect();
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect_err("missing kp2d");
        assert!(matches!(err, DataError::MissingMember { .. }), "{err}");
        assert!(err.to_string().contains("nokp.kp2d.json"), "{err}");
        assert_names(&err, &path, "nokp");

        let s = sample("norgb", false, 6);
        let members: Vec<_> = members_of(&s).into_iter().filter(|(n, _)| !n.ends_with("rgb.png")).collect();
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect_err("missing rgb");
        assert!(err.to_string().contains("norgb.rgb.png"), "{err}");

        let s = sample("dup", false, 6);
        let mut members = members_of(&s);
        members.push(members[0].clone());
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect_err("duplicate");
        assert!(matches!(err, DataError::DuplicateMember { .. }), "{err}");
        assert_names(&err, &path, "dup");
    }

    #[test]
    fn meta_disagreement_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.tar");
        let s = sample("m1", false, 7);
        let mut members = members_of(&s);
        let last = members.len() - 1;
        members[last].1 = codec::encode_meta("m1", true, "t");
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("has_depth lies");
        assert!(err.to_string().contains("has_depth"), "{err}");
    }

    #[test]
    fn unknown_members_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("u.tar");
        let s = sample("u1", true, 8);
        let mut members = members_of(&s);
        members.insert(2, ("u1.seg.png".to_string(), vec![1, 2, 3]));
        members.push(("README".to_string(), b"hello".to_vec()));
        raw_tar(&path, &members);
        let reader = ShardReader::open(&path).expect("open");
        assert_eq!(reader.len(), 1);
        assert_eq!(reader.read(0).expect("read"), s);
    }

    #[test]
    fn jpeg_round_trip_within_tolerance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jpeg.tar");
        let samples: Vec<Sample> = (0..4u8)
            .map(|i| Sample { rgb: smooth_rgb(40, 32, i * 7), ..sample(&format!("j{i}"), i % 2 == 0, 0) })
            .map(|mut s| {
                if let Some(d) = s.depth.as_mut() {
                    *d = DepthImage { width: 40, height: 32, data: (0..1280).map(|v| v as u16 * 3).collect() };
                }
                s.parts = Some(LabelImage { width: 40, height: 32, data: (0..1280).map(|v| (v % 15) as u8).collect() });
                s
            })
            .collect();
        let mut w = ShardWriter::create(&path)
            .expect("create")
            .with_rgb_encoding(RgbEncoding::Jpeg { quality: 95 })
            .expect("quality 95");
        for s in &samples {
            w.append(s).expect("append");
        }
        w.finish().expect("finish");
        let names: Vec<String> = tar::Archive::new(File::open(&path).expect("open"))
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        assert!(
            names.contains(&"j0.rgb.jpg".to_string()) && !names.iter().any(|n| n.ends_with("rgb.png")),
            "{names:?}"
        );
        let reader = ShardReader::open(&path).expect("open");
        for (i, want) in samples.iter().enumerate() {
            let got = reader.read(i).expect("read");
            let mae = mean_abs_error(&got.rgb, &want.rgb);
            assert!(mae < 4.0, "sample {i}: mean abs error {mae}");
            assert_eq!(got.depth, want.depth);
            assert_eq!(got.parts, want.parts);
            assert_eq!(got.joints, want.joints);
            assert_eq!(got.key, want.key);
        }
    }

    #[test]
    fn png_and_jpeg_samples_mix_in_one_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mixed.tar");
        let a = Sample { rgb: smooth_rgb(16, 16, 1), depth: None, parts: None, ..sample("png_one", false, 1) };
        let b = Sample { rgb: smooth_rgb(16, 16, 2), depth: None, parts: None, ..sample("jpg_one", false, 1) };
        let mut members = members_of(&a);
        let mut mb = members_of(&b);
        mb[0] = ("jpg_one.rgb.jpg".into(), codec::encode_rgb_jpeg(&b.rgb, 90).expect("jpeg"));
        members.extend(mb);
        raw_tar(&path, &members);
        let reader = ShardReader::open(&path).expect("open");
        assert_eq!(reader.read(0).expect("png"), a);
        let got = reader.read(1).expect("jpeg");
        assert!(mean_abs_error(&got.rgb, &b.rgb) < 5.0);

        // both encodings for one key: a duplicate
        let mut members = members_of(&a);
        members.insert(1, ("png_one.rgb.jpg".into(), codec::encode_rgb_jpeg(&a.rgb, 90).expect("jpeg")));
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect_err("two rgb members");
        assert!(matches!(err, DataError::DuplicateMember { .. }), "{err}");
        assert_names(&err, &path, "png_one.rgb.jpg");
    }

    #[test]
    fn bad_parts_and_jpeg_name_shard_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.tar");
        let s = sample("parts_small", false, 0);
        let mut members = members_of(&s);
        let i = members.iter().position(|(n, _)| n.ends_with("parts.png")).expect("parts");
        members[i].1 = codec::encode_parts_png(&LabelImage { width: 2, height: 2, data: vec![1; 4] }).expect("png");
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("wrong size");
        assert!(matches!(err, DataError::MemberSize { width: 2, height: 2, rgb_width: 5, .. }), "{err}");
        assert_names(&err, &path, "parts_small.parts.png");

        let s = sample("parts_label", false, 0);
        let mut members = members_of(&s);
        let mut labels = s.parts.clone().expect("parts");
        labels.data[7] = 15;
        members[i].1 = codec::encode_parts_png(&labels).expect("png");
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("label 15");
        assert!(matches!(err, DataError::PartLabel { label: 15, x: 2, y: 1, .. }), "{err}");
        assert_names(&err, &path, "parts_label");

        // parts.png as 16-bit: wrong format
        let mut members = members_of(&s);
        members[i].1 = codec::encode_depth_png(&DepthImage { width: 5, height: 4, data: vec![1; 20] }).expect("png");
        raw_tar(&path, &members);
        let err = ShardReader::open(&path).expect("open").read(0).expect_err("16-bit parts");
        assert!(matches!(err, DataError::PngFormat { .. }), "{err}");
        assert_names(&err, &path, "parts_label");

        // corrupt and truncated jpeg
        let s = Sample { rgb: smooth_rgb(24, 24, 3), depth: None, parts: None, ..sample("bad_jpeg", false, 0) };
        let jpeg = codec::encode_rgb_jpeg(&s.rgb, 90).expect("jpeg");
        let mut garbled = jpeg.clone();
        for b in &mut garbled[2..40] {
            *b = 0xff;
        }
        for bytes in [garbled, jpeg[..jpeg.len() / 3].to_vec(), b"not a jpeg".to_vec()] {
            let mut members = members_of(&s);
            members[0] = ("bad_jpeg.rgb.jpg".into(), bytes);
            raw_tar(&path, &members);
            let err = ShardReader::open(&path).expect("open").read(0).expect_err("corrupt jpeg");
            assert!(matches!(err, DataError::CorruptJpeg { .. }), "{err}");
            assert_names(&err, &path, "bad_jpeg");
        }
    }

    #[test]
    fn writer_rejects_bad_parts_and_quality() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.tar");
        for q in [0u8, 101] {
            let err = ShardWriter::create(&path)
                .expect("create")
                .with_rgb_encoding(RgbEncoding::Jpeg { quality: q })
                .expect_err("bad quality");
            assert!(err.to_string().contains("w.tar") && err.to_string().contains("quality"), "{err}");
        }
        let mut w = ShardWriter::create(&path).expect("create");
        let mut s = sample("p", false, 0);
        if let Some(p) = s.parts.as_mut() {
            p.data[3] = 200;
        }
        let err = w.append(&s).expect_err("label 200");
        assert!(err.to_string().contains("label 200"), "{err}");
        let mut s = sample("p", false, 0);
        s.parts = Some(LabelImage { width: 4, height: 4, data: vec![0; 16] });
        let err = w.append(&s).expect_err("size");
        assert!(matches!(err, DataError::InvalidSample { ref field, .. } if field == "parts"), "{err}");
        let mut s = sample("p", false, 0);
        if let Some(p) = s.parts.as_mut() {
            p.data.pop();
        }
        assert!(w.append(&s).is_err());
        w.append(&sample("p", false, 0)).expect("valid");
        assert_eq!(w.finish().expect("finish").with_parts, 1);
    }

    // -----------------------------------------------------------------------------------------
    // Fuzz corpus: `data/fuzz/corpus/{shard,member}`, replayed here so CI (stable) covers it.

    fn corpus_dir(target: &str) -> PathBuf {
        // The directory cargo names when it runs the test, not the one compiled in: a target directory
        // shared between checkouts may hold a test binary built in another, since deleted, one.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        dir.join("fuzz/corpus").join(target)
    }

    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
            .expect("corpus dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn fuzz_corpus_replays_without_panics() {
        let files = corpus("shard");
        assert!(files.len() >= 8, "corpus too small: {}", files.len());
        for (name, bytes) in &files {
            let result = fuzz_shard_bytes(bytes);
            if name.starts_with("valid-") {
                assert!(matches!(result, Ok(n) if n > 0), "{name}: {result:?}");
            } else if name.starts_with("trunc-") || name.starts_with("corrupt-") {
                let err = result.expect_err(name);
                // every such error names the shard file
                assert!(err.to_string().contains("hcmoco-fuzz-"), "{name}: {err}");
            }
        }
        let members = corpus("member");
        assert!(members.len() >= 5, "member corpus too small");
        for (name, bytes) in &members {
            let accepted = fuzz_member_bytes(bytes);
            if name.starts_with("valid-") {
                assert!(accepted >= 1, "{name}: no decoder accepted it");
            }
        }
    }

    /// Regenerates the saved corpus: `cargo test -p hcmoco-data -- --ignored regenerate_fuzz_corpus`.
    #[test]
    #[ignore]
    fn regenerate_fuzz_corpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shard_dir = corpus_dir("shard");
        let member_dir = corpus_dir("member");
        std::fs::create_dir_all(&shard_dir).expect("mkdir");
        std::fs::create_dir_all(&member_dir).expect("mkdir");
        let tiny = |key: &str, depth: bool, seed: u8| {
            let mut s = sample(key, depth, seed);
            s.joints.truncate(13);
            s.layout = KeypointLayout::Coco13;
            s
        };
        let build = |name: &str, enc: RgbEncoding, samples: &[Sample]| -> Vec<u8> {
            let p = dir.path().join(name);
            let mut w = ShardWriter::create(&p).expect("create").with_rgb_encoding(enc).expect("enc");
            for s in samples {
                w.append(s).expect("append");
            }
            w.finish().expect("finish");
            std::fs::read(&p).expect("read")
        };
        let png2 = build("a", RgbEncoding::Png, &[tiny("a0", true, 0), tiny("a1", false, 1)]);
        let jpg1 = build("b", RgbEncoding::Jpeg { quality: 80 }, &[tiny("b0", true, 2)]);
        let mpii = build("c", RgbEncoding::Png, &[sample("c0", true, 3)]);
        let mut files: Vec<(String, Vec<u8>)> = vec![
            ("valid-png-2.tar".into(), png2.clone()),
            ("valid-jpeg-1.tar".into(), jpg1.clone()),
            ("valid-mpii-1.tar".into(), mpii),
            ("trunc-half.tar".into(), png2[..png2.len() / 2].to_vec()),
            ("trunc-no-marker.tar".into(), png2[..png2.len() - 1024].to_vec()),
            ("trunc-in-header.tar".into(), png2[..512 * 3 + 100].to_vec()),
            ("trunc-jpeg.tar".into(), jpg1[..jpg1.len() - 1500].to_vec()),
        ];
        // corrupt payloads: flip bytes inside the first member's data (the rgb image)
        let mut c = png2.clone();
        for b in &mut c[512 + 40..512 + 60] {
            *b ^= 0xa5;
        }
        files.push(("corrupt-rgb-png.tar".into(), c));
        let mut c = jpg1.clone();
        for b in &mut c[512 + 2..512 + 30] {
            *b = 0xff;
        }
        files.push(("corrupt-rgb-jpeg.tar".into(), c));
        // corrupt a header checksum
        let mut c = png2.clone();
        c[148] ^= 0x11;
        files.push(("corrupt-header.tar".into(), c));
        // raw members: bad kp2d, label out of range, parts of the wrong size
        let s = tiny("d0", false, 0);
        let mut m = members_of(&s);
        let kp = m.iter().position(|(n, _)| n.ends_with("kp2d.json")).expect("kp2d");
        m[kp].1 = br#"{"layout":"coco13","joints":[[1,2,1]]}"#.to_vec();
        let p = dir.path().join("raw");
        raw_tar(&p, &m);
        files.push(("corrupt-kp2d.tar".into(), std::fs::read(&p).expect("read")));
        let mut m = members_of(&s);
        let pi = m.iter().position(|(n, _)| n.ends_with("parts.png")).expect("parts");
        m[pi].1 = codec::encode_parts_png(&LabelImage { width: 5, height: 4, data: vec![99; 20] }).expect("png");
        raw_tar(&p, &m);
        files.push(("corrupt-parts-label.tar".into(), std::fs::read(&p).expect("read")));
        m[pi].1 = codec::encode_parts_png(&LabelImage { width: 3, height: 4, data: vec![1; 12] }).expect("png");
        raw_tar(&p, &m);
        files.push(("corrupt-parts-size.tar".into(), std::fs::read(&p).expect("read")));
        files.push(("empty.tar".into(), vec![0u8; 1024]));
        for (name, bytes) in &files {
            std::fs::write(shard_dir.join(name), bytes).expect("write");
        }

        let s = tiny("m", true, 0);
        let members: Vec<(&str, Vec<u8>)> = vec![
            ("valid-rgb.png", codec::encode_rgb_png(&s.rgb).expect("png")),
            ("valid-rgb.jpg", codec::encode_rgb_jpeg(&smooth_rgb(8, 8, 0), 75).expect("jpeg")),
            ("valid-depth.png", codec::encode_depth_png(s.depth.as_ref().expect("depth")).expect("png")),
            ("valid-parts.png", codec::encode_parts_png(s.parts.as_ref().expect("parts")).expect("png")),
            ("valid-kp2d.json", codec::encode_kp2d(s.layout, &s.joints)),
            ("valid-meta.json", codec::encode_meta("m", true, "fuzz")),
        ];
        for (name, bytes) in &members {
            std::fs::write(member_dir.join(name), bytes).expect("write");
        }
    }

    #[test]
    fn split_member_uses_first_dot_of_file_name() {
        assert_eq!(split_member("a/b/k1.rgb.png"), Some(("a/b/k1", "rgb.png")));
        assert_eq!(split_member("k.kp2d.json"), Some(("k", "kp2d.json")));
        assert_eq!(split_member("noext"), None);
    }

    #[test]
    fn reader_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ShardReader>();
        assert_send_sync::<ShardWriter>();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Truncating or flipping bytes of a valid shard gives an error or a read, never a panic.
        #[test]
        fn mutated_shards_never_panic(cut in 0.0f64..1.0, flips in proptest::collection::vec((0.0f64..1.0, 1u8..=255), 0..6)) {
            let bytes = corpus("shard").into_iter().find(|(n, _)| n == "valid-png-2.tar").expect("corpus").1;
            let mut b = bytes[..((bytes.len() as f64) * (0.5 + cut / 2.0)) as usize].to_vec();
            if flips.is_empty() { b = bytes.clone(); }
            let n = b.len();
            for (at, x) in flips {
                let i = ((n as f64) * at) as usize % n;
                b[i] ^= x;
            }
            let _ = fuzz_shard_bytes(&b);
        }

        #[test]
        fn member_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert!(fuzz_member_bytes(&bytes) <= 6);
        }
    }
}
