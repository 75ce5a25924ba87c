//! COCO person keypoints -> person-centred RGB + COCO-13 keypoint samples.
//!
//! Input: the standard annotation JSON (`images` [{id, file_name, width, height}], `annotations`
//! [{id, image_id, category_id, bbox [x, y, w, h], iscrowd, num_keypoints, keypoints [17 * 3]}]) and
//! the images (JPEG or PNG) under `images_dir`. COCO coordinates are continuous with the image's
//! top-left corner at (0, 0), which is our convention; they are used as they are.
//!
//! COCO-17 -> COCO-13 (method page): ankles, knees, hips, nose (head), wrists, elbows, shoulders;
//! eyes and ears are dropped. Labelled = `v >= 1`.
//!
//! Person box: the annotation `bbox` when its sides are positive, else the box of the labelled
//! keypoints. Skipped and counted: `iscrowd`, `num_keypoints == 0` (or no labelled keypoint),
//! `category_id != 1`, an `image_id` not in `images`, and a missing image file (`"missing image"`).
//! Samples are written in `images` order, each image's annotations in file order (each image decoded
//! once); key `coco/<image stem>/<annotation id>`.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{BoxF, ConvertOptions, ConvertReport, Sink, bad_input, crop_box, key_part, read_json, read_rgb};
use crate::error::DataError;
use crate::layout::KeypointLayout;
use crate::sample::Sample;

/// For each COCO-13 joint, its COCO-17 index.
pub const COCO17_TO_COCO13: [usize; 13] = [15, 13, 11, 12, 14, 16, 0, 9, 7, 5, 6, 8, 10];

#[derive(Debug, Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Debug, Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Debug, Deserialize)]
struct CocoAnnotation {
    #[serde(default)]
    id: Option<u64>,
    image_id: u64,
    #[serde(default = "person")]
    category_id: u64,
    #[serde(default)]
    bbox: Option<Vec<f32>>,
    #[serde(default)]
    iscrowd: u8,
    #[serde(default)]
    num_keypoints: Option<u64>,
    #[serde(default)]
    keypoints: Vec<f32>,
}

fn person() -> u64 {
    1
}

/// Converts COCO person keypoints; see the module doc.
pub fn convert_coco(
    annotations_json: &Path,
    images_dir: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport, DataError> {
    let file: CocoFile = read_json(annotations_json)?;
    let mut sink = Sink::new(out_dir, opts, "coco", KeypointLayout::Coco13)?;

    let mut by_image: HashMap<u64, Vec<(usize, &CocoAnnotation)>> = HashMap::new();
    for (i, ann) in file.annotations.iter().enumerate() {
        let name = ann.id.map_or_else(|| format!("annotations[{i}]"), |id| format!("annotation id {id}"));
        if ann.keypoints.len() != 17 * 3 {
            return Err(bad_input(
                annotations_json,
                format!("{name}: field keypoints: expected 51 values (17 x [x, y, v]), found {}", ann.keypoints.len()),
            ));
        }
        if ann.keypoints.iter().any(|v| !v.is_finite()) {
            return Err(bad_input(annotations_json, format!("{name}: field keypoints: not finite")));
        }
        by_image.entry(ann.image_id).or_default().push((i, ann));
    }
    let known: std::collections::HashSet<u64> = file.images.iter().map(|im| im.id).collect();
    for ann in &file.annotations {
        if !known.contains(&ann.image_id) {
            sink.skip("unknown image id");
        }
    }

    for image in &file.images {
        let Some(anns) = by_image.get(&image.id) else { continue };
        let mut usable = Vec::new();
        for &(i, ann) in anns {
            let labelled = ann.keypoints.chunks_exact(3).filter(|k| k[2] >= 1.0).count() as u64;
            if ann.iscrowd != 0 {
                sink.skip("crowd");
            } else if ann.category_id != 1 {
                sink.skip("not a person");
            } else if ann.num_keypoints.unwrap_or(labelled) == 0 || labelled == 0 {
                sink.skip("no keypoints");
            } else {
                usable.push((i, ann));
            }
        }
        if usable.is_empty() {
            continue;
        }
        let path = images_dir.join(&image.file_name);
        if !path.is_file() {
            for _ in &usable {
                sink.skip("missing image");
            }
            continue;
        }
        let rgb = read_rgb(&path)?;
        let stem = Path::new(&image.file_name).file_stem().map(|s| key_part(&s.to_string_lossy())).unwrap_or_default();
        for (i, ann) in usable {
            let kp: Vec<(f32, f32, bool)> = ann.keypoints.chunks_exact(3).map(|k| (k[0], k[1], k[2] >= 1.0)).collect();
            let person = match ann.bbox.as_deref() {
                Some(&[x, y, w, h]) if w > 0.0 && h > 0.0 && x.is_finite() && y.is_finite() => {
                    BoxF { x0: x, y0: y, x1: x + w, y1: y + h }
                }
                _ => match BoxF::of_points(kp.iter().filter(|k| k.2).map(|k| (k.0, k.1))) {
                    Some(b) => b,
                    None => {
                        sink.skip("no keypoints");
                        continue;
                    }
                },
            };
            let Some(crop) = crop_box(person, rgb.width, rgb.height, opts.margin, opts.max_side) else {
                sink.skip("box outside the image");
                continue;
            };
            let joints = COCO17_TO_COCO13.iter().map(|&c| crop.joint(kp[c].0, kp[c].1, kp[c].2)).collect();
            let ann_id = ann.id.map_or_else(|| format!("idx{i}"), |id| id.to_string());
            let sample = Sample {
                key: format!("coco/{stem}/{ann_id}"),
                rgb: crop.rgb(&rgb),
                depth: None,
                parts: None,
                layout: KeypointLayout::Coco13,
                joints,
            };
            sink.append(&sample)?;
        }
    }
    sink.finish(annotations_json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::test_util::{write_rgb_jpeg, write_rgb_png};
    use crate::manifest::Dataset;

    fn kp17(points: &[(usize, f32, f32, u8)]) -> Vec<f32> {
        let mut k = vec![0.0; 51];
        for &(j, x, y, v) in points {
            k[j * 3] = x;
            k[j * 3 + 1] = y;
            k[j * 3 + 2] = f32::from(v);
        }
        k
    }

    #[test]
    fn converts_persons_skips_and_maps_joints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("images");
        write_rgb_png(&images.join("a.png"), 80, 60, |x, y| [x as u8 * 3, y as u8 * 4, 100]);
        write_rgb_jpeg(&images.join("b.jpg"), 64, 64, |x, _| [x as u8 * 4, 50, 50]);
        write_rgb_png(&images.join("unused.png"), 8, 8, |_, _| [0, 0, 0]);
        // person 1 in a.png: left ankle (COCO 15) at (30, 50), nose (0) at (32, 10), right wrist (10) v=1
        let p1 = kp17(&[(15, 30.0, 50.0, 2), (0, 32.0, 10.0, 2), (10, 45.0, 30.0, 1), (3, 31.0, 9.0, 2)]);
        // person 2 in b.jpg: no bbox, box from the keypoints
        let p2 = kp17(&[(15, 20.0, 40.0, 2), (16, 28.0, 41.0, 2), (0, 24.0, 12.0, 2), (13, 21.0, 30.0, 0)]);
        let json = serde_json::json!({
            "images": [
                {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
                {"id": 2, "file_name": "b.jpg", "width": 64, "height": 64},
                {"id": 3, "file_name": "gone.jpg", "width": 64, "height": 64},
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [25.0, 5.0, 25.0, 50.0], "iscrowd": 0,
                 "num_keypoints": 4, "keypoints": p1},
                {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 80.0, 60.0], "iscrowd": 1,
                 "num_keypoints": 0, "keypoints": kp17(&[])},
                {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "iscrowd": 0,
                 "num_keypoints": 0, "keypoints": kp17(&[])},
                {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0, "num_keypoints": 3, "keypoints": p2},
                {"id": 14, "image_id": 3, "category_id": 1, "bbox": [1.0, 1.0, 20.0, 40.0], "iscrowd": 0,
                 "num_keypoints": 1, "keypoints": kp17(&[(0, 5.0, 5.0, 2)])},
            ]
        });
        let ann = dir.path().join("person_keypoints.json");
        std::fs::write(&ann, serde_json::to_vec(&json).expect("json")).expect("write");
        let out = dir.path().join("out");
        let opts = ConvertOptions { shard_size: 1, name: "coco-test".into(), ..ConvertOptions::default() };
        let report = convert_coco(&ann, &images, &out, &opts).expect("convert");

        assert_eq!((report.samples, report.with_depth), (2, 0));
        let skipped: Vec<(&str, u64)> = report.skipped.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(skipped, vec![("crowd", 1), ("missing image", 1), ("no keypoints", 1)]);
        assert_eq!(report.manifest.layout, KeypointLayout::Coco13);
        assert_eq!(report.manifest.shards.len(), 2);
        assert_eq!((report.manifest.image_width, report.manifest.image_height), (0, 0));
        assert_eq!(report.manifest.modalities, vec!["rgb".to_string(), "kp2d".to_string()]);

        let ds = Dataset::open(out.join("manifest.json")).expect("open");
        ds.verify().expect("verify");
        let s = ds.get(0).expect("get 0");
        assert_eq!(s.key, "coco/a/10");
        // bbox [25, 5] + [25, 50] scaled 1.25 about (37.5, 30): x 21.875..53.125 -> 21..54, y -1.25.. -> 0..60
        assert_eq!((s.rgb.width, s.rgb.height), (33, 60));
        assert_eq!(s.joints.len(), 13);
        let la = s.joints[0];
        assert_eq!((la.x, la.y, la.visible), (30.0 - 21.0, 50.0, true));
        let head = s.joints[6];
        assert_eq!((head.x, head.y, head.visible), (32.0 - 21.0, 10.0, true));
        assert!(s.joints[12].visible && (s.joints[12].x - 24.0).abs() < 1e-5); // r_wrist, v = 1
        assert!(!s.joints[1].visible); // l_knee unlabelled
        assert_eq!(s.rgb.pixel(0, 0), Some([21 * 3, 0, 100]));

        let s = ds.get(1).expect("get 1");
        assert_eq!(s.key, "coco/b/13");
        // keypoint box x 20..28, y 12..41 -> w max(8, 16) = 16 * 1.25 = 20 about 24 -> 14..34
        assert_eq!(s.rgb.width, 20);
        assert_eq!((s.joints[0].x, s.joints[0].visible), (6.0, true));
        assert_eq!((s.joints[5].x, s.joints[5].visible), (14.0, true));
        assert!(!s.joints[1].visible, "v = 0 is not labelled");
    }

    #[test]
    fn resize_scales_keypoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_rgb_png(&dir.path().join("a.png"), 100, 100, |_, _| [9, 9, 9]);
        let json = serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0],
                             "iscrowd": 0, "num_keypoints": 1, "keypoints": kp17(&[(15, 50.0, 20.0, 2)])}]
        });
        let ann = dir.path().join("a.json");
        std::fs::write(&ann, serde_json::to_vec(&json).expect("json")).expect("write");
        let opts = ConvertOptions { max_side: 25, ..ConvertOptions::default() };
        let report = convert_coco(&ann, dir.path(), &dir.path().join("out"), &opts).expect("convert");
        assert_eq!((report.manifest.image_width, report.manifest.image_height), (25, 25));
        let s = Dataset::open(dir.path().join("out/manifest.json")).expect("open").get(0).expect("get");
        assert_eq!((s.joints[0].x, s.joints[0].y), (12.5, 5.0));
    }

    #[test]
    fn bad_input_names_file_and_annotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ann = dir.path().join("broken.json");
        std::fs::write(&ann, b"{\"images\": [").expect("write");
        let err =
            convert_coco(&ann, dir.path(), &dir.path().join("out"), &ConvertOptions::default()).expect_err("malformed");
        assert!(err.to_string().contains("broken.json") && err.to_string().contains("json"), "{err}");

        let json = serde_json::json!({
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 77, "image_id": 1, "category_id": 1, "iscrowd": 0, "num_keypoints": 1,
                             "keypoints": [1.0, 2.0, 2.0]}]
        });
        let ann = dir.path().join("short.json");
        std::fs::write(&ann, serde_json::to_vec(&json).expect("json")).expect("write");
        let err = convert_coco(&ann, dir.path(), &dir.path().join("out"), &ConvertOptions::default())
            .expect_err("wrong keypoint count");
        let msg = err.to_string();
        assert!(msg.contains("short.json") && msg.contains("annotation id 77") && msg.contains("keypoints"), "{msg}");
    }
}
