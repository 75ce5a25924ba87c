//! A deterministic synthetic multi-modal human generator: RGB, depth, per-pixel body-part labels and
//! 2D keypoints of a procedural articulated body, written as shards plus a manifest.
//!
//! Per sample (everything drawn from a ChaCha8 stream seeded by `(seed, sample index)`, so the output
//! does not depend on `shard_size` or on threading):
//! - a 3D skeleton in the MPII-16 layout: limb lengths and thickness, torso lean and twist, head tilt,
//!   shoulder/elbow/hip/knee angles, and a rotation about the vertical axis (front, side and back
//!   views);
//! - a pinhole camera with a random focal length, the pelvis at a random image position and a
//!   distance of 3.0-3.4 m;
//! - body parts as (tapered) capsules (the head a sphere, hands and feet short capsules), each owned by
//!   one of the 14 parts of [`crate::PART_NAMES`] (the neck belongs to the head, the shoulder and hip
//!   bars to the torso), rasterised through one z-buffer: part labels = the nearest part at each pixel
//!   (0 = background), written for every sample; depth = capsule axis depth
//!   minus the capsule's bulge, in millimetres, clamped to [`DEPTH_MIN_MM`, `DEPTH_MAX_MM`],
//!   background 0; RGB = per-part colours (clothing and skin drawn per sample, each part a small hue
//!   offset of its group) with Lambert shading from the capsule normal, over a cluttered background
//!   (gradient, rectangles, stripes, limb-like distractors, per-pixel noise);
//! - keypoints: projected joint positions in pixel units (pixel `i` covers `[i, i + 1)`).
//!   `visible` = inside the image and not occluded: the z-buffer at the joint's pixel is not closer
//!   than the joint's own front surface (joint depth minus the radius of the parts meeting there)
//!   by more than [`OCCLUSION_TOLERANCE_MM`], and the joint's pixel or one of its 8 neighbours is
//!   labelled with a part adjacent to the joint ([`crate::adjacent_parts`]; otherwise another part
//!   covers it). Invisible joints keep their projected position.
//!   COCO-13 takes the limbs from the same skeleton and uses a nose point on the head sphere as its
//!   head joint (so it is occluded in back views).
//! - has-depth: drawn with probability `depth_fraction`; samples without depth lack the depth member.
//! - RGB is stored as PNG, or as JPEG when `rgb_jpeg_quality` is set.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::DataError;
use crate::layout::{KeypointLayout, adjacent_parts, part};
use crate::manifest::{MANIFEST_FORMAT, Manifest, ShardEntry};
use crate::sample::{DepthImage, Joint, LabelImage, RgbImage, Sample};
use crate::shard::{RgbEncoding, ShardWriter};

/// Smallest foreground depth written, in millimetres.
pub const DEPTH_MIN_MM: u16 = 2000;
/// Largest foreground depth written, in millimetres.
pub const DEPTH_MAX_MM: u16 = 4500;
/// How much closer than a joint's front surface the z-buffer may be before the joint is occluded.
pub const OCCLUSION_TOLERANCE_MM: f32 = 60.0;

/// Smallest and largest accepted `image_size`.
pub const MIN_IMAGE_SIZE: u32 = 16;
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// Settings of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of samples (at least 1).
    pub samples: u64,
    /// Width = height of the images, in pixels.
    pub image_size: u32,
    /// Share of samples WITH depth, in [0, 1].
    pub depth_fraction: f32,
    pub seed: u64,
    /// Samples per shard.
    pub shard_size: u64,
    pub layout: KeypointLayout,
    /// The manifest's `name`.
    pub name: String,
    /// Store RGB as JPEG at this quality (1..=100); `None` (the default) stores lossless PNG.
    pub rgb_jpeg_quality: Option<u8>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            samples: 256,
            image_size: 64,
            depth_fraction: 0.5,
            seed: 0,
            shard_size: 64,
            layout: KeypointLayout::Mpii16,
            name: "synthetic".to_string(),
            rgb_jpeg_quality: None,
        }
    }
}

impl SynthConfig {
    /// Checks the ranges documented on the fields.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |field: &'static str, detail: String| DataError::SynthConfig { field, detail };
        if self.samples == 0 {
            return Err(bad("samples", "must be at least 1".into()));
        }
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(bad(
                "image_size",
                format!("{} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}", self.image_size),
            ));
        }
        if !(0.0..=1.0).contains(&self.depth_fraction) {
            return Err(bad("depth_fraction", format!("{} is outside [0, 1]", self.depth_fraction)));
        }
        if self.shard_size == 0 {
            return Err(bad("shard_size", "must be at least 1".into()));
        }
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        if let Some(q) = self.rgb_jpeg_quality
            && !(1..=100).contains(&q)
        {
            return Err(bad("rgb_jpeg_quality", format!("{q} is outside 1..=100")));
        }
        Ok(())
    }

    /// How the shards store RGB.
    pub fn rgb_encoding(&self) -> RgbEncoding {
        self.rgb_jpeg_quality.map_or(RgbEncoding::Png, |quality| RgbEncoding::Jpeg { quality })
    }
}

/// The key of synthetic sample `index`.
pub fn sample_key(index: u64) -> String {
    format!("synth-{index:08}")
}

/// Generates the dataset into `out_dir` (created if missing): `shard-00000.tar`, ... and, last,
/// `manifest.json` (so an interrupted run leaves no manifest). Shards are written in parallel over
/// the available cores; the bytes do not depend on the thread count.
pub fn generate(cfg: &SynthConfig, out_dir: &Path) -> Result<Manifest, DataError> {
    generate_with_progress(cfg, out_dir, &|_, _| {})
}

/// [`generate`], calling `progress(samples_written, samples_total)` after every finished shard (from
/// the generating threads).
pub fn generate_with_progress(
    cfg: &SynthConfig,
    out_dir: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Manifest, DataError> {
    cfg.validate()?;
    let written = AtomicU64::new(0);
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let n_shards = cfg.samples.div_ceil(cfg.shard_size);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64).clamp(1, n_shards);

    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(u64, Result<ShardEntry, DataError>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n_shards || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = write_shard(cfg, out_dir, k);
                    match &r {
                        Ok(entry) => {
                            progress(written.fetch_add(entry.samples, Ordering::Relaxed) + entry.samples, cfg.samples)
                        }
                        Err(_) => failed.store(true, Ordering::Relaxed),
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((k, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(k, _)| *k);
    let mut shards = Vec::with_capacity(results.len());
    for (_, r) in results {
        shards.push(r?);
    }

    let with_depth: u64 = shards.iter().map(|s| s.with_depth).sum();
    let mut modalities = vec!["rgb".to_string()];
    if with_depth > 0 {
        modalities.push("depth".to_string());
    }
    modalities.push("kp2d".to_string());
    modalities.push("parts".to_string()); // every synthetic sample has part labels
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        name: cfg.name.clone(),
        layout: cfg.layout,
        image_width: cfg.image_size,
        image_height: cfg.image_size,
        modalities,
        samples: cfg.samples,
        shards,
    };
    manifest.save(out_dir.join("manifest.json"))?;
    Ok(manifest)
}

fn write_shard(cfg: &SynthConfig, out_dir: &Path, k: u64) -> Result<ShardEntry, DataError> {
    let name = format!("shard-{k:05}.tar");
    let mut writer =
        ShardWriter::create(out_dir.join(&name))?.with_source("synthetic").with_rgb_encoding(cfg.rgb_encoding())?;
    let start = k * cfg.shard_size;
    let end = (start + cfg.shard_size).min(cfg.samples);
    for index in start..end {
        writer.append(&synth_sample(cfg, index))?;
    }
    let summary = writer.finish()?;
    Ok(ShardEntry { path: name, samples: summary.samples, with_depth: summary.with_depth, sha256: summary.sha256 })
}

// ---------------------------------------------------------------------------------------------
// Geometry helpers

#[derive(Debug, Clone, Copy, PartialEq)]
struct V3 {
    x: f32,
    y: f32,
    z: f32,
}

const fn v3(x: f32, y: f32, z: f32) -> V3 {
    V3 { x, y, z }
}

impl std::ops::Add for V3 {
    type Output = V3;
    fn add(self, o: V3) -> V3 {
        v3(self.x + o.x, self.y + o.y, self.z + o.z)
    }
}

impl std::ops::Sub for V3 {
    type Output = V3;
    fn sub(self, o: V3) -> V3 {
        v3(self.x - o.x, self.y - o.y, self.z - o.z)
    }
}

impl std::ops::Mul<f32> for V3 {
    type Output = V3;
    fn mul(self, s: f32) -> V3 {
        v3(self.x * s, self.y * s, self.z * s)
    }
}

/// A rotation matrix, rows.
#[derive(Debug, Clone, Copy)]
struct M3([[f32; 3]; 3]);

impl M3 {
    fn rot_x(a: f32) -> M3 {
        let (s, c) = a.sin_cos();
        M3([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    }
    fn rot_y(a: f32) -> M3 {
        let (s, c) = a.sin_cos();
        M3([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    }
    fn rot_z(a: f32) -> M3 {
        let (s, c) = a.sin_cos();
        M3([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    }
    fn apply(&self, v: V3) -> V3 {
        let m = &self.0;
        v3(
            m[0][0] * v.x + m[0][1] * v.y + m[0][2] * v.z,
            m[1][0] * v.x + m[1][1] * v.y + m[1][2] * v.z,
            m[2][0] * v.x + m[2][1] * v.y + m[2][2] * v.z,
        )
    }
    fn mul(&self, o: &M3) -> M3 {
        let mut r = [[0.0f32; 3]; 3];
        for (i, row) in r.iter_mut().enumerate() {
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = (0..3).map(|k| self.0[i][k] * o.0[k][j]).sum();
            }
        }
        M3(r)
    }
}

/// Direction of a limb in a frame: hanging down, swung forward by `flex` and outward by `abd`.
/// Body axes: +x = the person's left, +y = up, -z = forward. `side` = +1 left, -1 right.
fn limb_dir(frame: &M3, flex: f32, abd: f32, side: f32) -> V3 {
    let (sf, cf) = flex.sin_cos();
    let (sa, ca) = abd.sin_cos();
    frame.apply(v3(side * sa, -ca * cf, -ca * sf))
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as u32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// A cheap per-pixel noise source (splitmix64), seeded from the sample's ChaCha stream.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------------
// Body

/// A tapered capsule between two points (body coordinates, metres).
#[derive(Debug, Clone, Copy)]
struct Part {
    a: V3,
    b: V3,
    ra: f32,
    rb: f32,
    colour: [f32; 3],
    /// Value in [`crate::PART_NAMES`].
    label: u8,
}

/// MPII-16 joint indices.
mod j {
    pub const R_ANKLE: usize = 0;
    pub const R_KNEE: usize = 1;
    pub const R_HIP: usize = 2;
    pub const L_HIP: usize = 3;
    pub const L_KNEE: usize = 4;
    pub const L_ANKLE: usize = 5;
    pub const PELVIS: usize = 6;
    pub const THORAX: usize = 7;
    pub const UPPER_NECK: usize = 8;
    pub const HEAD_TOP: usize = 9;
    pub const R_WRIST: usize = 10;
    pub const R_ELBOW: usize = 11;
    pub const R_SHOULDER: usize = 12;
    pub const L_SHOULDER: usize = 13;
    pub const L_ELBOW: usize = 14;
    pub const L_WRIST: usize = 15;
}

/// MPII index of each COCO-13 joint; `usize::MAX` marks the head (nose), which MPII lacks.
const COCO13_FROM_MPII: [usize; 13] = [
    j::L_ANKLE,
    j::L_KNEE,
    j::L_HIP,
    j::R_HIP,
    j::R_KNEE,
    j::R_ANKLE,
    usize::MAX,
    j::L_WRIST,
    j::L_ELBOW,
    j::L_SHOULDER,
    j::R_SHOULDER,
    j::R_ELBOW,
    j::R_WRIST,
];

struct Body {
    /// MPII-16 joints, body coordinates (metres, pelvis at the origin).
    joints: [V3; 16],
    /// Radius of the thickest part meeting at each MPII joint (its front surface offset).
    joint_radius: [f32; 16],
    nose: V3,
    parts: Vec<Part>,
}

fn sample_body(rng: &mut ChaCha8Rng) -> Body {
    let s: f32 = rng.random_range(0.85..1.15);
    let thick: f32 = rng.random_range(0.8..1.3);
    let mut len = |base: f32| base * s * rng.random_range(0.92..1.08);
    let (hip_w, thigh, shin, torso, neck, head) = (len(0.10), len(0.43), len(0.43), len(0.50), len(0.10), len(0.22));
    let (shoulder_w, upper_arm, forearm) = (len(0.18), len(0.29), len(0.26));

    // Torso frame: lean forward/back and sideways, twist about the spine.
    let lean_fwd: f32 = rng.random_range(-0.25..0.6);
    let lean_side: f32 = rng.random_range(-0.25..0.25);
    let twist: f32 = rng.random_range(-0.4..0.4);
    let torso_frame = M3::rot_z(lean_side).mul(&M3::rot_x(-lean_fwd)).mul(&M3::rot_y(twist));
    let up = torso_frame.apply(v3(0.0, 1.0, 0.0));
    let left = torso_frame.apply(v3(1.0, 0.0, 0.0));
    let ident = M3::rot_y(0.0);

    let mut p = [v3(0.0, 0.0, 0.0); 16];
    p[j::PELVIS] = v3(0.0, 0.0, 0.0);
    p[j::L_HIP] = v3(hip_w, -0.04 * s, 0.0);
    p[j::R_HIP] = v3(-hip_w, -0.04 * s, 0.0);
    p[j::THORAX] = up * torso;
    p[j::UPPER_NECK] = p[j::THORAX] + up * neck;
    p[j::L_SHOULDER] = p[j::THORAX] + left * shoulder_w;
    p[j::R_SHOULDER] = p[j::THORAX] - left * shoulder_w;

    // Legs: mostly standing, sometimes strongly flexed (sitting, kneeling, stepping).
    for (hip, knee, ankle, side) in [(j::L_HIP, j::L_KNEE, j::L_ANKLE, 1.0f32), (j::R_HIP, j::R_KNEE, j::R_ANKLE, -1.0)]
    {
        let flex: f32 = if rng.random_bool(0.6) { rng.random_range(-0.4..0.4) } else { rng.random_range(-0.5..1.7) };
        let abd: f32 = rng.random_range(0.0..0.5);
        let bend: f32 = rng.random_range(0.0..2.0);
        p[knee] = p[hip] + limb_dir(&ident, flex, abd, side) * thigh;
        p[ankle] = p[knee] + limb_dir(&ident, flex - bend, abd * 0.5, side) * shin;
    }

    // Arms, in the torso frame.
    for (shoulder, elbow, wrist, side) in
        [(j::L_SHOULDER, j::L_ELBOW, j::L_WRIST, 1.0f32), (j::R_SHOULDER, j::R_ELBOW, j::R_WRIST, -1.0)]
    {
        let flex: f32 = rng.random_range(-0.8..2.9);
        let abd: f32 = rng.random_range(0.0..1.6);
        let bend: f32 = rng.random_range(0.0..2.4);
        p[elbow] = p[shoulder] + limb_dir(&torso_frame, flex, abd, side) * upper_arm;
        p[wrist] = p[elbow] + limb_dir(&torso_frame, flex + bend, abd * 0.7, side) * forearm;
    }

    // Head: tilt and turn relative to the torso.
    let head_frame = torso_frame
        .mul(&M3::rot_x(rng.random_range(-0.4..0.3)))
        .mul(&M3::rot_z(rng.random_range(-0.3..0.3)))
        .mul(&M3::rot_y(rng.random_range(-0.7..0.7)));
    let head_up = head_frame.apply(v3(0.0, 1.0, 0.0));
    let head_fwd = head_frame.apply(v3(0.0, 0.0, -1.0));
    let head_r = head * 0.46;
    p[j::HEAD_TOP] = p[j::UPPER_NECK] + head_up * head;
    let head_c = p[j::HEAD_TOP] - head_up * head_r;
    let nose = head_c + head_fwd * (head_r * 0.97) - head_up * (head_r * 0.15);

    // Colours: clothing and skin per sample, each part a small hue offset of its group.
    let skin_t: f32 = rng.random_range(0.0..1.0);
    let skin_base = [0.96 - 0.60 * skin_t, 0.80 - 0.58 * skin_t, 0.69 - 0.54 * skin_t];
    let shirt = (rng.random_range(0.0..1.0f32), rng.random_range(0.3..0.9f32), rng.random_range(0.4..0.95f32));
    let pants = (rng.random_range(0.0..1.0f32), rng.random_range(0.2..0.8f32), rng.random_range(0.15..0.7f32));
    let shoes = (rng.random_range(0.0..1.0f32), rng.random_range(0.0..0.5f32), rng.random_range(0.05..0.4f32));
    let mut jitter =
        |(h, sat, val): (f32, f32, f32)| hsv(h + rng.random_range(-0.04..0.04), sat, val * rng.random_range(0.9..1.1));
    let skin = |k: f32| skin_base.map(|c| (c * k).clamp(0.0, 1.0));

    let mut joint_radius = [0.0f32; 16];
    let mut parts = Vec::with_capacity(20);
    let mut add = |parts: &mut Vec<Part>,
                   ja: Option<usize>,
                   jb: Option<usize>,
                   a: V3,
                   b: V3,
                   ra: f32,
                   rb: f32,
                   colour: [f32; 3],
                   label: u8| {
        let (ra, rb) = (ra * s * thick, rb * s * thick);
        if let Some(ja) = ja {
            joint_radius[ja] = joint_radius[ja].max(ra);
        }
        if let Some(jb) = jb {
            joint_radius[jb] = joint_radius[jb].max(rb);
        }
        parts.push(Part { a, b, ra, rb, colour, label });
    };
    let torso_c = jitter(shirt);
    let bar_c = jitter(shirt);
    let hips_c = jitter(pants);
    let (pelvis, thorax, neck) = (p[j::PELVIS], p[j::THORAX], p[j::UPPER_NECK]);
    add(&mut parts, Some(j::PELVIS), Some(j::THORAX), pelvis, thorax, 0.14, 0.16, torso_c, part::TORSO);
    let (rs, ls) = (p[j::R_SHOULDER], p[j::L_SHOULDER]);
    add(&mut parts, Some(j::R_SHOULDER), Some(j::L_SHOULDER), rs, ls, 0.065, 0.065, bar_c, part::TORSO);
    add(&mut parts, Some(j::R_HIP), Some(j::L_HIP), p[j::R_HIP], p[j::L_HIP], 0.09, 0.09, hips_c, part::TORSO);
    add(&mut parts, Some(j::THORAX), Some(j::UPPER_NECK), thorax, neck, 0.05, 0.05, skin(0.95), part::HEAD);
    parts.push(Part { a: head_c, b: head_c, ra: head_r, rb: head_r, colour: skin(1.0), label: part::HEAD });
    for (hip, knee, ankle, labels) in [
        (j::L_HIP, j::L_KNEE, j::L_ANKLE, [part::L_UPPER_LEG, part::L_LOWER_LEG, part::L_FOOT]),
        (j::R_HIP, j::R_KNEE, j::R_ANKLE, [part::R_UPPER_LEG, part::R_LOWER_LEG, part::R_FOOT]),
    ] {
        let thigh_c = jitter(pants);
        let shin_c = jitter(pants);
        add(&mut parts, Some(hip), Some(knee), p[hip], p[knee], 0.08, 0.06, thigh_c, labels[0]);
        add(&mut parts, Some(knee), Some(ankle), p[knee], p[ankle], 0.055, 0.045, shin_c, labels[1]);
        // Foot: forward from the ankle, roughly horizontal.
        let toe = p[ankle] + v3(0.0, -0.03, -0.14) * s;
        let shoe_c = jitter(shoes);
        add(&mut parts, Some(ankle), None, p[ankle], toe, 0.04, 0.035, shoe_c, labels[2]);
    }
    for (shoulder, elbow, wrist, labels) in [
        (j::L_SHOULDER, j::L_ELBOW, j::L_WRIST, [part::L_UPPER_ARM, part::L_LOWER_ARM, part::L_HAND]),
        (j::R_SHOULDER, j::R_ELBOW, j::R_WRIST, [part::R_UPPER_ARM, part::R_LOWER_ARM, part::R_HAND]),
    ] {
        let arm_c = jitter(shirt);
        add(&mut parts, Some(shoulder), Some(elbow), p[shoulder], p[elbow], 0.05, 0.042, arm_c, labels[0]);
        add(&mut parts, Some(elbow), Some(wrist), p[elbow], p[wrist], 0.04, 0.032, skin(0.9), labels[1]);
        // Hand: a short, slightly wider capsule continuing the forearm.
        let dir = p[wrist] - p[elbow];
        let len = (dir.x * dir.x + dir.y * dir.y + dir.z * dir.z).sqrt().max(1e-6);
        let fingers = p[wrist] + dir * (0.09 * s / len);
        add(&mut parts, Some(wrist), None, p[wrist], fingers, 0.036, 0.03, skin(1.0), labels[2]);
    }
    Body { joints: p, joint_radius, nose, parts }
}

// ---------------------------------------------------------------------------------------------
// Rendering

struct Camera {
    f: f32,
    cx: f32,
    cy: f32,
    /// Body-to-camera: yaw about the vertical axis, then translation. Camera axes: +x right,
    /// +y up (image rows grow downwards), +z away from the camera.
    yaw: M3,
    offset: V3,
}

impl Camera {
    fn to_camera(&self, p: V3) -> V3 {
        self.yaw.apply(p) + self.offset
    }
    /// Pixel coordinates (u right, v down) and depth in metres.
    fn project(&self, c: V3) -> (f32, f32, f32) {
        (self.cx + self.f * c.x / c.z, self.cy - self.f * c.y / c.z, c.z)
    }
}

struct Frame {
    size: usize,
    /// Linear RGB in [0, 1].
    rgb: Vec<[f32; 3]>,
    /// Depth in metres; `f32::INFINITY` = background.
    zbuf: Vec<f32>,
    /// Part label of the nearest part (the z-buffer's winner); 0 = background.
    labels: Vec<u8>,
}

/// Fills the background: gradient, rectangles (some striped), limb-like distractor blobs.
fn draw_background(frame: &mut Frame, rng: &mut ChaCha8Rng) {
    let n = frame.size as f32;
    let c0 = hsv(rng.random_range(0.0..1.0), rng.random_range(0.0..0.7), rng.random_range(0.2..0.95));
    let c1 = hsv(rng.random_range(0.0..1.0), rng.random_range(0.0..0.7), rng.random_range(0.2..0.95));
    let (ds, dc) = rng.random_range(0.0..std::f32::consts::TAU).sin_cos();
    for y in 0..frame.size {
        for x in 0..frame.size {
            let t = (((x as f32 / n - 0.5) * dc + (y as f32 / n - 0.5) * ds) + 0.75) / 1.5;
            let t = t.clamp(0.0, 1.0);
            frame.rgb[y * frame.size + x] = std::array::from_fn(|k| c0[k] + (c1[k] - c0[k]) * t);
        }
    }
    let rects = rng.random_range(3..10);
    for _ in 0..rects {
        let w = (rng.random_range(0.08..0.6) * n).max(1.0) as usize;
        let h = (rng.random_range(0.08..0.6) * n).max(1.0) as usize;
        let x0 = rng.random_range(0..frame.size);
        let y0 = rng.random_range(0..frame.size);
        let a = hsv(rng.random_range(0.0..1.0), rng.random_range(0.0..1.0), rng.random_range(0.1..1.0));
        let b = hsv(rng.random_range(0.0..1.0), rng.random_range(0.0..1.0), rng.random_range(0.1..1.0));
        let stripes: usize = if rng.random_bool(0.3) { rng.random_range(1..5) } else { 0 };
        let vertical = rng.random_bool(0.5);
        for y in y0..(y0 + h).min(frame.size) {
            for x in x0..(x0 + w).min(frame.size) {
                let c = match (if vertical { x } else { y }).checked_div(stripes) {
                    Some(k) if k.is_multiple_of(2) => a,
                    Some(_) => b,
                    None => {
                        let t = (y - y0) as f32 / h as f32;
                        std::array::from_fn(|k| a[k] + (b[k] - a[k]) * t)
                    }
                };
                frame.rgb[y * frame.size + x] = c;
            }
        }
    }
    // Limb-like distractors: flat-shaded capsules with no depth.
    let blobs = rng.random_range(0..4);
    for _ in 0..blobs {
        let (ax, ay) = (rng.random_range(0.0..n), rng.random_range(0.0..n));
        let (bx, by) = (ax + rng.random_range(-0.3..0.3) * n, ay + rng.random_range(-0.3..0.3) * n);
        let r = rng.random_range(0.015..0.06) * n;
        let c = hsv(rng.random_range(0.0..1.0), rng.random_range(0.0..0.9), rng.random_range(0.2..1.0));
        raster_capsule(frame.size, (ax, ay, r), (bx, by, r), |i, _t, _q, _ox, _oy| {
            frame.rgb[i] = c;
        });
    }
}

/// Calls `f(pixel, t, q, off_x, off_y)` for every pixel centre inside the 2D capsule from `a` to
/// `b` (each `(u, v, radius)` in pixels): `t` = position along the axis in [0, 1], `q` = distance
/// from the axis over the local radius in [0, 1), `off` = offset from the axis over the radius.
fn raster_capsule(size: usize, a: (f32, f32, f32), b: (f32, f32, f32), mut f: impl FnMut(usize, f32, f32, f32, f32)) {
    let (ua, va, ra) = a;
    let (ub, vb, rb) = b;
    let r_max = ra.max(rb);
    let x0 = (ua.min(ub) - r_max).floor().max(0.0);
    let x1 = (ua.max(ub) + r_max).ceil().min(size as f32);
    let y0 = (va.min(vb) - r_max).floor().max(0.0);
    let y1 = (va.max(vb) + r_max).ceil().min(size as f32);
    if !(x0 < x1 && y0 < y1) {
        return;
    }
    let (dx, dy) = (ub - ua, vb - va);
    let len2 = dx * dx + dy * dy;
    for y in y0 as usize..y1 as usize {
        let py = y as f32 + 0.5;
        for x in x0 as usize..x1 as usize {
            let px = x as f32 + 0.5;
            let t = if len2 > 1e-9 { (((px - ua) * dx + (py - va) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let (ox, oy) = (px - (ua + t * dx), py - (va + t * dy));
            let r = ra + t * (rb - ra);
            let d2 = ox * ox + oy * oy;
            if r <= 0.0 || d2 >= r * r {
                continue;
            }
            f(y * size + x, t, d2.sqrt() / r, ox / r, oy / r);
        }
    }
}

/// Unit vector towards the light (camera space, image axes: +x right, +y down, +z away).
const LIGHT: [f32; 3] = [-0.45, -0.55, -0.70];

fn draw_body(frame: &mut Frame, body: &Body, cam: &Camera) {
    let inv = 1.0 / (LIGHT[0] * LIGHT[0] + LIGHT[1] * LIGHT[1] + LIGHT[2] * LIGHT[2]).sqrt();
    let light = LIGHT.map(|c| c * inv);
    for part in &body.parts {
        let (ua, va, za) = cam.project(cam.to_camera(part.a));
        let (ub, vb, zb) = cam.project(cam.to_camera(part.b));
        let (pra, prb) = (cam.f * part.ra / za, cam.f * part.rb / zb);
        let (zbuf, rgb, labels) = (&mut frame.zbuf, &mut frame.rgb, &mut frame.labels);
        raster_capsule(frame.size, (ua, va, pra), (ub, vb, prb), |i, t, q, ox, oy| {
            let bulge = (1.0 - q * q).max(0.0).sqrt();
            let z = za + t * (zb - za) - (part.ra + t * (part.rb - part.ra)) * bulge;
            if z < zbuf[i] {
                zbuf[i] = z;
                labels[i] = part.label;
                // Normal: (ox, oy) in the image plane, -bulge towards the camera.
                let lambert = (ox * light[0] + oy * light[1] - bulge * light[2]).max(0.0);
                let shade = 0.3 + 0.7 * lambert;
                rgb[i] = part.colour.map(|c| c * shade);
            }
        });
    }
}

/// Renders synthetic sample `index` of the dataset `cfg` describes (deterministic in
/// `(cfg.seed, index, cfg.image_size, cfg.depth_fraction, cfg.layout)`).
pub fn synth_sample(cfg: &SynthConfig, index: u64) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(index);
    let has_depth = rng.random::<f32>() < cfg.depth_fraction;
    let size = cfg.image_size.max(1) as usize;
    let n = size as f32;

    let body = sample_body(&mut rng);
    let yaw = M3::rot_y(rng.random_range(0.0..std::f32::consts::TAU));
    let f = n * rng.random_range(0.9..1.7);
    let z = rng.random_range(3.0..3.4);
    let (u0, v0) = (n * rng.random_range(0.3..0.7), n * rng.random_range(0.4..0.62));
    let (cx, cy) = (n / 2.0, n / 2.0);
    let offset = v3((u0 - cx) * z / f, -(v0 - cy) * z / f, z);
    let cam = Camera { f, cx, cy, yaw, offset };

    let mut frame = Frame {
        size,
        rgb: vec![[0.0; 3]; size * size],
        zbuf: vec![f32::INFINITY; size * size],
        labels: vec![part::BACKGROUND; size * size],
    };
    draw_background(&mut frame, &mut rng);
    draw_body(&mut frame, &body, &cam);

    // Keypoints, with visibility from the z-buffer.
    let tol = OCCLUSION_TOLERANCE_MM / 1000.0;
    let joint_at = |p: V3, radius: f32, adjacent: &[u8]| -> Joint {
        let (u, v, zj) = cam.project(cam.to_camera(p));
        let inside = u >= 0.0 && v >= 0.0 && u < n && v < n;
        let visible = inside && {
            let (x, y) = ((u as usize).min(size - 1), (v as usize).min(size - 1));
            let unoccluded = frame.zbuf[y * size + x] >= zj - radius - tol;
            let on_own_part = (y.saturating_sub(1)..=(y + 1).min(size - 1)).any(|yy| {
                (x.saturating_sub(1)..=(x + 1).min(size - 1)).any(|xx| adjacent.contains(&frame.labels[yy * size + xx]))
            });
            unoccluded && on_own_part
        };
        Joint { x: u, y: v, visible }
    };
    let layout = cfg.layout;
    let joints: Vec<Joint> = match layout {
        KeypointLayout::Mpii16 => {
            (0..16).map(|k| joint_at(body.joints[k], body.joint_radius[k], adjacent_parts(layout, k))).collect()
        }
        KeypointLayout::Coco13 => COCO13_FROM_MPII
            .iter()
            .enumerate()
            .map(|(c, &k)| {
                let adjacent = adjacent_parts(layout, c);
                if k == usize::MAX {
                    joint_at(body.nose, 0.0, adjacent)
                } else {
                    joint_at(body.joints[k], body.joint_radius[k], adjacent)
                }
            })
            .collect(),
    };

    // Pixels: sensor noise on everything, depth in millimetres.
    let mut noise = Noise(rng.next_u64());
    let amp: f32 = rng.random_range(3.0..14.0);
    let mut data = Vec::with_capacity(size * size * 3);
    for px in &frame.rgb {
        for &c in px {
            let r = (noise.next() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            data.push((c * 255.0 + (r - 0.5) * 2.0 * amp).round().clamp(0.0, 255.0) as u8);
        }
    }
    let rgb = RgbImage { width: size as u32, height: size as u32, data };
    let depth = has_depth.then(|| DepthImage {
        width: size as u32,
        height: size as u32,
        data: frame
            .zbuf
            .iter()
            .map(|&z| {
                if z.is_finite() {
                    (z * 1000.0).round().clamp(f32::from(DEPTH_MIN_MM), f32::from(DEPTH_MAX_MM)) as u16
                } else {
                    0
                }
            })
            .collect(),
    });
    let parts = Some(LabelImage { width: size as u32, height: size as u32, data: frame.labels });
    Sample { key: sample_key(index), rgb, depth, parts, layout: cfg.layout, joints }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Dataset;

    fn cfg(samples: u64, seed: u64) -> SynthConfig {
        SynthConfig { samples, seed, shard_size: 16, ..SynthConfig::default() }
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = generate(&cfg(40, 7), &dir.path().join("a")).expect("a");
        let b = generate(&cfg(40, 7), &dir.path().join("b")).expect("b");
        let c = generate(&cfg(40, 8), &dir.path().join("c")).expect("c");
        assert_eq!(a.shards.len(), 3);
        assert_eq!(a, b);
        for (sa, sb) in a.shards.iter().zip(&b.shards) {
            let fa = std::fs::read(dir.path().join("a").join(&sa.path)).expect("read");
            let fb = std::fs::read(dir.path().join("b").join(&sb.path)).expect("read");
            assert_eq!(fa, fb, "shard {} differs", sa.path);
        }
        assert_ne!(a.shards[0].sha256, c.shards[0].sha256);
        // independent of shard_size
        let d = generate(&SynthConfig { shard_size: 7, ..cfg(40, 7) }, &dir.path().join("d")).expect("d");
        let (da, dd) = (
            Dataset::open(dir.path().join("a/manifest.json")).expect("open a"),
            Dataset::open(dir.path().join("d/manifest.json")).expect("open d"),
        );
        assert_eq!(d.shards.len(), 6);
        for g in [0u64, 6, 7, 20, 39] {
            assert_eq!(da.get(g).expect("a"), dd.get(g).expect("d"));
        }
    }

    #[test]
    fn depth_fraction_is_honoured() {
        let c = SynthConfig { image_size: 16, ..cfg(200, 3) };
        let with = (0..200).filter(|&i| synth_sample(&c, i).depth.is_some()).count();
        assert!((60..=140).contains(&with), "{with} of 200 with depth");
        let none = SynthConfig { depth_fraction: 0.0, ..c.clone() };
        assert!((0..50).all(|i| synth_sample(&none, i).depth.is_none()));
        let all = SynthConfig { depth_fraction: 1.0, ..c };
        assert!((0..50).all(|i| synth_sample(&all, i).depth.is_some()));
    }

    #[test]
    fn content_invariants() {
        for layout in KeypointLayout::ALL {
            let c = SynthConfig { layout, depth_fraction: 1.0, ..cfg(120, 11) };
            let size = c.image_size as f32;
            let (mut visible, mut occluded, mut outside, mut fg_pixels) = (0, 0, 0, 0usize);
            for i in 0..c.samples {
                let s = synth_sample(&c, i);
                assert_eq!(s.joints.len(), layout.num_joints());
                assert_eq!(s.rgb.data.len(), (c.image_size * c.image_size * 3) as usize);
                let depth = s.depth.as_ref().expect("depth_fraction 1");
                let mut fg = 0;
                for &d in &depth.data {
                    assert!(d == 0 || (DEPTH_MIN_MM..=DEPTH_MAX_MM).contains(&d), "depth {d}");
                    fg += usize::from(d > 0);
                }
                assert!(fg > 0, "sample {i} has no foreground");
                assert!(fg < depth.data.len(), "sample {i} has no background");
                fg_pixels += fg;
                for jt in &s.joints {
                    assert!(jt.x.is_finite() && jt.y.is_finite());
                    let inside = jt.x >= 0.0 && jt.y >= 0.0 && jt.x < size && jt.y < size;
                    if jt.visible {
                        assert!(inside, "visible joint outside the image: {jt:?}");
                        visible += 1;
                    } else if inside {
                        occluded += 1;
                    } else {
                        outside += 1;
                    }
                }
            }
            let total = c.samples as usize * layout.num_joints();
            assert!(occluded > total / 50, "{layout}: only {occluded} of {total} joints occluded");
            assert!(visible > total / 2, "{layout}: only {visible} of {total} joints visible");
            assert!(outside < total / 4, "{layout}: {outside} of {total} joints outside");
            let px = (c.image_size * c.image_size) as usize * c.samples as usize;
            assert!(fg_pixels > px / 20 && fg_pixels < px / 2, "foreground share {fg_pixels}/{px}");
        }
    }

    #[test]
    fn part_labels_follow_the_z_buffer_and_the_keypoints() {
        for layout in KeypointLayout::ALL {
            let c = SynthConfig { layout, depth_fraction: 0.5, ..cfg(80, 13) };
            let mut seen = [0usize; 15];
            let mut checked = 0;
            for i in 0..c.samples {
                let s = synth_sample(&c, i);
                let parts = s.parts.as_ref().expect("every synthetic sample has parts");
                assert_eq!((parts.width, parts.height), (s.rgb.width, s.rgb.height));
                for &l in &parts.data {
                    seen[usize::from(l)] += 1;
                }
                if let Some(depth) = &s.depth {
                    // one z-buffer: labelled exactly where depth is foreground
                    for (k, (&d, &l)) in depth.data.iter().zip(&parts.data).enumerate() {
                        assert_eq!(d > 0, l > 0, "sample {i} pixel {k}: depth {d}, label {l}");
                    }
                }
                for (j, jt) in s.joints.iter().enumerate().filter(|(_, jt)| jt.visible) {
                    let adjacent = crate::layout::adjacent_parts(layout, j);
                    let (x, y) = (jt.x.floor() as i64, jt.y.floor() as i64);
                    let near = (y - 1..=y + 1).any(|yy| {
                        (x - 1..=x + 1).any(|xx| {
                            u32::try_from(xx)
                                .ok()
                                .zip(u32::try_from(yy).ok())
                                .and_then(|(xx, yy)| parts.at(xx, yy))
                                .is_some_and(|l| adjacent.contains(&l))
                        })
                    });
                    assert!(
                        near,
                        "{layout} sample {i} joint {} at ({}, {}) is not within 1 px of {adjacent:?}",
                        layout.joint_names()[j],
                        jt.x,
                        jt.y
                    );
                    checked += 1;
                }
            }
            assert!(checked > 200, "{layout}: only {checked} visible joints checked");
            // every one of the 14 parts appears, and the background
            assert!(seen.iter().all(|&n| n > 0), "{layout}: label histogram {seen:?}");
        }
    }

    #[test]
    fn jpeg_rgb_dataset_reads_back_within_tolerance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = SynthConfig { rgb_jpeg_quality: Some(95), depth_fraction: 0.5, ..cfg(20, 4) };
        let m = generate(&c, dir.path()).expect("generate");
        assert!(m.modalities.contains(&"parts".to_string()), "{:?}", m.modalities);
        let ds = Dataset::open(dir.path().join("manifest.json")).expect("open");
        ds.verify().expect("verify");
        for g in 0..c.samples {
            let (got, want) = (ds.get(g).expect("get"), synth_sample(&c, g));
            assert_eq!(
                (&got.key, &got.depth, &got.parts, &got.joints),
                (&want.key, &want.depth, &want.parts, &want.joints)
            );
            let sum: u64 = got.rgb.data.iter().zip(&want.rgb.data).map(|(&a, &b)| u64::from(a.abs_diff(b))).sum();
            let mae = sum as f64 / want.rgb.data.len() as f64;
            // noisy, cluttered synthetic images: looser than the smooth-image codec tests
            assert!(mae < 6.0, "sample {g}: mean abs error {mae}");
        }
        let err = generate(&SynthConfig { rgb_jpeg_quality: Some(0), ..c }, dir.path()).expect_err("quality 0");
        assert!(err.to_string().contains("rgb_jpeg_quality"), "{err}");
    }

    #[test]
    fn background_is_cluttered() {
        // The background must not be separable by a colour threshold: its pixels span many values.
        let c = SynthConfig { depth_fraction: 1.0, ..cfg(10, 5) };
        for i in 0..c.samples {
            let s = synth_sample(&c, i);
            let depth = s.depth.as_ref().expect("depth");
            let mut lum: Vec<u32> = depth
                .data
                .iter()
                .zip(s.rgb.data.chunks_exact(3))
                .filter(|(d, _)| **d == 0)
                .map(|(_, p)| u32::from(p[0]) + u32::from(p[1]) + u32::from(p[2]))
                .collect();
            lum.sort_unstable();
            lum.dedup();
            assert!(lum.len() > 40, "sample {i}: only {} distinct background values", lum.len());
        }
    }

    #[test]
    fn generated_dataset_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = SynthConfig { layout: KeypointLayout::Coco13, ..cfg(33, 2) };
        let m = generate(&c, dir.path()).expect("generate");
        assert_eq!(m.samples, 33);
        assert_eq!(m.shards.iter().map(|s| s.samples).collect::<Vec<_>>(), vec![16, 16, 1]);
        assert_eq!(m.layout, KeypointLayout::Coco13);
        let ds = Dataset::open(dir.path().join("manifest.json")).expect("open");
        assert_eq!(ds.manifest(), &m);
        ds.verify().expect("verify");
        for g in [0u64, 15, 16, 32] {
            assert_eq!(ds.get(g).expect("get"), synth_sample(&c, g));
        }
    }

    #[test]
    fn config_is_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (bad, field) in [
            (SynthConfig { samples: 0, ..SynthConfig::default() }, "samples"),
            (SynthConfig { image_size: 4, ..SynthConfig::default() }, "image_size"),
            (SynthConfig { depth_fraction: 1.5, ..SynthConfig::default() }, "depth_fraction"),
            (SynthConfig { depth_fraction: f32::NAN, ..SynthConfig::default() }, "depth_fraction"),
            (SynthConfig { shard_size: 0, ..SynthConfig::default() }, "shard_size"),
        ] {
            let err = generate(&bad, dir.path()).expect_err(field);
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    /// Throughput at image_size 64 on one core; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let c = SynthConfig { samples: 2000, ..SynthConfig::default() };
        let t = std::time::Instant::now();
        let mut bytes = 0usize;
        for i in 0..c.samples {
            bytes += synth_sample(&c, i).rgb.data.len();
        }
        let render = c.samples as f64 / t.elapsed().as_secs_f64();
        let dir = tempfile::tempdir().expect("tempdir");
        let t = std::time::Instant::now();
        let one_thread = SynthConfig { shard_size: c.samples, ..c.clone() };
        generate(&one_thread, dir.path()).expect("generate");
        let full = c.samples as f64 / t.elapsed().as_secs_f64();
        println!(
            "render only: {render:.0} samples/s; render+encode+write (1 shard, 1 thread): {full:.0} samples/s ({bytes} rgb bytes)"
        );
    }
}
