//! Augmentation consistent across modalities.
//!
//! One geometric transform per sample maps the output square (`size` x `size` pixels) into the source
//! image: a similarity (centre, side, rotation). RGB is resampled bilinearly; depth and part labels with
//! nearest sampling (so no depth is invented between the person and the background, and labels stay
//! labels); keypoints go through the inverse of the same transform. Visibility is recomputed after the
//! crop: a joint stays visible only if it was labelled visible and lands inside the output, testing x
//! against the width and y against the height. Pixels that fall outside the source are RGB 0, depth 0,
//! label 0.
//!
//! The transform:
//! - samples with depth (RGB-D datasets): a random square crop around the person: side chosen so the
//!   crop covers `scale in [scale_min, scale_max]` of the image area, centred on the person (the box of
//!   its visible joints, or the depth foreground) with a small random shift;
//! - RGB-only samples: an affine crop around the person (HRNet-pose style): side = the person box's
//!   longer edge x `person_margin` x a scale jitter, plus a rotation jitter.
//!
//! Every random choice comes from a generator seeded by `(seed, epoch, slot)`, so a sample's
//! augmentation does not depend on which rank loads it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sample::{DepthImage, Joint, LabelImage, RgbImage, Sample};

/// Augmentation settings (the job file's `[data.augment]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Output side in pixels.
    pub size: u32,
    /// Crop area as a share of the image area, for samples with depth.
    pub scale_min: f32,
    pub scale_max: f32,
    /// RGB-only samples: crop side = person box edge x margin x (1 +- scale_jitter).
    pub person_margin: f32,
    pub scale_jitter: f32,
    /// RGB-only samples: rotation drawn from +- this many degrees.
    pub rotation_deg: f32,
    /// Crop centre shift as a share of the crop side (samples with depth).
    pub shift: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            size: 64,
            scale_min: 0.08,
            scale_max: 1.2,
            person_margin: 1.25,
            scale_jitter: 0.25,
            rotation_deg: 30.0,
            shift: 0.1,
        }
    }
}

/// Output pixel (u, v) -> source point (x, y): `src = c + R(theta) * (out - size/2) * s` with pixel
/// centres at +0.5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub cx: f32,
    pub cy: f32,
    /// Source pixels per output pixel.
    pub scale: f32,
    /// Radians.
    pub theta: f32,
    pub size: u32,
}

impl Transform {
    /// Source coordinates of output point `(u, v)` (continuous, pixel centres at +0.5).
    pub fn to_source(&self, u: f32, v: f32) -> (f32, f32) {
        let h = self.size as f32 / 2.0;
        let (du, dv) = ((u - h) * self.scale, (v - h) * self.scale);
        let (s, c) = self.theta.sin_cos();
        (self.cx + c * du - s * dv, self.cy + s * du + c * dv)
    }

    /// Output coordinates of source point `(x, y)` (the inverse).
    pub fn to_output(&self, x: f32, y: f32) -> (f32, f32) {
        let h = self.size as f32 / 2.0;
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = self.theta.sin_cos();
        ((c * dx + s * dy) / self.scale + h, (-s * dx + c * dy) / self.scale + h)
    }
}

/// The splitmix64 finaliser: a cheap, well-mixed bijection of `u64`, used to derive seeds from
/// (seed, epoch, slot) here and by the coordinator's data plan.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The generator of one sample's augmentation.
pub fn rng_for(seed: u64, epoch: u64, slot: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed ^ mix(epoch ^ mix(slot.wrapping_add(0xa5a5)))))
}

/// The person's box `(x0, y0, x1, y1)`: visible joints, else the depth foreground, else the image.
fn person_box(s: &Sample) -> (f32, f32, f32, f32) {
    let vis: Vec<&Joint> = s.joints.iter().filter(|j| j.visible && j.x.is_finite() && j.y.is_finite()).collect();
    if vis.len() >= 2 {
        let fold = |f: fn(f32, f32) -> f32, init: f32, g: fn(&Joint) -> f32| vis.iter().map(|j| g(j)).fold(init, f);
        return (
            fold(f32::min, f32::INFINITY, |j| j.x),
            fold(f32::min, f32::INFINITY, |j| j.y),
            fold(f32::max, f32::NEG_INFINITY, |j| j.x),
            fold(f32::max, f32::NEG_INFINITY, |j| j.y),
        );
    }
    if let Some(d) = &s.depth {
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for y in 0..d.height {
            for x in 0..d.width {
                if d.data[(y * d.width + x) as usize] > 0 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
                }
            }
        }
        if x0 < x1 {
            return (x0 as f32, y0 as f32, x1 as f32, y1 as f32);
        }
    }
    (0.0, 0.0, s.rgb.width as f32, s.rgb.height as f32)
}

/// Draws the transform of one sample.
pub fn draw(s: &Sample, cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Transform {
    let (w, h) = (s.rgb.width as f32, s.rgb.height as f32);
    let (x0, y0, x1, y1) = person_box(s);
    let (pcx, pcy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let size = cfg.size.max(1);
    if s.depth.is_some() {
        let lo = cfg.scale_min.min(cfg.scale_max);
        let area = rng.random_range(lo..=cfg.scale_max.max(lo)) * w * h;
        let side = area.sqrt().max(1.0);
        let cx = pcx + rng.random_range(-cfg.shift..=cfg.shift) * side;
        let cy = pcy + rng.random_range(-cfg.shift..=cfg.shift) * side;
        Transform { cx, cy, scale: side / size as f32, theta: 0.0, size }
    } else {
        let edge = (x1 - x0).max(y1 - y0).max(1.0);
        let jitter = rng.random_range(-cfg.scale_jitter..=cfg.scale_jitter);
        let side = edge * cfg.person_margin * (1.0 + jitter);
        let theta = rng.random_range(-cfg.rotation_deg..=cfg.rotation_deg).to_radians();
        Transform { cx: pcx, cy: pcy, scale: side.max(1.0) / size as f32, theta, size }
    }
}

/// Applies `t` to every modality of `s`.
pub fn apply(s: &Sample, t: &Transform) -> Sample {
    let n = t.size as usize;
    let (sw, sh) = (s.rgb.width as i64, s.rgb.height as i64);
    let mut rgb = vec![0u8; n * n * 3];
    let mut depth = s.depth.as_ref().map(|_| vec![0u16; n * n]);
    let mut parts = s.parts.as_ref().map(|_| vec![0u8; n * n]);
    for v in 0..n {
        for u in 0..n {
            let (x, y) = t.to_source(u as f32 + 0.5, v as f32 + 0.5);
            // Bilinear RGB (sample positions relative to pixel centres).
            let (fx, fy) = (x - 0.5, y - 0.5);
            let (ix, iy) = (fx.floor() as i64, fy.floor() as i64);
            let (ax, ay) = (fx - ix as f32, fy - iy as f32);
            let out = &mut rgb[(v * n + u) * 3..(v * n + u) * 3 + 3];
            let mut acc = [0f32; 3];
            for (dy, wy) in [(0, 1.0 - ay), (1, ay)] {
                for (dx, wx) in [(0, 1.0 - ax), (1, ax)] {
                    let (px, py) = (ix + dx, iy + dy);
                    if px >= 0 && py >= 0 && px < sw && py < sh {
                        let i = ((py * sw + px) * 3) as usize;
                        for (a, &v) in acc.iter_mut().zip(&s.rgb.data[i..i + 3]) {
                            *a += wx * wy * f32::from(v);
                        }
                    }
                }
            }
            for c in 0..3 {
                out[c] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
            // Nearest for depth and labels.
            let (nx, ny) = (x.floor() as i64, y.floor() as i64);
            if nx >= 0 && ny >= 0 && nx < sw && ny < sh {
                let i = (ny * sw + nx) as usize;
                if let (Some(dst), Some(src)) = (depth.as_mut(), s.depth.as_ref()) {
                    dst[v * n + u] = src.data[i];
                }
                if let (Some(dst), Some(src)) = (parts.as_mut(), s.parts.as_ref()) {
                    dst[v * n + u] = src.data[i];
                }
            }
        }
    }
    let joints = s
        .joints
        .iter()
        .map(|j| {
            let (u, v) = t.to_output(j.x, j.y);
            // The right coordinate on each axis: u against the width, v against the height.
            let inside = u >= 0.0 && u < n as f32 && v >= 0.0 && v < n as f32;
            Joint { x: u, y: v, visible: j.visible && inside }
        })
        .collect();
    let size = t.size;
    Sample {
        key: s.key.clone(),
        rgb: RgbImage { width: size, height: size, data: rgb },
        depth: depth.map(|data| DepthImage { width: size, height: size, data }),
        parts: parts.map(|data| LabelImage { width: size, height: size, data }),
        layout: s.layout,
        joints,
    }
}

/// Draws and applies the augmentation of the sample in `slot` of `epoch`.
pub fn augment(s: &Sample, cfg: &AugmentConfig, seed: u64, epoch: u64, slot: u64) -> Sample {
    let t = draw(s, cfg, &mut rng_for(seed, epoch, slot));
    apply(s, &t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KeypointLayout;
    use proptest::prelude::*;

    /// A sample whose pixels encode their own coordinates: R = x, G = y (mod 256), depth = 1000 + x,
    /// label = 1 + (y % 14), so a resampled pixel says where it came from.
    fn coded(w: u32, h: u32, with_depth: bool) -> Sample {
        let mut rgb = Vec::new();
        let mut depth = Vec::new();
        let mut parts = Vec::new();
        for y in 0..h {
            for x in 0..w {
                rgb.extend([x as u8, y as u8, 7]);
                depth.push(1000 + x as u16);
                parts.push(1 + (y % 14) as u8);
            }
        }
        let joints = (0..16)
            .map(|i| Joint { x: 10.0 + 3.0 * i as f32 + 0.5, y: 20.0 + 2.0 * i as f32 + 0.5, visible: i != 3 })
            .collect();
        Sample {
            key: "k".into(),
            rgb: RgbImage { width: w, height: h, data: rgb },
            depth: with_depth.then_some(DepthImage { width: w, height: h, data: depth }),
            parts: Some(LabelImage { width: w, height: h, data: parts }),
            layout: KeypointLayout::Mpii16,
            joints,
        }
    }

    #[test]
    fn transform_round_trips() {
        let t = Transform { cx: 40.0, cy: 30.0, scale: 1.7, theta: 0.4, size: 32 };
        for (x, y) in [(0.0, 0.0), (40.0, 30.0), (77.5, 12.25)] {
            let (u, v) = t.to_output(x, y);
            let (x2, y2) = t.to_source(u, v);
            assert!((x - x2).abs() < 1e-3 && (y - y2).abs() < 1e-3);
        }
    }

    #[test]
    fn same_seed_epoch_slot_same_result_and_different_slots_differ() {
        let s = coded(120, 100, true);
        let cfg = AugmentConfig { size: 32, ..Default::default() };
        let a = augment(&s, &cfg, 5, 2, 17);
        assert_eq!(a, augment(&s, &cfg, 5, 2, 17));
        assert_ne!(a, augment(&s, &cfg, 5, 2, 18));
        assert_ne!(a, augment(&s, &cfg, 5, 3, 17));
        assert_eq!((a.rgb.width, a.rgb.height), (32, 32));
    }

    proptest! {
        /// Depth, labels and keypoints follow the pixels: at every joint that stays visible, the output
        /// pixel came from (within a pixel of) the joint's source position, in every modality.
        #[test]
        fn every_modality_follows_the_same_geometry(seed in any::<u64>(), slot in 0u64..1000, with_depth in any::<bool>()) {
            let s = coded(140, 120, with_depth);
            let cfg = AugmentConfig { size: 48, rotation_deg: 40.0, ..Default::default() };
            let t = draw(&s, &cfg, &mut rng_for(seed, 0, slot));
            let a = apply(&s, &t);
            for (j, (src, out)) in s.joints.iter().zip(&a.joints).enumerate() {
                let (u, v) = t.to_output(src.x, src.y);
                prop_assert!((out.x - u).abs() < 1e-3 && (out.y - v).abs() < 1e-3);
                let inside = out.x >= 0.0 && out.x < 48.0 && out.y >= 0.0 && out.y < 48.0;
                prop_assert_eq!(out.visible, src.visible && inside, "joint {}", j);
                if !out.visible {
                    continue;
                }
                let (pu, pv) = (out.x.floor() as usize, out.y.floor() as usize);
                // The nearest-sampled source pixel of (pu, pv) is within ~1 output pixel of the joint.
                let reach = t.scale * 1.5 + 1.0;
                if let Some(d) = &a.depth {
                    let got_x = d.data[pv * 48 + pu] as f32 - 1000.0;
                    prop_assert!((got_x - src.x).abs() <= reach, "depth x {} vs joint x {}", got_x, src.x);
                }
                let label = a.parts.as_ref().map(|p| p.data[pv * 48 + pu]).unwrap_or(0);
                let want = 1 + (src.y.floor() as i64).rem_euclid(14) as u8;
                let ok = (0..=reach.ceil() as i64).any(|dy| [1i64, -1].iter().any(|sgn| {
                    1 + ((src.y.floor() as i64 + sgn * dy).rem_euclid(14)) as u8 == label
                }));
                prop_assert!(ok, "label {} near joint y {} (want about {})", label, src.y, want);
                let r = a.rgb.data[(pv * 48 + pu) * 3] as f32;
                prop_assert!((r - src.x).abs() <= reach + 1.0, "rgb x {} vs joint x {}", r, src.x);
            }
        }
    }

    /// On synthetic humans: after augmentation every visible keypoint still lies on (within 1 px of) a
    /// pixel labelled with one of the parts adjacent to that joint (labels resampled nearest).
    #[test]
    fn visible_keypoints_stay_on_their_parts_after_augmentation() {
        for layout in [KeypointLayout::Mpii16, KeypointLayout::Coco13] {
            let synth = crate::synth::SynthConfig { image_size: 96, layout, ..Default::default() };
            let cfg = AugmentConfig { size: 64, scale_min: 0.3, ..Default::default() };
            let mut checked = 0;
            for index in 0..40u64 {
                let s = crate::synth::synth_sample(&synth, index);
                let a = augment(&s, &cfg, 11, 0, index);
                let parts = a.parts.as_ref().expect("synthetic samples carry part labels");
                for (j, joint) in a.joints.iter().enumerate().filter(|(_, j)| j.visible) {
                    let adjacent = crate::layout::adjacent_parts(layout, j);
                    let (px, py) = (joint.x.floor() as i64, joint.y.floor() as i64);
                    let near = (-1..=1i64).any(|dy| {
                        (-1..=1i64).any(|dx| {
                            let (x, y) = (px + dx, py + dy);
                            x >= 0
                                && y >= 0
                                && x < 64
                                && y < 64
                                && adjacent.contains(&parts.data[(y * 64 + x) as usize])
                        })
                    });
                    assert!(
                        near,
                        "{layout} sample {index} joint {j} at ({px}, {py}) is not on one of the parts {adjacent:?}"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 200, "{layout}: only {checked} visible joints checked");
        }
    }

    #[test]
    fn rgb_only_samples_get_rotation_and_depth_samples_do_not() {
        let cfg = AugmentConfig { size: 32, ..Default::default() };
        let with = coded(120, 100, true);
        let without = coded(120, 100, false);
        let rotated = (0..50).filter(|&slot| draw(&without, &cfg, &mut rng_for(1, 0, slot)).theta != 0.0).count();
        assert!(rotated > 40);
        assert!((0..50).all(|slot| draw(&with, &cfg, &mut rng_for(1, 0, slot)).theta == 0.0));
    }
}
