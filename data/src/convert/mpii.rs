//! MPII (the JSON form used by the HRNet / deep-high-resolution-net repos) -> person-centred RGB +
//! MPII-16 keypoint samples.
//!
//! Input: a JSON list of `{"image": "xxx.jpg", "center": [x, y], "scale": s, "joints": [[x, y] * 16],
//! "joints_vis": [0/1 * 16]}`; joints already in MPII-16 order. Those files keep MPII's 1-based
//! (MATLAB) pixel coordinates, so `x - 0.5` maps them to ours (pixel `i` covering `[i, i + 1)`; the
//! HRNet loaders subtract 1 for their pixel-centre-at-integer convention). Person box: `center +-
//! scale * 200 / 2` on both axes (MPII: `scale * 200` px is the person height), then `margin`.
//! Labelled = `joints_vis >= 1`. Skipped and counted: fewer than 2 labelled joints, a missing image
//! file (`"missing image"`). Key `mpii/<image stem>/<index in the list>`.

use std::path::Path;

use serde::Deserialize;

use super::{BoxF, ConvertOptions, ConvertReport, Sink, bad_input, crop_box, key_part, read_json, read_rgb};
use crate::error::DataError;
use crate::layout::KeypointLayout;
use crate::sample::{RgbImage, Sample};

/// MPII's MATLAB coordinates minus this are ours.
const MATLAB_OFFSET: f32 = 0.5;

#[derive(Debug, Deserialize)]
struct MpiiAnnotation {
    image: String,
    center: [f32; 2],
    scale: f32,
    joints: Vec<[f32; 2]>,
    joints_vis: Vec<f32>,
}

/// Converts MPII; see the module doc.
pub fn convert_mpii(
    annotations_json: &Path,
    images_dir: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, DataError> {
    let anns: Vec<MpiiAnnotation> = read_json(annotations_json)?;
    for (i, a) in anns.iter().enumerate() {
        let at = |field: &str, detail: String| {
            bad_input(annotations_json, format!("annotation {i} ({}): field {field}: {detail}", a.image))
        };
        if a.joints.len() != 16 {
            return Err(at("joints", format!("expected 16 joints, found {}", a.joints.len())));
        }
        if a.joints_vis.len() != 16 {
            return Err(at("joints_vis", format!("expected 16 values, found {}", a.joints_vis.len())));
        }
        if !(a.scale.is_finite() && a.scale > 0.0) {
            return Err(at("scale", format!("{} must be a positive number", a.scale)));
        }
        if !a.center.iter().chain(a.joints.iter().flatten()).all(|v| v.is_finite()) {
            return Err(at("joints", "coordinates must be finite".into()));
        }
    }
    let mut sink = Sink::new(out_dir, opts, "mpii", KeypointLayout::Mpii16)?;
    let mut cached: Option<(String, RgbImage)> = None;
    for (i, a) in anns.iter().enumerate() {
        if a.joints_vis.iter().filter(|&&v| v >= 1.0).count() < 2 {
            sink.skip("fewer than 2 visible joints");
            continue;
        }
        let path = images_dir.join(&a.image);
        if cached.as_ref().is_none_or(|(name, _)| name != &a.image) {
            if !path.is_file() {
                sink.skip("missing image");
                continue;
            }
            cached = Some((a.image.clone(), read_rgb(&path)?));
        }
        let Some((_, rgb)) = cached.as_ref() else { continue };
        let half = a.scale * 100.0;
        let (cx, cy) = (a.center[0] - MATLAB_OFFSET, a.center[1] - MATLAB_OFFSET);
        let person = BoxF { x0: cx - half, y0: cy - half, x1: cx + half, y1: cy + half };
        let Some(crop) = crop_box(person, rgb.width, rgb.height, opts.margin, opts.max_side) else {
            sink.skip("box outside the image");
            continue;
        };
        let joints = a
            .joints
            .iter()
            .zip(&a.joints_vis)
            .map(|(p, &v)| crop.joint(p[0] - MATLAB_OFFSET, p[1] - MATLAB_OFFSET, v >= 1.0))
            .collect();
        let stem = Path::new(&a.image).file_stem().map(|s| key_part(&s.to_string_lossy())).unwrap_or_default();
        let sample = Sample {
            key: format!("mpii/{stem}/{i}"),
            rgb: crop.rgb(rgb),
            depth: None,
            parts: None,
            layout: KeypointLayout::Mpii16,
            joints,
        };
        sink.append(&sample)?;
    }
    sink.finish(annotations_json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::test_util::{write_rgb_jpeg, write_rgb_png};
    use crate::manifest::Dataset;

    #[test]
    fn converts_keeps_order_and_skips() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_rgb_png(&dir.path().join("img/one.png"), 120, 100, |x, y| [x as u8, y as u8, 7]);
        write_rgb_jpeg(&dir.path().join("img/two.jpg"), 64, 48, |_, _| [90, 90, 90]);
        let joints: Vec<[f32; 2]> = (0..16).map(|j| [40.5 + j as f32, 30.5 + 2.0 * j as f32]).collect();
        let mut vis = vec![1.0f32; 16];
        vis[3] = 0.0;
        let mut one_vis = vec![0.0f32; 16];
        one_vis[0] = 1.0;
        let json = serde_json::json!([
            {"image": "one.png", "center": [50.5, 45.5], "scale": 0.3, "joints": joints, "joints_vis": vis},
            {"image": "two.jpg", "center": [30.0, 20.0], "scale": 0.2, "joints": joints, "joints_vis": one_vis},
            {"image": "gone.jpg", "center": [30.0, 20.0], "scale": 0.2, "joints": joints, "joints_vis": vis},
            {"image": "two.jpg", "center": [30.5, 20.5], "scale": 0.1, "joints": joints, "joints_vis": vis},
        ]);
        let ann = dir.path().join("train.json");
        std::fs::write(&ann, serde_json::to_vec(&json).expect("json")).expect("write");
        let out = dir.path().join("out");
        let report = convert_mpii(&ann, &dir.path().join("img"), &out, &ConvertOptions::default()).expect("convert");
        assert_eq!(report.samples, 2);
        let skipped: Vec<(&str, u64)> = report.skipped.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(skipped, vec![("fewer than 2 visible joints", 1), ("missing image", 1)]);
        assert_eq!(report.manifest.layout, KeypointLayout::Mpii16);

        let ds = Dataset::open(out.join("manifest.json")).expect("open");
        ds.verify().expect("verify");
        let s = ds.get(0).expect("get");
        assert_eq!(s.key, "mpii/one/0");
        // box: centre (50, 45) +- 30, * 1.25 -> +- 37.5 -> x 12..88, y 7..83 (floor/ceil, inside)
        assert_eq!((s.rgb.width, s.rgb.height), (76, 76));
        for (j, jt) in s.joints.iter().enumerate() {
            assert_eq!((jt.x, jt.y), (40.0 + j as f32 - 12.0, 30.0 + 2.0 * j as f32 - 7.0), "joint {j}");
            assert_eq!(jt.visible, j != 3, "joint {j}");
        }
        assert_eq!(s.rgb.pixel(0, 0), Some([12, 7, 7]));
        let s = ds.get(1).expect("get");
        assert_eq!(s.key, "mpii/two/3");
        // box +- 10 * 1.25 about (30, 20): 17..43, 7..33; joints beyond the crop are invisible
        assert_eq!((s.rgb.width, s.rgb.height), (26, 26));
        assert!(s.joints[0].visible && !s.joints[15].visible);
    }

    #[test]
    fn wrong_joint_count_names_the_annotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = serde_json::json!([
            {"image": "x.jpg", "center": [1.0, 1.0], "scale": 1.0, "joints": [[1.0, 2.0]], "joints_vis": [1]}
        ]);
        let ann = dir.path().join("valid.json");
        std::fs::write(&ann, serde_json::to_vec(&json).expect("json")).expect("write");
        let err = convert_mpii(&ann, dir.path(), &dir.path().join("out"), &ConvertOptions::default()).expect_err("bad");
        let msg = err.to_string();
        assert!(msg.contains("valid.json") && msg.contains("annotation 0") && msg.contains("joints"), "{msg}");
        std::fs::write(&ann, b"[{\"image\": 3}]").expect("write");
        let err = convert_mpii(&ann, dir.path(), &dir.path().join("out"), &ConvertOptions::default()).expect_err("bad");
        assert!(err.to_string().contains("valid.json"), "{err}");
    }
}
